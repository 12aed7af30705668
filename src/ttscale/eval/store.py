"""The resumable store of an evaluation: one output folder per run.

Layout of an output folder::

    run.json        the settings the records were produced with (checked on resume)
    records.jsonl   one line per (strategy, problem), appended and flushed chunk by chunk
    summary.json    per-strategy accuracy, pass@k / maj@k, coverage and cost
    summary.md      the same as a markdown table

A run killed midway resumes where it stopped: pairs already in ``records.jsonl`` are skipped,
and a last line cut off mid-write is dropped (its pair is recomputed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ttscale.eval.report import markdown_summary
from ttscale.sampling.params import SamplingParams
from ttscale.tts.hygiene import Hygiene

if TYPE_CHECKING:
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
    model_source: str,
    task: Task,
    params: SamplingParams,
    seed: int,
    scorer_spec: str,
    search: SearchConfig | None = None,
    hygiene: Hygiene | None = None,
    numerics: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The settings records depend on. `model_source` is `LLM.source` (the CLI resolves it
    before loading, so a mismatch costs no load); `numerics` the LLM's non-default `dtype` /
    `quantize` (default runs keep their settings). Not included: n_problems (a run can be
    extended), the strategies (added one by one), concurrency (per-request seeds make samples
    independent of the batch) and engine memory options."""
    settings = {
        "model": str(model_source),
        "task": task_identity(task),
        "seed": seed,
        "params": dataclasses.asdict(params),
        "scorer": scorer_spec,
    }
    if search is not None:
        settings["search"] = dataclasses.asdict(search)
    if hygiene is not None and hygiene != Hygiene():
        settings["hygiene"] = dataclasses.asdict(hygiene)  # default runs keep their settings
    if numerics:
        settings["numerics"] = dict(numerics)
    return jsonable(settings)


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def check_out_dir(out_dir: Path, settings: dict[str, Any]) -> bool:
    """Reads only: raises SettingsMismatch when the folder's results were made with other
    settings; returns whether it has a run.json (False: a new run)."""
    run_path, records_path = out_dir / RUN_FILE, out_dir / RECORDS_FILE
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
        return True
    if records_path.exists() and records_path.stat().st_size:
        raise SettingsMismatch(
            f"{records_path} exists without {RUN_FILE}, so its settings are unknown; "
            "use another output folder, or --no-resume to start over"
        )
    return False


def prepare_out_dir(out_dir: Path, settings: dict[str, Any], resume: bool) -> None:
    """Checks (or starts) the folder's run.json. With ``resume=False`` earlier results are
    deleted; with ``resume=True`` other settings are refused rather than mixed in."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        for name in (RUN_FILE, RECORDS_FILE, SUMMARY_JSON, SUMMARY_MD):
            (out_dir / name).unlink(missing_ok=True)
    if check_out_dir(out_dir, settings):
        return
    run_path = out_dir / RUN_FILE
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
    session: str | None = None,
) -> dict[str, Any]:
    """One JSON-ready line: the problem, every candidate judged, the choice, and its cost.

    ``wall_time`` is the session's own time, which overlaps other problems of its chunk;
    ``amortized_time`` (chunk time / chunk size) adds up to the real elapsed time.
    ``session`` names the run (its start time) that measured them: times taken in different
    sessions were taken under different machine load, which the summary points out.
    """
    candidates = [
        {
            "text": c.text,
            "answer": c.answer,
            "score": finite_or_none(c.score),
            "tokens": c.tokens,
            "finish_reason": c.finish_reason,
            "dropped": c.dropped,
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
        **({} if session is None else {"session": session}),
        "extra": jsonable(result.extra),
    }


# ---- summary files ----------------------------------------------------------------------------


def write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    (out_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out_dir / SUMMARY_MD).write_text(markdown_summary(summary), encoding="utf-8")


__all__ = [
    "BASE_STATS",
    "COST_FIELDS",
    "RECORDS_FILE",
    "RUN_FILE",
    "SUMMARY_JSON",
    "SUMMARY_MD",
    "SettingsMismatch",
    "check_out_dir",
    "finite_or_none",
    "jsonable",
    "load_records",
    "make_record",
    "prepare_out_dir",
    "run_settings",
    "stats_fields",
    "task_identity",
    "write_summary",
]
