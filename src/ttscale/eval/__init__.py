"""Evaluation metrics (pass@k, majority vote, maj@k, accuracy summaries)."""

from __future__ import annotations

from ttscale.eval.metrics import (
    maj_at_k,
    majority_vote,
    pass_at_k,
    summarize,
    wilson_interval,
)

__all__ = ["maj_at_k", "majority_vote", "pass_at_k", "summarize", "wilson_interval"]
