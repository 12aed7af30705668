"""Evaluate strategies on a task: per-problem JSONL records, resumable runs, a summary.

Layout of an output folder::

    run.json        the settings the records were produced with (checked on resume)
    records.jsonl   one line per (strategy, problem), appended and flushed chunk by chunk
    summary.json    per-strategy accuracy, pass@k / maj@k, coverage and cost
    summary.md      the same as a markdown table

Every strategy sees the same problems (``task.problems(n, seed)``). A run killed midway resumes
where it stopped: pairs already in ``records.jsonl`` are skipped, and a last line cut off
mid-write is dropped (its pair is recomputed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ttscale.eval.metrics import maj_at_k, pass_at_k, wilson_interval
from ttscale.sampling.params import SamplingParams
from ttscale.strategies import make_strategy
from ttscale.strategies.api import DEFAULT_PARAMS, make_query, solve_many

if TYPE_CHECKING:
    from ttscale.llm import LLM
    from ttscale.scorers import Scorer
    from ttscale.strategies.base import SearchConfig, StrategyResult
    from ttscale.tasks import Problem, Task

RECORDS_FILE = "records.jsonl"
RUN_FILE = "run.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"

# SessionStats fields every record has; any other numeric stats field (the cost model's
# flops / bytes / roofline_time, say) is recorded too and averaged in the summary.
BASE_STATS = (
    "generated_tokens",
    "prompt_tokens",
    "computed_prompt_tokens",
    "cached_prompt_tokens",
    "forks",
    "peak_kv_blocks",
    "wall_time",
)
COST_FIELDS = ("flops", "bytes", "roofline_time")
# Numeric record keys that are not per-problem costs (kept out of the cost discovery).
_NOT_COST = frozenset({"n_candidates", "chunk_size", "amortized_time"})
# maj@k with large N falls back to Monte Carlo; 1000 subsets per (problem, k) keeps the summary
# of a 500-problem run at N=64 to seconds, with a per-problem standard error <= 0.016.
MAJ_SAMPLES = 1000


class SettingsMismatch(ValueError):
    """The output folder holds records made with other settings."""


# ---- settings ---------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """A JSON round trip: tuples become lists, numpy scalars numbers, the rest strings, so
    settings compare equal to what run.json reads back."""

    def default(o: Any) -> Any:
        if hasattr(o, "item"):  # numpy / torch scalars
            return o.item()
        if isinstance(o, (set, frozenset)):
            return sorted(o, key=str)
        return str(o)

    return json.loads(json.dumps(value, default=default))


def task_identity(task: Task) -> dict[str, Any]:
    """What makes a task's problems and checker: its class and configuration."""
    ident: dict[str, Any] = {"type": type(task).__name__, "name": task.name, "family": task.family}
    for attr in ("dataset", "difficulty", "overrides", "path", "shuffle"):
        if hasattr(task, attr):
            ident[attr] = getattr(task, attr)
    return jsonable(ident)


def run_settings(
    llm: LLM,
    task: Task,
    params: SamplingParams,
    seed: int,
    scorer_spec: str,
    search: SearchConfig | None = None,
) -> dict[str, Any]:
    """The settings records depend on. Not included: n_problems (a run can be extended),
    the strategies (added one by one), concurrency (per-request seeds make samples independent
    of the batch) and engine memory options."""
    settings = {
        "model": str(llm.source),
        "task": task_identity(task),
        "seed": seed,
        "params": dataclasses.asdict(params),
        "scorer": scorer_spec,
    }
    if search is not None:
        settings["search"] = dataclasses.asdict(search)
    return jsonable(settings)


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def prepare_out_dir(out_dir: Path, settings: dict[str, Any], resume: bool) -> None:
    """Checks (or starts) the folder's run.json. With ``resume=False`` earlier results are
    deleted; with ``resume=True`` other settings are refused rather than mixed in."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run_path, records_path = out_dir / RUN_FILE, out_dir / RECORDS_FILE
    if not resume:
        for name in (RUN_FILE, RECORDS_FILE, SUMMARY_JSON, SUMMARY_MD):
            (out_dir / name).unlink(missing_ok=True)
    if run_path.exists():
        try:
            old = json.loads(run_path.read_text(encoding="utf-8"))["settings"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SettingsMismatch(
                f"{run_path} is unreadable; use another output folder or --no-resume"
            ) from None
        changes = _diff(old, settings)
        if changes:
            raise SettingsMismatch(
                f"{out_dir} holds results made with other settings ({'; '.join(changes)}); "
                "use another output folder, or --no-resume to start over"
            )
        return
    if records_path.exists() and records_path.stat().st_size:
        raise SettingsMismatch(
            f"{records_path} exists without {RUN_FILE}, so its settings are unknown; "
            "use another output folder, or --no-resume to start over"
        )
    info = {"settings": settings, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    run_path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


# ---- records ----------------------------------------------------------------------------------


def load_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file, first one per (strategy, problem_id) kept.

    A last line without its newline (the process was killed mid-write) is dropped if it does
    not parse, and the file is cut back to the last complete line so appends start clean. A
    bad line anywhere else is an error: that is not a crash artefact.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    records: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()

    def add(rec: Any, lineno: int) -> None:
        if not isinstance(rec, dict) or "strategy" not in rec or "problem_id" not in rec:
            raise ValueError(f"{path}:{lineno}: not a record (no strategy / problem_id)")
        key = (rec["strategy"], rec["problem_id"])
        if key not in seen:
            seen.add(key)
            records.append(rec)

    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            add(json.loads(line), i)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{i}: corrupt record line; fix or delete it") from None
    if tail.strip():
        try:
            rec = json.loads(tail)
        except json.JSONDecodeError:
            rec = None
        with path.open("r+b") as f:
            if rec is None:  # cut off mid-write: drop it
                f.truncate(len(data) - len(tail))
            else:  # complete but for its newline
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
        if rec is not None:
            add(rec, len(lines) + 1)
    return records


def finite_or_none(value: float | None) -> float | None:
    """Scores can be -inf (an empty step's logprob); JSON has no infinities."""
    return value if value is None or math.isfinite(value) else None


def stats_fields(stats: Any) -> dict[str, float]:
    """Numeric fields of a SessionStats, base ones first, new cost fields included."""
    values: dict[str, Any] = {}
    if dataclasses.is_dataclass(stats):
        values.update(dataclasses.asdict(stats))
    for name in (*BASE_STATS, *COST_FIELDS):  # properties too, if the cost fields are ones
        if name not in values:
            values[name] = getattr(stats, name, None)
    return {
        k: v
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def make_record(
    task: Task,
    problem: Problem,
    result: StrategyResult,
    amortized_time: float,
    chunk_size: int,
) -> dict[str, Any]:
    """One JSON-ready line: the problem, every candidate judged, the choice, and its cost.

    ``wall_time`` is the session's own time, which overlaps other problems of its chunk;
    ``amortized_time`` (chunk time / chunk size) adds up to the real elapsed time.
    """
    candidates = [
        {
            "text": c.text,
            "answer": c.answer,
            "score": finite_or_none(c.score),
            "tokens": c.tokens,
            "finish_reason": c.finish_reason,
            "correct": task.is_correct(problem, c.answer),
        }
        for c in result.candidates
    ]
    return {
        "strategy": result.strategy,
        "problem_id": problem.id,
        "question": problem.question,
        "reference": problem.answer,
        "difficulty": problem.difficulty,
        "answer": result.answer,
        "correct": task.is_correct(problem, result.answer),
        "n_candidates": len(candidates),
        "candidates": candidates,
        "votes": jsonable(result.votes),
        **stats_fields(result.stats),
        "amortized_time": amortized_time,
        "chunk_size": chunk_size,
        "extra": jsonable(result.extra),
    }


# ---- summary ----------------------------------------------------------------------------------


def k_values(n: int) -> list[int]:
    """1, the powers of 2 below n, and n."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return [*ks, n]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def cost_keys(records: Iterable[dict[str, Any]]) -> list[str]:
    """Numeric per-problem fields beyond the base stats (cost model fields), in order seen."""
    keys: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k in BASE_STATS or k in _NOT_COST:
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                keys[k] = None
    return list(keys)


def strategy_summary(strategy: str, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregates one strategy's records (one per problem).

    pass@k and maj@k are computed when every problem has >= 2 candidates, at k = 1, the powers
    of 2 and N (the fewest candidates any problem has, so every k fits every problem): pass@k
    with the unbiased estimator, maj@k over the k-subsets of the candidates. Times are
    amortized (chunk time / chunk size), so ``total_wall_time`` is the real elapsed time.
    """
    n = len(records)
    n_correct = sum(bool(r["correct"]) for r in records)
    lo, hi = wilson_interval(n_correct, n)

    def col(key: str) -> list[float]:
        return [float(r[key]) for r in records if r.get(key) is not None]

    covered = sum(any(c["correct"] for c in r["candidates"]) for r in records)
    computed, cached = sum(col("computed_prompt_tokens")), sum(col("cached_prompt_tokens"))
    out: dict[str, Any] = {
        "strategy": strategy,
        "n": n,
        "n_correct": n_correct,
        "accuracy": n_correct / n if n else None,
        "accuracy_lo": lo,
        "accuracy_hi": hi,
        "coverage": covered / n if n else None,
        "mean_candidates": _mean(col("n_candidates")),
        "mean_tokens": _mean(col("generated_tokens")),
        "total_tokens": sum(col("generated_tokens")),
        "mean_prompt_tokens": _mean(col("prompt_tokens")),
        "mean_computed_prompt_tokens": _mean(col("computed_prompt_tokens")),
        "mean_cached_prompt_tokens": _mean(col("cached_prompt_tokens")),
        "prompt_cache_share": cached / (computed + cached) if computed + cached else None,
        "mean_forks": _mean(col("forks")),
        "mean_peak_kv_blocks": _mean(col("peak_kv_blocks")),
        "max_peak_kv_blocks": max(col("peak_kv_blocks"), default=None),
        "mean_wall_time": _mean(col("amortized_time")),
        "total_wall_time": sum(col("amortized_time")),
        "mean_session_time": _mean(col("wall_time")),
    }
    for key in cost_keys(records):
        values = col(key)
        out[f"mean_{key}"] = _mean(values)
        out[f"total_{key}"] = sum(values)

    k_max = min((len(r["candidates"]) for r in records), default=0)
    if k_max >= 2:
        ks = k_values(k_max)
        out["k_max"] = k_max
        out["pass_at_k"] = {str(k): 0.0 for k in ks}
        out["maj_at_k"] = {str(k): 0.0 for k in ks}
        for r in records:
            cands = r["candidates"][:k_max]  # the same N for every problem
            right = {c["answer"] for c in cands if c["correct"]}
            answers = [c["answer"] for c in cands]
            n_right = sum(bool(c["correct"]) for c in cands)
            for k in ks:
                out["pass_at_k"][str(k)] += pass_at_k(k_max, n_right, k) / n
                out["maj_at_k"][str(k)] += (
                    maj_at_k(answers, right.__contains__, k, num_samples=MAJ_SAMPLES) / n
                )
    return out


def summarize_records(
    records: Iterable[dict[str, Any]],
    problem_ids: Sequence[str] | None = None,
    order: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Per-strategy summaries; strategies in ``order`` first, then as they appear. With
    ``problem_ids``, only those problems count (so every strategy is judged on the same set)."""
    wanted = set(problem_ids) if problem_ids is not None else None
    by_strategy: dict[str, list[dict[str, Any]]] = {s: [] for s in order}
    for r in records:
        if wanted is None or r["problem_id"] in wanted:
            by_strategy.setdefault(r["strategy"], []).append(r)
    return [strategy_summary(s, rs) for s, rs in by_strategy.items() if rs]


def write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    from ttscale.eval.report import markdown_summary

    (out_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out_dir / SUMMARY_MD).write_text(markdown_summary(summary), encoding="utf-8")


# ---- the loop ---------------------------------------------------------------------------------


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
) -> dict[str, Any]:
    """Runs every strategy on the same ``n_problems`` problems and returns the summary (also
    written to ``out_dir``). Problems run ``concurrency`` at a time on the engine; records are
    flushed after each chunk. Raises ValueError for a bad strategy spec and SettingsMismatch
    when ``out_dir`` holds results of other settings (unless ``resume=False``)."""
    out_dir = Path(out_dir)
    specs = list(dict.fromkeys(s.strip() for s in strategies if s.strip()))
    if not specs:
        raise ValueError("no strategy given")
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    built = {s: make_strategy(s) for s in specs}  # bad specs fail before any work
    problems = task.problems(n_problems, seed)
    if not problems:
        raise ValueError(f"task {task.name!r} gave no problems")
    from ttscale.scorers import load_scorer

    scorer: Scorer | None = None
    if any(s.needs_scorer for s in built.values()):
        scorer = load_scorer(scorer_spec)
    elif not scorer_spec.startswith("rm:"):  # it is in the settings: a typo must not be
        load_scorer(scorer_spec)  # cheap for the built-in ones; a reward model is not loaded

    settings = run_settings(llm, task, params, seed, scorer_spec, search)
    prepare_out_dir(out_dir, settings, resume)
    records_path = out_dir / RECORDS_FILE
    records = load_records(records_path)
    done = {(r["strategy"], r["problem_id"]) for r in records}
    todo = {s: [p for p in problems if (s, p.id) not in done] for s in specs}

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
                    )
                    for p in chunk
                ]
                t0 = time.perf_counter()
                results = solve_many(llm, queries, spec, concurrency=len(chunk))
                amortized = (time.perf_counter() - t0) / len(chunk)
                new = [
                    make_record(task, p, r, amortized, len(chunk))
                    for p, r in zip(chunk, results, strict=True)
                ]
                # One write per chunk: a kill leaves at most one partial line, at the end.
                sink.write("".join(json.dumps(r) + "\n" for r in new))
                sink.flush()
                records += new
                advance(spec, len(chunk))

    summary = {
        "settings": settings,
        "n_problems": len(problems),
        "strategies": summarize_records(records, [p.id for p in problems], specs),
    }
    write_summary(out_dir, summary)
    return summary


__all__ = [
    "RECORDS_FILE",
    "RUN_FILE",
    "SUMMARY_JSON",
    "SUMMARY_MD",
    "SettingsMismatch",
    "finite_or_none",
    "jsonable",
    "k_values",
    "load_records",
    "make_record",
    "prepare_out_dir",
    "run_eval",
    "run_settings",
    "stats_fields",
    "strategy_summary",
    "summarize_records",
    "task_identity",
    "write_summary",
]
