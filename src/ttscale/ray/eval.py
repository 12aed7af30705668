"""`run_eval` over an `EnginePool`: the same problems, records, store and summary as
`ttscale.eval.harness.run_eval`, with problems sharded across engine actors.

The driver owns the store: it plans the (strategy, problem) pairs still missing from
``records.jsonl``, hands them out ``concurrency`` problems at a time (one chunk per actor
call; strategies in order, so an actor resets its prefix cache when its strategy changes, as
one process does), and appends each chunk's records in one write as it comes back. A chunk
whose actor died is rerun; its records are written only when a call returns them, and a pair
already recorded is never written again, so every problem is recorded exactly once.

Same results as one process: greedy is exact, and seeded sampling gives each sequence its own
RNG, so the answers, votes, tokens and every accuracy figure of the summary are equal. What
differs is what depends on which problems shared an engine: computed vs cached prompt tokens
(each actor computes the shared chat-template prefix once), hence FLOPs and bytes, and times.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ttscale.eval.harness import _progress, check_run, open_run, session_stamp
from ttscale.eval.store import (
    run_settings,
    write_summary,
)
from ttscale.eval.summary import summarize_records
from ttscale.strategies.api import DEFAULT_PARAMS

if TYPE_CHECKING:
    from ttscale.ray.pool import EnginePool
    from ttscale.sampling.params import SamplingParams
    from ttscale.strategies.base import SearchConfig
    from ttscale.tasks import Problem, Task
    from ttscale.tts.hygiene import Hygiene


def per_worker_totals(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Problems, seconds (amortized), FLOPs and bytes per worker that ran them (records
    written by one process count under "local")."""
    out: dict[str, dict[str, float]] = {}
    for r in records:
        row = out.setdefault(
            r.get("worker", "local"), {"problems": 0, "seconds": 0.0, "flops": 0.0, "bytes": 0.0}
        )
        row["problems"] += 1
        row["seconds"] += float(r.get("amortized_time") or 0.0)
        row["flops"] += float(r.get("flops") or 0.0)
        row["bytes"] += float(r.get("bytes") or 0.0)
    return out


def run_eval(
    pool: EnginePool,
    task: Task,
    strategies: Sequence[str],
    n_problems: int,
    out_dir: Path,
    *,
    seed: int = 0,
    params: SamplingParams = DEFAULT_PARAMS,
    scorer_spec: str = "logprob",
    concurrency: int = 8,
    resume: bool = True,
    progress: bool = True,
    search: SearchConfig | None = None,
    hygiene: Hygiene | None = None,
) -> dict[str, Any]:
    """`eval.harness.run_eval` on the pool's actors; same arguments (the numerics are the
    pool's) and summary, plus a ``cluster`` entry: workers, elapsed seconds, and per worker
    its problems, seconds, FLOPs and bytes. Raises ValueError for bad input (as the harness)
    before any work is sent."""
    out_dir = Path(out_dir)
    built, problems = check_run(task, strategies, n_problems, seed, concurrency)
    specs = list(built)
    if not scorer_spec.startswith("rm:"):  # a typo fails here; a reward model loads on actors
        from ttscale.scorers import load_scorer

        load_scorer(scorer_spec, pool.source)

    numerics = pool.config.numerics()
    settings = run_settings(pool.source, task, params, seed, scorer_spec, search, hygiene, numerics)
    records_path, records, done = open_run(out_dir, settings, resume)
    chunks: list[tuple[str, list[Problem]]] = []
    for spec in specs:
        pending = [p for p in problems if (spec, p.id) not in done]
        starts = range(0, len(pending), concurrency)
        chunks += [(spec, pending[i : i + concurrency]) for i in starts]

    task_ref = pool.ray.put(task)  # shipped once, not with every chunk
    session = session_stamp()
    common = dict(
        params=params, scorer=scorer_spec, search=search, hygiene=hygiene, session=session
    )
    t0 = time.perf_counter()
    with (
        _progress(sum(len(c) for _, c in chunks), progress) as advance,
        records_path.open("a", encoding="utf-8") as sink,
    ):

        def submit(actor: Any, chunk: tuple[str, list[Problem]]) -> Any:
            spec, batch = chunk
            needs = built[spec].needs_scorer
            return actor.eval_chunk.remote(task_ref, spec, batch, needs_scorer=needs, **common)

        def write(_: int, new: list[dict[str, Any]]) -> None:
            new = [r for r in new if (r["strategy"], r["problem_id"]) not in done]
            # One write per chunk: a kill leaves at most one partial line, at the end.
            sink.write("".join(json.dumps(r) + "\n" for r in new))
            sink.flush()
            done.update((r["strategy"], r["problem_id"]) for r in new)
            records.extend(new)
            if new:
                advance(new[0]["strategy"], len(new))

        pool.map_chunks(submit, chunks, write)
    elapsed = time.perf_counter() - t0

    ids = [p.id for p in problems]
    cluster = {
        "workers": len(pool),
        "elapsed_s": elapsed,
        "per_worker": per_worker_totals([r for r in records if r.get("session") == session]),
    }
    folder = {"settings": settings, "n_problems": len(problems)}
    write_summary(
        out_dir,
        {**folder, "strategies": summarize_records(records, ids, specs), "cluster": cluster},
    )
    asked = [r for r in records if r["strategy"] in built]
    summary = {**folder, "strategies": summarize_records(asked, ids, specs), "cluster": cluster}
    return summary


__all__ = ["per_worker_totals", "run_eval"]
