"""Strategies that sample complete answers, then select: greedy, sample, majority@N (self-
consistency, Wang et al. 2022), weighted@N (score-weighted vote), bon@N (best-of-N)."""

from __future__ import annotations

from ttscale.strategies.base import Query, SolveGen, Strategy
from ttscale.tts.session import Session
from ttscale.tts.votes import majority_vote


class SampleThenSelect(Strategy):
    """N independent samples of the prompt (prefilled once, forked N ways), then one rule:

    - `first`: the only sample (greedy, sample)
    - `majority`: most frequent normalized answer
    - `weighted`: answer with the largest sum of scores
    - `best`: the sample with the highest score
    """

    def __init__(self, spec: str, n: int, select: str, greedy: bool = False) -> None:
        super().__init__(spec)
        self.n, self.select, self.greedy = n, select, greedy
        self.needs_scorer = select in ("weighted", "best")

    def solve(self, session: Session, query: Query) -> SolveGen:
        params = self.sampling(query, temperature=0.0) if self.greedy else self.sampling(query)
        branches = yield from session.sample(self.n, params)
        answers = [query.extract(b.text) for b in branches]
        scores: list[float] | None = None
        if self.needs_scorer:
            scores = yield from self.score(session, query, branches)
        votes: dict[str, float] = {}
        if self.select == "first":
            chosen = branches[0]
        elif self.select == "best":
            chosen = branches[max(range(len(branches)), key=lambda i: scores[i])]
        else:
            weights = scores if self.select == "weighted" else None
            winner, votes = majority_vote(answers, weights)
            # Report the first sample that gave the winning answer as the chosen text.
            chosen = next((b for b, a in zip(branches, answers, strict=True) if a == winner), None)
            if chosen is None:
                chosen = branches[0]
        return self.result(query, chosen, branches, session.close(), votes, scored=bool(scores))
