"""Self-certainty from the generating model itself: no extra model, no extra compute."""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence

from ttscale.scorers.base import ScoreContext
from ttscale.tts.session import Branch, Wait


class MeanLogprobScorer:
    """exp(mean log p) of the tokens the model sampled: its geometric-mean confidence, in
    (0, 1]. Long answers are not penalized for length, unlike the summed logprob. For a step,
    the step's tokens; the generation must request logprobs (the strategies do)."""

    name = "logprob"

    def score(
        self, ctx: ScoreContext, branches: Sequence[Branch]
    ) -> Generator[Wait, None, list[float]]:
        scores = []
        for b in branches:
            lps = b.step_logprobs
            scores.append(math.exp(sum(lps) / len(lps)) if lps else 0.0)
        yield from ()  # no engine work; a generator like every scorer
        return scores
