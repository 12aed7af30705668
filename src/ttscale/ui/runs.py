"""The eval folders under a root (`ttscale eval --out ROOT/NAME`), read for the Runs page.

Read-only: a folder an eval is still writing is read as it stands (a last line cut off
mid-write is skipped, never cut from the file as resuming does). A folder is named by its
path under the root; names come from listing the root, never from joining a request's text
to a path.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request

from ttscale.eval.store import RECORDS_FILE, RUN_FILE, SUMMARY_JSON
from ttscale.eval.summary import summarize_records

_MAX_DEPTH = 3  # folders below the root searched for runs


def find_runs(root: Path) -> dict[str, Path]:
    """name (path under root, '/'-separated; '.' for the root itself) -> folder, for every
    folder up to _MAX_DEPTH deep that holds records or a summary."""
    found: dict[str, Path] = {}
    if not root.is_dir():
        return found

    def visit(folder: Path, depth: int) -> None:
        if (folder / RECORDS_FILE).is_file() or (folder / SUMMARY_JSON).is_file():
            name = folder.relative_to(root).as_posix()
            found[name] = folder
        if depth < _MAX_DEPTH:
            for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
                if not sub.name.startswith("."):
                    visit(sub, depth + 1)

    visit(root, 0)
    return found


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a records.jsonl, first per (strategy, problem), skipping lines that do not
    parse (a line being written now)."""
    if not path.is_file():
        return []
    records, seen = [], set()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or "strategy" not in rec or "problem_id" not in rec:
            continue
        key = (rec["strategy"], rec["problem_id"])
        if key not in seen:
            seen.add(key)
            records.append(rec)
    return records


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def run_summary(folder: Path) -> dict[str, Any]:
    """Settings and per-strategy summary of one folder: summary.json when it is at least as
    new as the records, else computed from the records (an eval still running)."""
    records_path, summary_path = folder / RECORDS_FILE, folder / SUMMARY_JSON
    settings = _read_json(folder / RUN_FILE).get("settings", {})
    fresh = summary_path.is_file() and (
        not records_path.is_file() or summary_path.stat().st_mtime >= records_path.stat().st_mtime
    )
    if fresh:
        summary = _read_json(summary_path)
        strategies = summary.get("strategies", [])
        n_problems = summary.get("n_problems")
        settings = summary.get("settings", settings)
    else:
        records = read_records(records_path)
        strategies = summarize_records(records)
        n_problems = len({r["problem_id"] for r in records})
    params = settings.get("params", {})
    task = settings.get("task", {})
    mtime = max((p.stat().st_mtime for p in folder.iterdir() if p.is_file()), default=0.0)
    return {
        "task": task.get("name") if isinstance(task, dict) else task,
        "model": Path(str(settings.get("model", ""))).name or None,
        "scorer": settings.get("scorer"),
        "max_tokens": params.get("max_tokens") if isinstance(params, dict) else None,
        "n_problems": n_problems,
        "strategies": strategies,
        "ceiling": ceiling(strategies),
        "modified": mtime,
        "complete": fresh,
    }


def ceiling(strategies: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The pass@N ceiling: the largest share of problems any strategy had a right candidate
    for (its coverage). No selection rule over those candidates can score above it."""
    best = max(
        (s for s in strategies if s.get("coverage") is not None),
        key=lambda s: (s["coverage"], s.get("mean_candidates") or 0),
        default=None,
    )
    if best is None:
        return None
    return {"coverage": best["coverage"], "strategy": best["strategy"]}


def compare(folder_a: Path, folder_b: Path) -> list[dict[str, Any]]:
    """Per shared strategy: accuracy difference on shared problems with a paired interval and
    McNemar's p (`ttscale.eval.compare`), and cost ratios B / A."""
    from ttscale.eval.compare import compare_runs

    a, b = read_records(folder_a / RECORDS_FILE), read_records(folder_b / RECORDS_FILE)
    try:
        rows = compare_runs(a, b, n_boot=2000)
    except ValueError as e:
        raise HTTPException(400, str(e)) from None
    return [dataclasses.asdict(r) for r in rows]


def _root(request: Request) -> Path:
    return Path(getattr(request.app.state, "ui_runs_dir", "runs"))


def _folder(request: Request, name: str) -> Path:
    folder = find_runs(_root(request)).get(name)
    if folder is None:
        raise HTTPException(404, f"no eval run {name!r} under {_root(request)}")
    return folder


def runs_router() -> APIRouter:
    """GET /v1/ttscale/eval-runs (every run under the app's `ui_runs_dir`, default ./runs),
    GET /v1/ttscale/eval-runs/detail?name=N, GET /v1/ttscale/eval-runs/compare?a=A&b=B."""
    router = APIRouter(prefix="/v1/ttscale/eval-runs", tags=["dashboard"])
    # Plain `def` handlers: FastAPI runs them on its thread pool, so reading folders and
    # summarizing records (maj@k sampling) never stalls the event loop (live streams).

    @router.get("")
    def list_runs(request: Request) -> dict[str, Any]:
        root = _root(request)
        runs = []
        for name, folder in find_runs(root).items():
            runs.append({"name": name, **run_summary(folder)})
        runs.sort(key=lambda r: -r["modified"])
        return {"root": str(root), "runs": runs}

    @router.get("/detail")
    def detail(request: Request, name: str) -> dict[str, Any]:
        return {"name": name, **run_summary(_folder(request, name))}

    @router.get("/compare")
    def compare_two(request: Request, a: str, b: str) -> dict[str, Any]:
        rows = compare(_folder(request, a), _folder(request, b))
        return {"a": a, "b": b, "strategies": rows}

    return router


__all__ = ["ceiling", "compare", "find_runs", "read_records", "run_summary", "runs_router"]
