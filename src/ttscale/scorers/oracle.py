"""The task's own checker as a scorer: for measuring coverage (pass@k), never for selection
in deployment, where no reference answer exists."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence

from ttscale.scorers.base import ScoreContext
from ttscale.tts.session import Branch, Wait


class OracleScorer:
    name = "oracle"

    def __init__(self, is_correct: Callable[[str], bool]) -> None:
        self.is_correct = is_correct  # completion text -> correct?

    def score(
        self, ctx: ScoreContext, branches: Sequence[Branch]
    ) -> Generator[Wait, None, list[float]]:
        yield from ()  # no engine work; a generator like every scorer
        return [1.0 if self.is_correct(b.text) else 0.0 for b in branches]
