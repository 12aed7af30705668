"""adaptive@Nmax: self-consistency that stops sampling once the vote is decided.

Adaptive-Consistency (Aggarwal et al., 2023): sample in waves; after each wave, with a the
leader's votes and b the runner-up's, the posterior of "the leader is the true mode" under a
Beta(a+1, b+1) is P(p > 1/2) = 1 - I_{1/2}(a+1, b+1). Stop when it reaches `confidence`. Easy
problems stop after one wave; contested ones spend up to Nmax samples.
"""

from __future__ import annotations

from ttscale.strategies.base import Query, SolveGen, Strategy
from ttscale.tts.hygiene import Verdict
from ttscale.tts.session import Branch, Session
from ttscale.tts.votes import vote_with_ties


class AdaptiveConsistency(Strategy):
    def __init__(
        self,
        spec: str,
        n_max: int,
        wave: int = 4,
        confidence: float = 0.95,
        sampling: dict[str, float] | None = None,
    ) -> None:
        super().__init__(spec, sampling)
        self.n_max, self.wave, self.confidence = n_max, min(wave, n_max), confidence

    def solve(self, session: Session, query: Query) -> SolveGen:
        branches: list[Branch] = []
        verdicts: list[Verdict] = []
        waves = 0
        stop_prob = 0.0
        kept: Branch | None = None  # a first-wave sample whose KV holds the prompt
        while len(branches) < self.n_max:
            size = min(self.wave, self.n_max - len(branches))
            seed = query.params.seed
            # Each wave is a new request; shift the seed so waves draw different samples.
            params = self.sampling(query, seed=None if seed is None else seed + 7919 * waves)
            more = len(branches) + size < self.n_max  # a later wave may follow
            # Later waves start on the kept sample's KV of the prompt: the prefix cache alone
            # would serve only the prompt's full blocks and recompute its partial last block
            # on every wave.
            new = yield from session.sample(size, params, retain=more and kept is None, prefix=kept)
            if more and kept is None:
                kept = new[0]
                session.drop(new[1:])  # their text is recorded; their KV is not needed
            waves += 1
            branches += new
            verdicts += self.verdicts(query, new)
            stop_prob = self.decided([v.answer for v in verdicts])
            if stop_prob >= self.confidence:
                break
        answers = [v.answer for v in verdicts]
        winner, votes, tied = vote_with_ties(answers)
        chosen = next((b for b, a in zip(branches, answers, strict=True) if a == winner), None)
        return self.result(
            query,
            chosen,
            branches,
            session.close(),
            votes,
            scored=False,
            verdicts=verdicts,
            tied=tied,
            waves=waves,
            samples=len(branches),
            stop_probability=stop_prob,
        )

    @staticmethod
    def decided(answers: list[str | None]) -> float:
        """P(leader is the majority answer) under the Beta posterior of leader vs runner-up."""
        counts = sorted((answers.count(a) for a in set(answers) if a is not None), reverse=True)
        if not counts:
            return 0.0
        from scipy.stats import beta  # imported here: scipy.stats costs ~0.5 s to import

        a = counts[0]
        b = counts[1] if len(counts) > 1 else 0
        return float(beta.sf(0.5, a + 1, b + 1))
