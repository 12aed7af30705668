"""The shared interface of test-time scaling strategies (their spec strings are parsed by
`ttscale.strategy_spec`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from ttscale.sampling.params import SamplingParams
from ttscale.scorers.base import ScoreContext, Scorer, aggregate, path_scores
from ttscale.tts.events import Scored
from ttscale.tts.hygiene import Hygiene, Verdict, drop_counts, is_degenerate, judge
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
    hygiene: Hygiene = field(default_factory=Hygiene)


@dataclass
class Candidate:
    text: str
    answer: str | None  # as it voted / was selected: None if excluded (see `dropped`)
    score: float | None
    tokens: int
    finish_reason: str | None
    dropped: str | None = None  # why it could not vote: truncated | degenerate | no_answer
    seq_id: int | None = None  # the engine sequence it was (names it in run events)


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
    # Whether the scorer sees unfinished reasoning (search steps) or only finished candidates.
    scores_partial_paths = True

    def __init__(self, spec: str, sampling: dict[str, float] | None = None) -> None:
        self.spec = spec
        # Sampling controls that belong to the strategy (`majority@16:t=0.5`): they override
        # the query's, since the best temperature depends on how samples are combined.
        self.sampling_overrides = dict(sampling or {})

    def solve(self, session: Session, query: Query) -> SolveGen:
        raise NotImplementedError

    # ---- helpers shared by the families --------------------------------------------------

    def sampling(self, query: Query, **overrides) -> SamplingParams:
        """The query's sampling controls under the strategy's own, with logprobs on (scorers
        and reports use them)."""
        merged = {**self.sampling_overrides, **overrides}
        return dataclasses.replace(query.params, logprobs=0, n=1, **merged)

    def step_params(self, query: Query) -> SamplingParams:
        s = query.search
        return self.sampling(
            query,
            # A step never outruns the whole answer's budget (is_final checks the total).
            max_tokens=min(s.max_step_tokens, query.params.max_tokens),
            stop=(*query.params.stop, s.step_delimiter),
            include_stop_str_in_output=True,
        )

    def scorer_needs(self, query: Query) -> tuple[bool, tuple[int, ...] | None]:
        """(retain, hidden_layers) the scorer wants its branches sampled with: a probe reads
        hidden states kept while generating, plus one row over the branch's retained KV."""
        scorer = query.scorer if self.needs_scorer else None
        # Only probes want anything, and what depends on whether they see partial paths.
        needs = getattr(scorer, "needs", None)
        return needs(self.scores_partial_paths) if needs is not None else (False, None)

    def score(
        self, session: Session, query: Query, branches: list[Branch]
    ) -> Generator[Wait, None, list[float]]:
        """Scores branches (their latest step) and records the scores on them."""
        if query.scorer is None:
            raise ValueError(f"strategy {self.spec} needs a scorer")
        ctx = ScoreContext(
            query.question, session, query.extract, lambda b: self.is_final(b, query)
        )
        scores = yield from query.scorer.score(ctx, branches)
        for b, s in zip(branches, scores, strict=True):
            b.scores.append(float(s))
        if session.observer is not None:
            for b, s in zip(branches, scores, strict=True):
                session.observer(Scored(b.seq_id, float(s)))
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
    def prune_loops(
        session: Session, query: Query, live: list[Branch], finished: list[Branch]
    ) -> list[Branch]:
        """Stops growing branches stuck in a repetition loop (they join `finished`, where
        hygiene excludes them), unless that would leave nothing to grow."""
        if not query.hygiene.enabled:
            return live
        prompt_len = len(query.prompt_token_ids)
        looping = [b for b in live if is_degenerate(b.token_ids[prompt_len:], query.hygiene)]
        if not looping or len(looping) == len(live):
            return live
        finished += looping
        session.drop(looping)
        return [b for b in live if b not in looping]

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

    def verdicts(self, query: Query, branches: list[Branch]) -> list[Verdict]:
        """What each candidate counts for under the query's hygiene: cut-off (length limit or
        out of search depth mid-step) and looping candidates are excluded."""
        prompt_len = len(query.prompt_token_ids)
        return [
            judge(
                b.text,
                b.token_ids[prompt_len:],
                self.truncated(b, query),
                query.extract,
                query.hygiene,
            )
            for b in branches
        ]

    @staticmethod
    def truncated(branch: Branch, query: Query) -> bool:
        """Cut off rather than finished: stopped by a length limit, or a search step that
        ended at its delimiter but was never continued."""
        if branch.finish_reason == "length":
            return True
        return branch.finish_reason == "stop" and branch.stop_reason == query.search.step_delimiter

    def best_kept(
        self, query: Query, branches: list[Branch], verdicts: list[Verdict]
    ) -> Branch | None:
        """The highest-scoring candidate that may be selected; ties go to the earliest."""
        kept = [i for i, v in enumerate(verdicts) if v.kept]
        if not kept:
            return None
        return branches[max(kept, key=lambda i: (self.path_score(branches[i], query), -i))]

    def result(
        self,
        query: Query,
        chosen: Branch | None,
        pool: list[Branch],
        stats: SessionStats,
        votes: dict[str, float] | None = None,
        scored: bool = True,
        verdicts: list[Verdict] | None = None,
        tied: list[str] | None = None,
        **extra: object,
    ) -> StrategyResult:
        """The result over `pool`; `chosen` None means no candidate could be selected (all
        were excluded: the result says so and answers nothing)."""
        prompt_len = len(query.prompt_token_ids)
        verdicts = verdicts if verdicts is not None else self.verdicts(query, pool)
        candidates = [
            Candidate(
                text=b.text,
                answer=v.answer,
                score=self.path_score(b, query) if scored and b.scores else None,
                tokens=b.num_tokens - prompt_len,
                finish_reason=b.finish_reason,
                dropped=v.dropped,
                seq_id=b.seq_id,
            )
            for b, v in zip(pool, verdicts, strict=True)
        ]
        answer = None
        if chosen is not None:
            in_pool = [v for b, v in zip(pool, verdicts, strict=True) if b is chosen]
            answer = (in_pool or self.verdicts(query, [chosen]))[0].answer
        info: dict[str, object] = {"dropped": drop_counts(verdicts)}
        if not any(v.kept for v in verdicts):
            info["no_finished"] = True
        if tied is not None and len(tied) > 1:
            info["tie"], info["tied"] = True, list(tied)
        return StrategyResult(
            strategy=self.spec,
            answer=answer,
            text=chosen.text if chosen is not None else "",
            candidates=candidates,
            votes=votes or {},
            stats=stats,
            extra={**info, **extra},
        )
