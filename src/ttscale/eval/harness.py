"""The evaluation runner: every strategy on the same problems (``task.problems(n, seed)``),
a few problems at a time on one engine, each chunk's records appended to the store
(``store.py``) as it finishes, the summary (``summary.py``) written at the end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ttscale.eval.store import (
    RECORDS_FILE,
    load_records,
    make_record,
    prepare_out_dir,
    run_settings,
    write_summary,
)
from ttscale.eval.summary import summarize_records
from ttscale.sampling.params import SamplingParams
from ttscale.strategies import make_strategy
from ttscale.strategies.api import DEFAULT_PARAMS, make_query, solve_many
from ttscale.tts.hygiene import Hygiene

if TYPE_CHECKING:
    from ttscale.llm import LLM
    from ttscale.scorers import Scorer
    from ttscale.strategies.base import SearchConfig, Strategy
    from ttscale.tasks import Problem, Task


@contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[str, int], None]]:
    """A rich progress bar on stderr; yields ``advance(description, steps)``."""
    if not enabled or total == 0:
        yield lambda desc, steps: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task_id = bar.add_task("eval", total=total)

        def advance(desc: str, steps: int) -> None:
            bar.update(task_id, description=desc, advance=steps)

        yield advance


def check_run(
    task: Task, strategies: Sequence[str], n_problems: int, seed: int, concurrency: int
) -> tuple[dict[str, Strategy], list[Problem]]:
    """The run's strategies by spec (deduplicated, in order) and its problems; ValueError on
    bad input before any work (shared by the local and the Ray harness)."""
    specs = list(dict.fromkeys(s.strip() for s in strategies if s.strip()))
    if not specs:
        raise ValueError("no strategy given")
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    built = {s: make_strategy(s) for s in specs}
    problems = task.problems(n_problems, seed)
    if not problems:
        raise ValueError(f"task {task.name!r} gave no problems")
    return built, problems


def open_run(
    out_dir: Path, settings: dict[str, Any], resume: bool
) -> tuple[Path, list[dict[str, Any]], set[tuple[str, str]]]:
    """The folder checked against ``settings`` (or cleared): its records file, the records
    already there, and their (strategy, problem id) pairs."""
    prepare_out_dir(out_dir, settings, resume)
    records_path = out_dir / RECORDS_FILE
    records = load_records(records_path)
    return records_path, records, {(r["strategy"], r["problem_id"]) for r in records}


def session_stamp() -> str:
    """Names one run's records, so a resumed folder can tell runs (and their timings) apart."""
    return datetime.now().isoformat(timespec="microseconds")


def run_eval(
    llm: LLM,
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
    numerics: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Runs every strategy on the same ``n_problems`` problems and returns the summary of
    those strategies (``summary.json`` in ``out_dir`` covers every strategy the folder holds).
    Problems run ``concurrency`` at a time on the engine; records are flushed after each
    chunk. Raises ValueError for a bad strategy spec and SettingsMismatch when ``out_dir``
    holds results of other settings (unless ``resume=False``). ``numerics``: the LLM's
    non-default dtype / quantize, part of the settings."""
    out_dir = Path(out_dir)
    built, problems = check_run(task, strategies, n_problems, seed, concurrency)
    specs = list(built)
    from ttscale.scorers import load_scorer

    scorer: Scorer | None = None
    if any(s.needs_scorer for s in built.values()):
        scorer = load_scorer(scorer_spec, llm.source)
    elif not scorer_spec.startswith("rm:"):  # it is in the settings: a typo must not be
        load_scorer(scorer_spec, llm.source)  # cheap but a reward model, which is not loaded

    settings = run_settings(llm.source, task, params, seed, scorer_spec, search, hygiene, numerics)
    records_path, records, done = open_run(out_dir, settings, resume)
    todo = {s: [p for p in problems if (s, p.id) not in done] for s in specs}
    session = session_stamp()

    with (
        _progress(sum(map(len, todo.values())), progress) as advance,
        records_path.open("a", encoding="utf-8") as sink,
    ):
        for spec, pending in todo.items():
            # Each strategy starts with a cold prefix cache: the previous one's prompts must
            # not make it look cheaper (sharing *within* a strategy is what we measure).
            llm.engine.reset_prefix_cache()
            for start in range(0, len(pending), concurrency):
                chunk = pending[start : start + concurrency]
                queries = [
                    make_query(
                        llm,
                        p.question,
                        messages=task.prompt(p),
                        extract=task.extract_answer,
                        params=params,
                        scorer=scorer if built[spec].needs_scorer else None,
                        search=search,
                        hygiene=hygiene,
                    )
                    for p in chunk
                ]
                t0 = time.perf_counter()
                results = solve_many(llm, queries, spec, concurrency=len(chunk))
                amortized = (time.perf_counter() - t0) / len(chunk)
                new = [
                    make_record(task, p, r, amortized, len(chunk), session)
                    for p, r in zip(chunk, results, strict=True)
                ]
                # One write per chunk: a kill leaves at most one partial line, at the end.
                sink.write("".join(json.dumps(r) + "\n" for r in new))
                sink.flush()
                records += new
                advance(spec, len(chunk))

    ids = [p.id for p in problems]
    folder = {"settings": settings, "n_problems": len(problems)}
    write_summary(out_dir, {**folder, "strategies": summarize_records(records, ids, specs)})
    asked = [r for r in records if r["strategy"] in built]
    return {**folder, "strategies": summarize_records(asked, ids, specs)}


__all__ = ["run_eval"]
