"""Evaluation: metrics (pass@k, maj@k, Wilson intervals, accuracy summaries) exported here;
the harness (`ttscale.eval.harness.run_eval`), its record store and summaries, and the reports
(tables, Pareto plot) are imported from their own modules, as they need the task and plotting
stacks. Votes are counted in `ttscale.tts.votes`."""

from __future__ import annotations

from ttscale.eval.metrics import maj_at_k, pass_at_k, summarize, wilson_interval

__all__ = ["maj_at_k", "pass_at_k", "summarize", "wilson_interval"]
