"""Evaluation: metrics (pass@k, maj@k, Wilson intervals, accuracy summaries) exported here;
the harness (`ttscale.eval.harness.run_eval`), its record store and summaries, the reports
(tables, Pareto plot) and the comparison of two runs (`compare.py`) are imported from their
own modules, as they need the task and plotting stacks. Votes are counted in
`ttscale.tts.votes`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ttscale.eval.metrics import maj_at_k, pass_at_k, summarize, wilson_interval

__all__ = ["maj_at_k", "pass_at_k", "summarize", "wilson_interval"]


def __getattr__(name: str) -> Any:
    # Loaded on first use (PEP 562), for speed as in ttscale/__init__.py, not for a cycle:
    # metrics count votes with ttscale.tts, whose package imports the engine and torch, and
    # `ttscale --help` imports ttscale.eval.cli (the shared options), which must stay light.
    if name in __all__:
        from ttscale.eval import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module 'ttscale.eval' has no attribute {name!r}")
