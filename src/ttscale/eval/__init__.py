"""Evaluation metrics (pass@k, majority vote, maj@k, accuracy summaries), the evaluation
harness (`run_eval`) and its reports (tables, Pareto plot)."""

from __future__ import annotations

import importlib
from typing import Any

from ttscale.eval.metrics import (
    maj_at_k,
    majority_vote,
    pass_at_k,
    summarize,
    wilson_interval,
)

# Lazy exports (PEP 562): strategies import ttscale.eval.metrics, and the harness imports
# strategies; loading the harness here eagerly would make that a cycle (and pull in torch).
_EXPORTS = {
    "run_eval": "harness",
    "load_records": "store",
    "summarize_records": "summary",
    "SettingsMismatch": "store",
    "pareto_plot": "report",
    "pareto_frontier": "report",
    "print_summary": "report",
    "summary_table": "report",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"ttscale.eval.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'ttscale.eval' has no attribute {name!r}")


__all__ = [
    "SettingsMismatch",
    "load_records",
    "maj_at_k",
    "majority_vote",
    "pareto_frontier",
    "pareto_plot",
    "pass_at_k",
    "print_summary",
    "run_eval",
    "summarize",
    "summarize_records",
    "summary_table",
    "wilson_interval",
]
