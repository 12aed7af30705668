"""Scorers (verifiers) by name: logprob, likelihood, judge, probe, or a reward-model folder."""

from __future__ import annotations

from pathlib import Path

from ttscale.scorers.base import AGGREGATIONS, ScoreContext, Scorer, aggregate, path_scores
from ttscale.scorers.confidence import MeanLogprobScorer
from ttscale.scorers.judge import JudgeScorer
from ttscale.scorers.likelihood import AnswerLikelihoodScorer
from ttscale.scorers.oracle import OracleScorer

SCORER_SPECS = ("logprob", "likelihood", "judge", "probe", "probe:PATH", "rm:PATH")


def load_scorer(spec: str, model_source: str | Path | None = None) -> Scorer:
    """`logprob` | `likelihood` (the policy's P(answer | bare question)) | `judge` |
    `probe` (the probe shipped for the embedded model) |
    `probe:PATH` (a probe folder from `ttscale train-verifier`) | `rm:PATH` (a local reward
    model). With `model_source` (`LLM.source`), a probe made for another model is refused."""
    if spec == "logprob":
        return MeanLogprobScorer()
    if spec == "likelihood":
        return AnswerLikelihoodScorer()
    if spec == "judge":
        return JudgeScorer()
    if spec == "probe" or spec.startswith("probe:"):
        from ttscale.scorers.probe import ProbeScorer

        return ProbeScorer.load(spec[6:] or None, model_source)
    if spec.startswith("rm:"):
        from ttscale.scorers.reward_model import RewardModelScorer

        return RewardModelScorer(spec[3:])
    raise ValueError(f"unknown scorer {spec!r}: use one of {', '.join(SCORER_SPECS)}")


__all__ = [
    "AGGREGATIONS",
    "SCORER_SPECS",
    "AnswerLikelihoodScorer",
    "JudgeScorer",
    "MeanLogprobScorer",
    "OracleScorer",
    "ScoreContext",
    "Scorer",
    "aggregate",
    "load_scorer",
    "path_scores",
]
