"""Strategies that sample complete answers, then select: greedy, sample, majority@N (self-
consistency, Wang et al. 2022), weighted@N (score-weighted vote), bon@N (best-of-N)."""

from __future__ import annotations

from ttscale.strategies.base import Query, SolveGen, Strategy
from ttscale.tts.session import Branch, Session
from ttscale.tts.votes import vote_with_ties


class SampleThenSelect(Strategy):
    """N independent samples of the prompt (prefilled once, forked N ways), then one rule:

    - `first`: the only sample (greedy, sample)
    - `majority`: most frequent normalized answer
    - `weighted`: answer with the largest sum of scores
    - `best`: the sample with the highest score
    """

    def __init__(
        self,
        spec: str,
        n: int,
        select: str,
        greedy: bool = False,
        sampling: dict[str, float] | None = None,
    ) -> None:
        super().__init__(spec, sampling)
        self.n, self.select, self.greedy = n, select, greedy
        self.needs_scorer = select in ("weighted", "best")
        self.scores_partial_paths = False  # only finished samples are ever scored

    def solve(self, session: Session, query: Query) -> SolveGen:
        params = self.sampling(query, temperature=0.0) if self.greedy else self.sampling(query)
        retain, layers = self.scorer_needs(query)
        branches = yield from session.sample(self.n, params, retain=retain, hidden_layers=layers)
        verdicts = self.verdicts(query, branches)
        # Only candidates that may be selected are scored: a verifier's verdict on cut-off or
        # looping text is not wanted, and skipping them saves its compute.
        kept = [i for i, v in enumerate(verdicts) if v.kept]
        scores: list[float | None] | None = None
        if self.needs_scorer and kept:
            kept_scores = yield from self.score(session, query, [branches[i] for i in kept])
            scores = [None] * len(branches)
            for i, s in zip(kept, kept_scores, strict=True):
                scores[i] = s
        votes: dict[str, float] = {}
        tied: list[str] | None = None
        chosen: Branch | None
        if self.select == "first":
            chosen = branches[0]
        elif self.select == "best":
            chosen = self.best_kept(query, branches, verdicts) if scores is not None else None
        else:
            answers = [v.answer for v in verdicts]
            weights = None
            if self.select == "weighted" and scores is not None:
                weights = [0.0 if s is None else s for s in scores]
            winner, votes, tied = vote_with_ties(answers, weights, scores)
            # Report the best-scored (else first) candidate that gave the winning answer.
            backers = [i for i, a in enumerate(answers) if winner is not None and a == winner]
            chosen = None
            if backers:
                rank = (lambda i: (scores[i] or 0.0, -i)) if scores else (lambda i: -i)
                chosen = branches[max(backers, key=rank)]
        return self.result(
            query,
            chosen,
            branches,
            session.close(),
            votes,
            scored=scores is not None,
            verdicts=verdicts,
            tied=tied,
        )
