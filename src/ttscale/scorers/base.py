"""Verifiers: turn a candidate (a finished answer or a partial reasoning path) into a score.

Scorers are generators like strategies (`yield from scorer.score(...)`), because a judge needs
the engine. Outcome scorers score whole answers; process scorers score each step, and a path's
score aggregates its steps (min, last or product, as in the PRM literature).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Protocol

from ttscale.tts.session import Branch, Session, Wait

AGGREGATIONS = ("min", "last", "product", "mean")


@dataclass(frozen=True)
class ScoreContext:
    question: str
    session: Session
    # The task's answer extractor (text -> normalized answer or None), for scorers that judge
    # answers rather than text.
    extract: Callable[[str], str | None] | None = None
    # Whether a branch is a finished candidate (not a search step that ended at the step
    # delimiter): the strategy's rule. None: every branch that stopped is finished.
    is_final: Callable[[Branch], bool] | None = None

    def finished(self, branch: Branch) -> bool:
        if self.is_final is not None:
            return self.is_final(branch)
        return branch.finish_reason is not None


class Scorer(Protocol):
    name: str

    def score(
        self, ctx: ScoreContext, branches: Sequence[Branch]
    ) -> Generator[Wait, None, list[float]]:
        """One score per branch, higher is better; for a partial path, of its last step."""
        ...


def aggregate(step_scores: Sequence[float], how: str = "min") -> float:
    """A path's score from its steps' scores."""
    if not step_scores:
        return 0.0
    if how == "min":
        return min(step_scores)
    if how == "last":
        return step_scores[-1]
    if how == "product":
        return math.prod(step_scores)
    if how == "mean":
        return sum(step_scores) / len(step_scores)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}")


def path_scores(branch: Branch) -> list[float]:
    """Step scores from the root to this branch."""
    scores: list[float] = []
    node: Branch | None = branch
    while node is not None:
        scores[:0] = node.scores
        node = node.parent
    return scores
