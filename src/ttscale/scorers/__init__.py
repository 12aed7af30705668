"""Scorers (verifiers) by name: logprob, judge, oracle, or a reward-model folder path."""

from __future__ import annotations

from ttscale.scorers.base import AGGREGATIONS, ScoreContext, Scorer, aggregate, path_scores
from ttscale.scorers.confidence import MeanLogprobScorer
from ttscale.scorers.judge import JudgeScorer
from ttscale.scorers.oracle import OracleScorer


def load_scorer(spec: str) -> Scorer:
    """`logprob` | `judge` | `rm:PATH` (a local sequence-classification checkpoint)."""
    if spec == "logprob":
        return MeanLogprobScorer()
    if spec == "judge":
        return JudgeScorer()
    if spec.startswith("rm:"):
        from ttscale.scorers.reward_model import RewardModelScorer

        return RewardModelScorer(spec[3:])
    raise ValueError(f"unknown scorer {spec!r}: use logprob, judge or rm:PATH")


__all__ = [
    "AGGREGATIONS",
    "JudgeScorer",
    "MeanLogprobScorer",
    "OracleScorer",
    "ScoreContext",
    "Scorer",
    "aggregate",
    "load_scorer",
    "path_scores",
]
