"""The pilot: ``n`` judged samples per problem (plus directly measured strategies), and
:func:`run_wave`, which runs one strategy per problem in engine-sized chunks."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ttscale.eval.store import jsonable, task_identity
from ttscale.sampling.params import SamplingParams
from ttscale.strategies import make_strategy

if TYPE_CHECKING:
    from ttscale.llm import LLM
    from ttscale.strategies.base import StrategyResult
    from ttscale.tasks import Problem, Task
    from ttscale.tts.hygiene import Hygiene


@dataclass
class DirectRun:
    """One strategy run directly on one pilot problem (not estimable from samples)."""

    correct: bool
    covered: bool  # some candidate was correct: the strategy's own oracle ceiling
    n_candidates: int
    computed_prompt_tokens: int
    generated_tokens: int
    measured_time: float  # engine model time charged to the problem
    wall_time: float  # its share of the chunk's wall time


@dataclass
class PilotProblem:
    """The pilot's ``n`` samples of one problem, judged by the oracle."""

    id: str
    answers: list[str | None]
    correct: list[bool]
    tokens: list[int]  # generated tokens per sample
    prompt_tokens: int  # prompt length
    computed_prompt_tokens: int  # prompt tokens actually prefilled (cache misses)
    measured_time: float
    wall_time: float
    question: str = ""
    direct: dict[str, DirectRun] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def n_correct(self) -> int:
        return sum(map(bool, self.correct))

    @property
    def pass_rate(self) -> float:
        """p: the fraction of correct samples, the problem's difficulty (Snell et al.)."""
        return self.n_correct / self.n if self.n else 0.0

    @property
    def mean_tokens(self) -> float:
        return sum(self.tokens) / len(self.tokens) if self.tokens else 0.0

    @property
    def right_answers(self) -> set[str]:
        return {a for a, c in zip(self.answers, self.correct, strict=True) if c and a is not None}


@dataclass
class Pilot:
    """A pilot run: per-problem samples plus the settings needed to run the plan later."""

    problems: list[PilotProblem]
    n_samples: int
    seed: int
    params: dict[str, Any]
    task: dict[str, Any]
    model: str
    scorer: str = "logprob"
    concurrency: int = 8
    model_shape: dict[str, Any] | None = None
    block_size: int | None = None
    wall_seconds: float = 0.0

    @property
    def pass_rates(self) -> list[float]:
        return [p.pass_rate for p in self.problems]

    @property
    def measured(self) -> list[str]:
        """Strategies run directly on every pilot problem."""
        if not self.problems:
            return []
        specs = set.intersection(*(set(p.direct) for p in self.problems))
        return [s for s in self.problems[0].direct if s in specs]

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Pilot:
        problems = [
            PilotProblem(
                **{k: v for k, v in p.items() if k != "direct"},
                direct={s: DirectRun(**d) for s, d in p.get("direct", {}).items()},
            )
            for p in data["problems"]
        ]
        return cls(**{**data, "problems": problems})


def _split(total: float, weights: Sequence[float]) -> list[float]:
    """``total`` split in proportion to ``weights`` (evenly if they are all 0)."""
    s = sum(weights)
    if s <= 0:
        return [total / len(weights)] * len(weights)
    return [total * w / s for w in weights]


def run_wave(
    llm: LLM,
    task: Task,
    problems: Sequence[Problem],
    specs: Sequence[str],
    params: SamplingParams | Sequence[SamplingParams],
    *,
    scorer: str = "logprob",
    concurrency: int = 8,
    hygiene: Hygiene | None = None,
) -> list[tuple[StrategyResult, float]]:
    """Runs ``specs[i]`` on ``problems[i]`` (with ``params[i]`` if a list), ``concurrency``
    problems at once so different strategies batch together; returns ``(result, wall
    seconds)`` per problem. A chunk's wall time is split over its problems by the engine time
    charged to each, so the shares add up to the elapsed time."""
    from ttscale.strategies.api import make_query
    from ttscale.tts.session import Session, drive

    if len(specs) != len(problems):
        raise ValueError(f"{len(specs)} strategies for {len(problems)} problems")
    per_problem = [params] * len(problems) if isinstance(params, SamplingParams) else list(params)
    built = {s: make_strategy(s) for s in dict.fromkeys(specs)}
    the_scorer = None
    if any(s.needs_scorer for s in built.values()):
        from ttscale.scorers import load_scorer

        the_scorer = load_scorer(scorer, llm.source)
    out: list[tuple[StrategyResult, float]] = []
    for start in range(0, len(problems), concurrency):
        chunk = list(range(start, min(start + concurrency, len(problems))))
        jobs = []
        for i in chunk:
            strat = built[specs[i]]
            query = make_query(
                llm,
                problems[i].question,
                messages=task.prompt(problems[i]),
                extract=task.extract_answer,
                params=per_problem[i],
                scorer=the_scorer if strat.needs_scorer else None,
                hygiene=hygiene,
            )
            jobs.append(strat.solve(Session(llm.engine, query.prompt_token_ids), query))
        t0 = time.perf_counter()
        results: list[StrategyResult] = drive(llm.engine, jobs)  # type: ignore[assignment]
        wall = time.perf_counter() - t0
        shares = _split(wall, [r.stats.measured_time for r in results])
        out += zip(results, shares, strict=True)
    return out


def pilot(
    llm: LLM,
    task: Task,
    n_problems: int = 12,
    n_samples: int = 8,
    seed: int = 0,
    params: SamplingParams | None = None,
    *,
    measure: Sequence[str] = (),
    scorer: str = "logprob",
    concurrency: int = 8,
    log: Callable[[str], None] | None = None,
    hygiene: Hygiene | None = None,
) -> Pilot:
    """Samples ``n_samples`` answers to each of ``task.problems(n_problems, seed)`` with
    ``majority@n_samples`` and judges each sample; runs each strategy of ``measure`` (greedy,
    ``beam@N/M``...) directly on the same problems. ``params`` defaults to temperature 0.7,
    top-p 0.95, 128 tokens, ``seed``."""
    if n_problems < 1:
        raise ValueError("the pilot needs at least 1 problem")
    if n_samples < 2:
        raise ValueError("the pilot needs at least 2 samples per problem (to see agreement)")
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    measure = list(dict.fromkeys(s.strip() for s in measure if s.strip()))
    for spec in measure:
        make_strategy(spec)  # bad specs fail before any work
    if params is None:
        params = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=128, seed=seed)
    problems = task.problems(n_problems, seed)
    if not problems:
        raise ValueError(f"task {task.name!r} gave no problems")
    say = log or (lambda _msg: None)
    t0 = time.perf_counter()

    def wave(spec: str) -> list[tuple[StrategyResult, float]]:
        say(f"pilot: {spec} on {len(problems)} problems")
        # A cold prefix cache per strategy, as in the harness: one strategy's prompts must not
        # make another look cheaper.
        llm.engine.reset_prefix_cache()
        specs = [spec] * len(problems)
        return run_wave(
            llm,
            task,
            problems,
            specs,
            params,
            scorer=scorer,
            concurrency=concurrency,
            hygiene=hygiene,
        )

    pilot_problems = [
        PilotProblem(
            id=p.id,
            question=p.question,
            answers=[c.answer for c in r.candidates],
            correct=[task.is_correct(p, c.answer) for c in r.candidates],
            tokens=[c.tokens for c in r.candidates],
            prompt_tokens=r.stats.prompt_tokens,
            computed_prompt_tokens=r.stats.computed_prompt_tokens,
            measured_time=r.stats.measured_time,
            wall_time=wall,
        )
        for p, (r, wall) in zip(problems, wave(f"majority@{n_samples}"), strict=True)
    ]
    for m in measure:
        for p, pp, (r, wall) in zip(problems, pilot_problems, wave(m), strict=True):
            pp.direct[m] = DirectRun(
                correct=task.is_correct(p, r.answer),
                covered=any(task.is_correct(p, c.answer) for c in r.candidates),
                n_candidates=len(r.candidates),
                computed_prompt_tokens=r.stats.computed_prompt_tokens,
                generated_tokens=r.stats.generated_tokens,
                measured_time=r.stats.measured_time,
                wall_time=wall,
            )
    engine = llm.engine
    return Pilot(
        problems=pilot_problems,
        n_samples=n_samples,
        seed=seed,
        params=jsonable(dataclasses.asdict(params)),
        task=task_identity(task),
        model=str(llm.source),
        scorer=scorer,
        concurrency=concurrency,
        model_shape=engine.cost_meter.shape.to_dict(),
        block_size=engine.block_size,
        wall_seconds=time.perf_counter() - t0,
    )


__all__ = ["DirectRun", "Pilot", "PilotProblem", "pilot", "run_wave"]
