"""Step-level search over reasoning steps, on engine forks (Snell et al. 2024; Beeching et al.,
"search-and-learn", 2024).

A step ends at the delimiter (default a blank line). Expanding a branch forks its sequence:
children share every KV block of the path so far and only write their own new blocks. Unlike
vLLM's beam search, every sampling control of the request (temperature, top-p, min-p...) is
kept: beams are sampled, then selected by a verifier.
"""

from __future__ import annotations

from ttscale.errors import StrategySpecError
from ttscale.strategies.base import Query, SolveGen, Strategy
from ttscale.tts.session import Branch, Session


class LevelSearch(Strategy):
    """Level-by-level search over N branches (beam, tree): sample N first steps, then per
    level score, collect the finished, and let `expansions` pick which live branches to fork
    and how many times; the rest are dropped. The answer is the best finished branch."""

    needs_scorer = True
    n: int  # the width, set by the subclass

    def expansions(
        self, live: list[Branch], query: Query, width: int, stats: dict[str, list]
    ) -> list[tuple[Branch, int]]:
        """(branch, forks) for this level; `width` is how many leaves may still grow."""
        raise NotImplementedError

    def solve(self, session: Session, query: Query) -> SolveGen:
        params = self.step_params(query)
        _, layers = self.scorer_needs(query)
        active = yield from session.sample(self.n, params, retain=True, hidden_layers=layers)
        finished: list[Branch] = []
        stats: dict[str, list] = {}
        depth = 1
        while True:
            yield from self.score(session, query, active)
            live = self.harvest(session, query, active, finished, depth, width=self.n)
            live = self.prune_loops(session, query, live, finished)
            if not live:
                break
            chosen = self.expansions(live, query, self.n - len(finished), stats)
            kept = {id(b) for b, _ in chosen}
            session.drop(b for b in live if id(b) not in kept)
            active = yield from session.expand(chosen, params)
            depth += 1
        verdicts = self.verdicts(query, finished)
        best = self.best_kept(query, finished, verdicts)
        return self.result(
            query, best, finished, session.close(), verdicts=verdicts, depth=depth, **stats
        )


class _WidthSplit(Strategy):
    """N branches split into groups of M (beam@N/M, dvts@N/M)."""

    needs_scorer = True

    def __init__(self, spec: str, n: int, m: int, sampling: dict[str, float] | None = None) -> None:
        super().__init__(spec, sampling)
        if n % m:
            raise StrategySpecError(f"strategy {spec!r}: N must be a multiple of M")
        self.n, self.m = n, m


class BeamSearch(_WidthSplit, LevelSearch):
    """beam@N/M: N active beams; each level keep the best N/M by score and fork each M times.
    Beams that finish are collected; the answer is the best finished beam."""

    def expansions(
        self, live: list[Branch], query: Query, width: int, stats: dict[str, list]
    ) -> list[tuple[Branch, int]]:
        live = sorted(live, key=lambda b: self.path_score(b, query), reverse=True)
        return [(b, self.m) for b in live[: max(1, self.n // self.m)]]


class DiverseVerifierTreeSearch(_WidthSplit):
    """dvts@N/M: N/M independent subtrees of width M. Inside each subtree, search is greedy
    by score: keep the best of its M children, fork it M times. Independence keeps the N
    samples from collapsing onto one high-scoring path (Beeching et al. 2024)."""

    def solve(self, session: Session, query: Query) -> SolveGen:
        params = self.step_params(query)
        _, layers = self.scorer_needs(query)
        first = yield from session.sample(self.n, params, retain=True, hidden_layers=layers)
        subtrees = [first[i : i + self.m] for i in range(0, self.n, self.m)]
        finished: list[Branch] = []
        depth = 1
        while subtrees:
            yield from self.score(session, query, [b for t in subtrees for b in t])
            expand: list[tuple[Branch, int]] = []
            for tree in subtrees:
                tree.sort(key=lambda b: self.path_score(b, query), reverse=True)
                best = tree[0]
                session.drop(tree[1:])
                if self.is_final(best, query) or depth >= query.search.max_depth:
                    finished.append(best)  # the subtree is done
                    session.drop([best])
                else:
                    expand.append((best, self.m))
            if not expand:
                break
            children = yield from session.expand(expand, params)
            subtrees = [children[i : i + self.m] for i in range(0, len(children), self.m)]
            depth += 1
        verdicts = self.verdicts(query, finished)
        best = self.best_kept(query, finished, verdicts)
        return self.result(query, best, finished, session.close(), verdicts=verdicts, depth=depth)
