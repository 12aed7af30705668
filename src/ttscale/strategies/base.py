"""The shared interface of test-time scaling strategies (their spec strings are parsed by
`ttscale.strategy_spec`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from ttscale.sampling.params import SamplingParams
from ttscale.scorers.base import ScoreContext, Scorer, aggregate, path_scores
from ttscale.tts.session import Branch, Session, SessionStats, Wait


@dataclass(frozen=True)
class SearchConfig:
    """How step-level strategies cut and bound reasoning."""

    step_delimiter: str = "\n\n"  # a step ends at a blank line (as in search-and-learn)
    max_step_tokens: int = 96
    max_depth: int = 10
    aggregation: str = "last"  # how a path's step scores combine: min | last | product | mean

    def __post_init__(self) -> None:
        if not self.step_delimiter:
            raise ValueError("step_delimiter must be non-empty")
        if self.max_step_tokens < 1 or self.max_depth < 1:
            raise ValueError("max_step_tokens and max_depth must be >= 1")


@dataclass
class Query:
    """What a strategy is told about one query. `extract` maps a completion to its
    normalized final answer (None if it gives none)."""

    question: str
    prompt_token_ids: list[int]
    extract: Callable[[str], str | None]
    params: SamplingParams  # sampling controls (temperature, top-p, min-p...) and max_tokens
    scorer: Scorer | None = None
    search: SearchConfig = field(default_factory=SearchConfig)


@dataclass
class Candidate:
    text: str
    answer: str | None
    score: float | None
    tokens: int
    finish_reason: str | None


@dataclass
class StrategyResult:
    strategy: str
    answer: str | None
    text: str
    candidates: list[Candidate]
    votes: dict[str, float]
    stats: SessionStats
    extra: dict[str, object] = field(default_factory=dict)


SolveGen = Generator[Wait, None, StrategyResult]


class Strategy:
    """A named way of spending inference compute on one query.

    `solve` is a generator: it yields `Wait`s for engine work and returns a StrategyResult.
    Subclasses set `needs_scorer` when they select by score.
    """

    name = "strategy"
    needs_scorer = False

    def __init__(self, spec: str) -> None:
        self.spec = spec

    def solve(self, session: Session, query: Query) -> SolveGen:
        raise NotImplementedError

    # ---- helpers shared by the families --------------------------------------------------

    @staticmethod
    def sampling(query: Query, **overrides) -> SamplingParams:
        """The query's sampling controls, with logprobs on (scorers and reports use them)."""
        return dataclasses.replace(query.params, logprobs=0, n=1, **overrides)

    @staticmethod
    def step_params(query: Query) -> SamplingParams:
        s = query.search
        return Strategy.sampling(
            query,
            # A step never outruns the whole answer's budget (is_final checks the total).
            max_tokens=min(s.max_step_tokens, query.params.max_tokens),
            stop=(*query.params.stop, s.step_delimiter),
            include_stop_str_in_output=True,
        )

    def score(
        self, session: Session, query: Query, branches: list[Branch]
    ) -> Generator[Wait, None, list[float]]:
        """Scores branches (their latest step) and records the scores on them."""
        if query.scorer is None:
            raise ValueError(f"strategy {self.spec} needs a scorer")
        ctx = ScoreContext(query.question, session)
        scores = yield from query.scorer.score(ctx, branches)
        for b, s in zip(branches, scores, strict=True):
            b.scores.append(float(s))
        return scores

    def harvest(
        self,
        session: Session,
        query: Query,
        active: list[Branch],
        finished: list[Branch],
        depth: int,
        width: int,
    ) -> list[Branch]:
        """Moves the branches that are done from `active` to `finished` (freeing their KV)
        and returns the live ones; returns [] and moves every branch when the search must end
        (nothing live, `width` answers collected, or out of depth: unfinished ones compete)."""
        done = [b for b in active if self.is_final(b, query)]
        live = [b for b in active if not self.is_final(b, query)]
        finished += done
        session.drop(done)
        if not live or len(finished) >= width or depth >= query.search.max_depth:
            finished += live
            session.drop(live)
            return []
        return live

    @staticmethod
    def path_score(branch: Branch, query: Query) -> float:
        return aggregate(path_scores(branch), query.search.aggregation)

    @staticmethod
    def is_final(branch: Branch, query: Query) -> bool:
        """A branch is done when it ended for any reason but the step delimiter, or spent the
        whole token budget."""
        if branch.finish_reason == "stop" and branch.stop_reason != query.search.step_delimiter:
            return True
        generated = branch.num_tokens - len(query.prompt_token_ids)
        return generated >= query.params.max_tokens

    def result(
        self,
        query: Query,
        chosen: Branch | None,
        pool: list[Branch],
        stats: SessionStats,
        votes: dict[str, float] | None = None,
        scored: bool = True,
        **extra: object,
    ) -> StrategyResult:
        prompt_len = len(query.prompt_token_ids)
        candidates = [
            Candidate(
                text=b.text,
                answer=query.extract(b.text),
                score=self.path_score(b, query) if scored and b.scores else None,
                tokens=b.num_tokens - prompt_len,
                finish_reason=b.finish_reason,
            )
            for b in pool
        ]
        return StrategyResult(
            strategy=self.spec,
            answer=query.extract(chosen.text) if chosen is not None else None,
            text=chosen.text if chosen is not None else "",
            candidates=candidates,
            votes=votes or {},
            stats=stats,
            extra=dict(extra),
        )
