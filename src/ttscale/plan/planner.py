"""Compute-optimal test-time scaling: a pilot run, per-difficulty curves, a budgeted plan.

The method follows Snell et al. 2024, "Scaling LLM Test-Time Compute Optimally can be More
Effective than Scaling Model Parameters": the best way to spend inference compute depends on
how hard a problem is for the model (easy problems gain from sampling and voting, hard ones
from search or not at all), and difficulty is measured by the model's own pass rate. So:

1. :func:`pilot` samples ``n`` answers to each of a few problems (``majority@n``, one request
   per problem, prompt prefilled once) and judges every sample with ``task.is_correct``. The
   oracle is used to *plan* (estimate curves), never to select an answer. Strategies that are
   not estimable from independent samples (greedy, beam search, best-of-N with a scorer...)
   are run directly on the same problems.
2. Problems are binned by pilot pass rate (:func:`difficulty_thresholds`); per bin, accuracy
   vs cost curves of the candidates: ``maj@k`` exactly over the k-subsets of the samples
   (:func:`maj_at_k_fair`; beyond ``n`` a plug-in model, :func:`plugin_maj_at_k`), ``pass@k``
   as the oracle ceiling, measured strategies as measured. Costs come from a token time model
   fitted on the pilot (:class:`TokenTimeModel`) or from the analytic roofline model.
3. :func:`choose` solves the multiple-choice knapsack "one candidate per bin, maximize the
   share-weighted accuracy, total cost within the budget" exactly (:func:`knapsack`), and
   :func:`saturation_n` reports where more samples stop paying (Scaling-over-Scaling: with
   per-sample success ``p`` the (N+1)-th sample adds ``p (1-p)^N`` to pass@N).
4. A held-out problem's difficulty is unknown, so :func:`validate` routes it with a *probe*:
   a first wave of ``m`` samples whose answer agreement predicts the pass rate (calibrated on
   the pilot). The probe's samples are kept: a bin whose choice is ``majority@k`` samples only
   ``k - m`` more and votes over all ``k``. Plans with a probe are priced and predicted
   *including* the probe and its routing errors (simulated on the pilot's samples), so they
   compete fairly with the best uniform strategy (no probe), which :func:`make_plan` also
   prices and picks when it is better.

See docs/PLANNER.md for the assumptions.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ttscale.eval.harness import jsonable, task_identity
from ttscale.eval.metrics import majority_vote, pass_at_k, wilson_interval
from ttscale.sampling.params import SamplingParams
from ttscale.strategies import make_strategy
from ttscale.strategies.base import parse_spec

if TYPE_CHECKING:
    from ttscale.cost import Hardware, ModelShape
    from ttscale.llm import LLM
    from ttscale.strategies.base import StrategyResult
    from ttscale.tasks import Problem, Task

DEFAULT_CANDIDATES = ("greedy", "majority@2", "majority@4", "majority@8")
DEFAULT_EPSILON = 0.01
# maj@k beyond the pilot's n samples is extrapolated (plug-in model) up to this factor, refused
# beyond: the plug-in vote converges to "is the empirical mode right", which n samples only
# estimate, so far-out extrapolations are mostly noise.
MAX_EXTRAPOLATION = 4
# Monte Carlo draws per problem for the plug-in extrapolation and the probe simulation:
# standard error <= 0.5 / sqrt(4000) ~ 0.008 per problem, below the between-problem noise.
MC_DRAWS = 4000
# The continuation after a probe samples with another seed: the engine seeds sample i of a
# request by (seed, i), so the same seed would repeat the probe's samples.
CONTINUATION_SEED_OFFSET = 1_000_003
# How much more accurate (predicted) a probe plan must be to be preferred to a uniform one.
PROBE_MARGIN = 0.005
BIN_NAMES = {1: ("all",), 2: ("hard", "easy"), 3: ("hard", "medium", "easy")}
ROUTINGS = ("probe", "uniform", "oracle")


class InfeasibleBudget(ValueError):
    """Even the cheapest plan costs more than the budget."""


# ---- the pilot --------------------------------------------------------------------------------


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

    def sampling_params(self) -> SamplingParams:
        return sampling_params_from_dict(self.params)

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


def sampling_params_from_dict(data: dict[str, Any]) -> SamplingParams:
    return SamplingParams(**data)


def default_params(
    seed: int = 0, max_tokens: int = 128, temperature: float = 0.7, top_p: float = 0.95
) -> SamplingParams:
    return SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)


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
) -> list[tuple[StrategyResult, float]]:
    """Runs ``specs[i]`` on ``problems[i]`` (with ``params[i]`` if a list), ``concurrency``
    problems at once on the engine (so different strategies batch together), and returns
    ``(result, wall seconds)`` per problem.

    A chunk's wall time is split over its problems in proportion to the engine time charged to
    each (the cost meter splits every step by tokens), so the shares add up to the real
    elapsed time and a problem that generated more pays more.
    """
    from ttscale.strategies.api import make_query
    from ttscale.strategies.session import Session, drive

    if len(specs) != len(problems):
        raise ValueError(f"{len(specs)} strategies for {len(problems)} problems")
    per_problem = [params] * len(problems) if isinstance(params, SamplingParams) else list(params)
    built = {s: make_strategy(s) for s in dict.fromkeys(specs)}
    the_scorer = None
    if any(s.needs_scorer for s in built.values()):
        from ttscale.scorers import load_scorer

        the_scorer = load_scorer(scorer)
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
        params = default_params(seed)
    problems = task.problems(n_problems, seed)
    if not problems:
        raise ValueError(f"task {task.name!r} gave no problems")
    say = log or (lambda _msg: None)
    t0 = time.perf_counter()
    spec = f"majority@{n_samples}"
    say(f"pilot: {spec} on {len(problems)} problems")
    # A cold prefix cache per strategy, as in the harness: one strategy's prompts must not make
    # another look cheaper.
    llm.engine.reset_prefix_cache()
    runs = run_wave(
        llm, task, problems, [spec] * len(problems), params, scorer=scorer, concurrency=concurrency
    )
    pilot_problems = []
    for p, (r, wall) in zip(problems, runs, strict=True):
        pilot_problems.append(
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
        )
    for m in measure:
        say(f"pilot: {m} on {len(problems)} problems")
        llm.engine.reset_prefix_cache()
        runs = run_wave(
            llm, task, problems, [m] * len(problems), params, scorer=scorer, concurrency=concurrency
        )
        for p, pp, (r, wall) in zip(problems, pilot_problems, runs, strict=True):
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
        block_size=engine.block_manager.block_size,
        wall_seconds=time.perf_counter() - t0,
    )


# ---- cost models ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenTimeModel:
    """Seconds = ``sec_per_token`` x (prompt tokens prefilled + tokens generated).

    ``sec_per_token`` is the pilot's wall time per processed token (amortized over concurrent
    problems), so the model reproduces the pilot's own elapsed time. Assumption: a throughput
    regime, where the engine stays busy and a token costs about the same whatever strategy
    produced it. It ignores that prefill tokens are cheaper than decode tokens on a GPU (the
    engine also charges each step's time evenly to its tokens) and that a small batch pays
    more per token than a large one; validation shows how far that is off.
    """

    sec_per_token: float
    model_share: float = 1.0  # engine model time / wall time in the pilot (the rest: overhead)
    unit: str = "s wall (this machine, measured)"

    def seconds(self, prompt_tokens: float, generated_tokens: float, n_samples: int = 1) -> float:
        del n_samples  # tokens are tokens in a throughput regime
        return self.sec_per_token * (max(prompt_tokens, 0.0) + max(generated_tokens, 0.0))

    @classmethod
    def fit(cls, pilot: Pilot) -> TokenTimeModel:
        tokens = wall = model = 0.0
        for p in pilot.problems:
            tokens += p.computed_prompt_tokens + sum(p.tokens)
            wall += p.wall_time
            model += p.measured_time
            for d in p.direct.values():
                tokens += d.computed_prompt_tokens + d.generated_tokens
                wall += d.wall_time
                model += d.measured_time
        if tokens <= 0 or wall <= 0:
            raise ValueError("the pilot recorded no tokens or no time: nothing to fit costs on")
        return cls(sec_per_token=wall / tokens, model_share=model / wall)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "tokens", **dataclasses.asdict(self)}


@dataclass(frozen=True)
class AnalyticTimeModel:
    """Roofline seconds of the analytic cost model (:func:`ttscale.cost.estimate`) on some
    hardware: N samples of a prompt, prefilled once, decoding ``generated / N`` tokens each.
    For "what would this plan cost on an H100"; search strategies are priced as N samples
    sharing the prompt (the cost model's approximation)."""

    shape: ModelShape
    hardware: Hardware
    block_size: int | None = None
    dtype: str = "bf16"

    @property
    def unit(self) -> str:
        return f"s roofline ({self.hardware.name}, {self.dtype}, analytic)"

    def seconds(self, prompt_tokens: float, generated_tokens: float, n_samples: int = 1) -> float:
        from ttscale.cost import estimate

        n = max(1, int(n_samples))
        gen = max(1, round(generated_tokens / n))
        est = estimate(
            self.shape,
            max(1, round(prompt_tokens)) if prompt_tokens > 0 else 1,
            gen,
            n,
            self.hardware,
            dtype=self.dtype,
            block_size=self.block_size,
        )
        # No prompt tokens: a continuation of a cached prompt, decode only.
        return est.time if prompt_tokens > 0 else est.decode.time

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "analytic",
            "model": self.shape.name,
            "hardware": self.hardware.name,
            "dtype": self.dtype,
            "block_size": self.block_size,
            "unit": self.unit,
        }


TimeModel = TokenTimeModel | AnalyticTimeModel


def analytic_time_model(pilot: Pilot, hardware: str, dtype: str = "bf16") -> AnalyticTimeModel:
    """The analytic model for the pilot's model on ``hardware`` (a preset or profile)."""
    from ttscale.cost import ModelShape, load_hardware

    if pilot.model_shape is None:
        raise ValueError("the pilot did not record the model's shape")
    return AnalyticTimeModel(
        ModelShape(**pilot.model_shape), load_hardware(hardware), pilot.block_size, dtype
    )


# ---- candidates and per-problem values --------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A strategy the plan may pick. ``k``: samples voted over when estimated from the pilot's
    samples (``majority@k``, ``sample`` = k 1); None when measured directly."""

    spec: str
    k: int | None
    samples: int  # the N the cost model sees (samples / branches)
    extrapolated: bool = False

    @property
    def measured(self) -> bool:
        return self.k is None


def parse_candidates(
    specs: str | Sequence[str],
    n_samples: int,
    measured: Sequence[str] = (),
    max_extrapolation: int = MAX_EXTRAPOLATION,
) -> list[Candidate]:
    """Validates candidate specs. ``majority@k`` / ``sample`` are estimated from the pilot's
    samples (extrapolated for ``n_samples < k <= max_extrapolation * n_samples``); any other
    strategy must be in ``measured`` (run directly by the pilot)."""
    if isinstance(specs, str):
        specs = specs.split(",")
    out: list[Candidate] = []
    for spec in dict.fromkeys(s.strip() for s in specs if s.strip()):
        make_strategy(spec)  # ValueError with the reason for a bad spec
        name, n, _ = parse_spec(spec)
        if name in ("majority", "sample"):
            k = n or 1
            if k > max_extrapolation * n_samples:
                raise ValueError(
                    f"{spec}: a pilot of {n_samples} samples extrapolates maj@k up to "
                    f"k = {max_extrapolation * n_samples}; sample more in the pilot"
                )
            out.append(Candidate(spec, k, k, extrapolated=k > n_samples))
        else:
            if spec not in measured:
                raise ValueError(
                    f"{spec} is not estimable from independent samples; the pilot must run it "
                    "directly (pilot(..., measure=[...]))"
                )
            out.append(Candidate(spec, None, 1 if name == "greedy" else n or 1))
    if not out:
        raise ValueError("no candidate strategy given")
    return out


def needs_measurement(specs: str | Sequence[str]) -> list[str]:
    """The candidates a pilot must run directly (everything but majority@k / sample)."""
    if isinstance(specs, str):
        specs = specs.split(",")
    out = []
    for spec in dict.fromkeys(s.strip() for s in specs if s.strip()):
        make_strategy(spec)
        if parse_spec(spec)[0] not in ("majority", "sample"):
            out.append(spec)
    return out


def _answer_ids(answers: Sequence[str | None]) -> tuple[np.ndarray, list[str]]:
    """Answers -> small ints in first-appearance order; None -> -1."""
    ids: dict[str, int] = {}
    out = [-1 if a is None else ids.setdefault(a, len(ids)) for a in answers]
    return np.asarray(out, dtype=np.int64), list(ids)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, *keys])


def _problem_key(pp: PilotProblem) -> int:
    """A stable per-problem RNG key (Python's str hash is salted per process)."""
    return int.from_bytes(pp.id.encode()[-8:].rjust(8, b"\0"), "little") & 0xFFFFFFFF


def _vote_hits(
    seqs: np.ndarray, good: np.ndarray, lengths: Sequence[int], block: int = 1000
) -> dict[int, np.ndarray]:
    """Majority votes over prefixes of answer-id sequences, with :func:`majority_vote`'s tie
    rule (the tied answer that reached the top count first wins; -1 never votes).

    ``seqs``: (draws, L) answer ids; ``good``: (C,) bool, whether answer id c is correct.
    Returns {length: (draws,) float array, 1.0 where the vote over the first `length` wins}.
    Rows go ``block`` at a time to bound memory (draws x L x C counts).
    """
    draws = seqs.shape[0]
    out = {k: np.zeros(draws) for k in lengths}
    if len(good) == 0:
        return out
    labels = np.arange(len(good))
    for lo in range(0, draws, block):
        part = seqs[lo : lo + block]
        cum = np.cumsum(part[:, :, None] == labels, axis=1, dtype=np.int32)  # (B, L, C)
        for k in lengths:
            counts = cum[:, k - 1, :]
            top = counts.max(axis=1)
            # Where each answer first reaches the top count (k: never); non-top answers lose.
            reached = cum[:, :k, :] >= np.maximum(top, 1)[:, None, None]
            first = np.where(reached.any(axis=1), reached.argmax(axis=1), k)
            first = np.where(counts == top[:, None], first, k + 1)
            winner = first.argmin(axis=1)
            out[k][lo : lo + block] = np.where(top > 0, good[winner], False)
    return out


def maj_at_k_fair(
    answers: Sequence[str | None],
    right: set[str],
    k: int,
    exact_limit: int = 20_000,
    draws: int = MC_DRAWS,
    seed: int = 0,
) -> float:
    """maj@k of one problem from its ``n`` samples: the mean over all k-subsets (exact up to
    ``exact_limit`` subsets, else ``draws`` random ones, seeded) of the chance the vote is right,
    with ties split evenly among the tied answers.

    Even splitting is :func:`majority_vote`'s first-to-reach rule averaged over sample orders
    (i.i.d. samples come in random order). :func:`ttscale.eval.metrics.maj_at_k` keeps the
    pilot's one sample order instead: unbiased too, but noisier, and out of step with the probe
    simulation, which draws random orders.
    """
    n = len(answers)
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")

    def value(subset: Sequence[int]) -> float:
        counts: dict[str, int] = {}
        for i in subset:
            a = answers[i]
            if a is not None:
                counts[a] = counts.get(a, 0) + 1
        if not counts:
            return 0.0
        top = max(counts.values())
        tied = [a for a, c in counts.items() if c == top]
        return sum(a in right for a in tied) / len(tied)

    if math.comb(n, k) <= exact_limit:
        subsets = list(itertools.combinations(range(n), k))
        return sum(map(value, subsets)) / len(subsets)
    rng = _rng(seed, n, k)
    return sum(value(rng.choice(n, size=k, replace=False)) for _ in range(draws)) / draws


@functools.lru_cache(maxsize=65536)
def _maj_cached(answers: tuple[str | None, ...], right: frozenset[str], k: int, seed: int) -> float:
    # Bins, routings and candidates ask for the same (problem, k) many times.
    return maj_at_k_fair(answers, set(right), k, seed=seed)


def plugin_maj_at_k(
    answers: Sequence[str | None],
    right: set[str],
    k: int,
    draws: int = MC_DRAWS,
    seed: int = 0,
) -> float:
    """maj@k for ``k`` beyond the samples, by the plug-in model: the problem's answer
    distribution *is* the empirical one of its samples, and k answers are drawn from it with
    replacement (Monte Carlo, seeded; ties broken as by :func:`majority_vote`). Biased: it
    sharpens toward "is the empirical mode right" faster than the truth when n is small."""
    ids, names = _answer_ids(answers)
    good = np.array([a in right for a in names], dtype=bool)
    seqs = ids[_rng(seed, k).integers(0, len(ids), size=(draws, k))]
    return float(_vote_hits(seqs, good, [k])[k].mean())


def problem_accuracy(pp: PilotProblem, cand: Candidate, seed: int = 0) -> float:
    """Expected accuracy of ``cand`` on one pilot problem."""
    if cand.measured:
        return float(pp.direct[cand.spec].correct)
    k = cand.k or 1
    if k <= pp.n:
        return _maj_cached(
            tuple(pp.answers), frozenset(pp.right_answers), k, seed ^ _problem_key(pp)
        )
    return plugin_maj_at_k(pp.answers, pp.right_answers, k, seed=seed ^ _problem_key(pp))


def problem_ceiling(pp: PilotProblem, cand: Candidate) -> float:
    """The oracle ceiling of ``cand``: pass@k (some sample right), or a measured strategy's
    coverage. Beyond n samples: 1 - (1 - p)^k."""
    if cand.measured:
        return float(pp.direct[cand.spec].covered)
    return pass_at_k_ext(pp.n, pp.n_correct, cand.k or 1)


def pass_at_k_ext(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for k <= n, the plug-in ``1 - (1 - c/n)^k`` beyond."""
    if k <= n:
        return pass_at_k(n, c, k)
    return 1.0 - (1.0 - c / n) ** k


def problem_seconds(pp: PilotProblem, cand: Candidate, model: TimeModel) -> float:
    """Predicted cost of ``cand`` on one problem: majority@k = the prompt prefilled once + k
    samples of the problem's mean length; a measured strategy = its own tokens."""
    if cand.measured:
        d = pp.direct[cand.spec]
        return model.seconds(d.computed_prompt_tokens, d.generated_tokens, cand.samples)
    k = cand.k or 1
    return model.seconds(pp.prompt_tokens, k * pp.mean_tokens, k)


# ---- difficulty bins --------------------------------------------------------------------------


def difficulty_thresholds(
    pass_rates: Sequence[float], n_bins: int = 3, method: str = "fixed"
) -> list[float]:
    """Ascending pass-rate thresholds; bin b holds ``thresholds[b-1] <= p < thresholds[b]``,
    bin 0 the hardest.

    ``fixed``: equal widths, ``b / n_bins`` (3 bins: p < 1/3 hard, < 2/3 medium, else easy):
    stable across pilots and comparable between runs. ``quantile``: about equally many pilot
    problems per bin (Snell et al. use quantiles of pass rate); tied pass rates stay together,
    so there may be fewer bins than asked.
    """
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    if method == "fixed":
        return [b / n_bins for b in range(1, n_bins)]
    if method != "quantile":
        raise ValueError(f"binning must be 'fixed' or 'quantile', not {method!r}")
    ps = sorted(pass_rates)
    if not ps:
        raise ValueError("no pass rates to take quantiles of")
    edges: list[float] = []
    for b in range(1, n_bins):
        idx = math.ceil(b * len(ps) / n_bins)
        if idx < len(ps) and ps[idx] > ps[0] and (not edges or ps[idx] > edges[-1]):
            edges.append(ps[idx])
    return edges


def bin_of(p: float, thresholds: Sequence[float]) -> int:
    return bisect.bisect_right(thresholds, p)


def bin_names(n_bins: int) -> list[str]:
    """hard / medium / easy for 3 bins; otherwise level k (level 1 = easiest, as Snell et
    al.)."""
    if n_bins in BIN_NAMES:
        return list(BIN_NAMES[n_bins])
    return [f"level {n_bins - b}" for b in range(n_bins)]


def bin_ranges(thresholds: Sequence[float]) -> list[tuple[float, float]]:
    edges = [0.0, *thresholds, 1.0]
    return list(itertools.pairwise(edges))


# ---- saturation -------------------------------------------------------------------------------


def marginal_pass_gain(p: float, n: int) -> float:
    """pass@(N+1) - pass@N = p (1 - p)^N for per-sample success p (Scaling-over-Scaling)."""
    return p * (1.0 - p) ** n


def saturation_n(
    pass_rates: Sequence[float],
    epsilon: float = DEFAULT_EPSILON,
    weights: Sequence[float] | None = None,
    n_max: int = 100_000,
) -> int | None:
    """The smallest N at which one more sample adds less than ``epsilon`` to pass@N, for a mix
    of problems (their mean gain, weighted): N samples get within reach of what more could.
    0 when nothing is solvable (p = 0); None when no problem has weight. pass@N is the oracle
    ceiling: a majority vote saturates earlier and lower (it plateaus at P(mode is right))."""
    if weights is None:
        weights = [1.0] * len(pass_rates)
    total = sum(weights)
    if total <= 0:
        return None
    for n in range(n_max + 1):
        gain = sum(w * marginal_pass_gain(p, n) for p, w in zip(pass_rates, weights, strict=True))
        if gain / total < epsilon:
            return n
    return n_max


# ---- the probe --------------------------------------------------------------------------------


def agreement(answers: Sequence[str | None]) -> int:
    """Votes of the most frequent answer (None never votes): the probe's difficulty signal
    (self-consistency: agreement tracks accuracy, Wang et al. 2022)."""
    _, totals = majority_vote(answers)
    return int(max(totals.values())) if totals else 0


@dataclass
class ProbeSim:
    """One pilot problem under the probe protocol, simulated on its samples: draws of a random
    order of the samples (extended by plug-in draws beyond n); the probe is the first m, a
    continuation to k the first k. Everything is per draw."""

    level: np.ndarray  # (D,) agreement of the first m
    hits: dict[int, np.ndarray]  # k -> (D,) the vote over the first k is right (k = m: probe)
    covers: dict[int, np.ndarray]  # k -> (D,) some of the first k is right


def simulate_probe(
    pp: PilotProblem, m: int, ks: Sequence[int], draws: int = MC_DRAWS, seed: int = 0
) -> ProbeSim:
    ids, names = _answer_ids(pp.answers)
    good = np.array([a in pp.right_answers for a in names], dtype=bool)
    n = len(ids)
    lengths = sorted({m, *ks})
    width = max(lengths)
    rng = _rng(seed ^ _problem_key(pp), m, width)
    order = rng.permuted(np.tile(np.arange(n), (draws, 1)), axis=1)
    if width > n:  # plug-in extension: i.i.d. draws from the empirical distribution
        order = np.concatenate([order, rng.integers(0, n, size=(draws, width - n))], axis=1)
    seqs = ids[order[:, :width]]
    correct = np.array(pp.correct, dtype=bool)[order[:, :width]]
    hits = _vote_hits(seqs, good, lengths)
    if names:  # agreement: votes of the probe's most frequent answer (None never votes)
        level = (seqs[:, :m, None] == np.arange(len(names))).sum(axis=1).max(axis=1)
    else:
        level = np.zeros(draws, dtype=np.int64)
    covers = {k: correct[:, :k].any(axis=1).astype(float) for k in lengths}
    return ProbeSim(level=level, hits=hits, covers=covers)


@dataclass
class Probe:
    """Routes a problem by the agreement of ``samples`` probe answers: ``calibration[j]`` is the
    mean pilot pass rate of problems whose probe agreed j times (estimated over simulated
    probes), and its bin is where that estimate falls."""

    samples: int
    calibration: list[float]  # by agreement level 0..samples
    thresholds: list[float]
    level_share: list[float] = field(default_factory=list)  # how often each level occurred

    def bin_of(self, level: int) -> int:
        level = min(max(int(level), 0), self.samples)
        return bin_of(self.calibration[level], self.thresholds)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def calibrate_probe(
    pass_rates: Sequence[float],
    level_probs: Sequence[Sequence[float]],
    m: int,
    thresholds: Sequence[float],
) -> Probe:
    """``level_probs[i][j]``: P(probe agreement = j | pilot problem i). Levels never seen take
    the estimate of the nearest seen level (so they route to a bin the pilot populated)."""
    mass = [sum(lp[j] for lp in level_probs) for j in range(m + 1)]
    est: list[float | None] = [
        sum(lp[j] * p for lp, p in zip(level_probs, pass_rates, strict=True)) / mass[j]
        if mass[j] > 0
        else None
        for j in range(m + 1)
    ]
    seen = [j for j in range(m + 1) if est[j] is not None]
    if not seen:
        raise ValueError("no probe level was observed")
    calibration = [
        est[j] if est[j] is not None else est[min(seen, key=lambda s: (abs(s - j), s))]
        for j in range(m + 1)
    ]
    total = sum(mass) or 1.0
    return Probe(m, [float(c) for c in calibration], list(thresholds), [x / total for x in mass])


# ---- the knapsack -----------------------------------------------------------------------------


def knapsack(
    bins: Sequence[tuple[float, Sequence[tuple[float, float]]]], budget: float
) -> tuple[list[int | None], float, float] | None:
    """Multiple-choice knapsack: each bin ``(share, [(accuracy, cost), ...])`` picks one option;
    maximize ``sum share * accuracy`` subject to ``sum share * cost <= budget``.

    Exact, by dynamic programming over Pareto fronts: after each bin keep only the partial
    plans no other beats on both cost and accuracy (a dominated partial plan can never
    complete into a better plan, as every later bin adds the same to both). No budget
    discretization. Ties: higher accuracy, then lower cost, then earlier options. Bins with
    share 0 pick None. Returns ``(choices, accuracy, cost)``, or None if nothing fits.
    """
    limit = budget + 1e-9 * max(1.0, abs(budget))
    front: list[tuple[float, float, tuple[int | None, ...]]] = [(0.0, 0.0, ())]
    for share, options in bins:
        if share <= 0 or not options:
            front = [(c, a, (*ch, None)) for c, a, ch in front]
            continue
        merged = [
            (c + share * oc, a + share * oa, (*ch, j))
            for c, a, ch in front
            for j, (oa, oc) in enumerate(options)
            if c + share * oc <= limit
        ]
        merged.sort(key=lambda t: (t[0], -t[1]))
        front = []
        best = -math.inf
        for t in merged:
            if t[1] > best + 1e-12:
                front.append(t)
                best = t[1]
        if not front:
            return None
    cost, acc, choices = front[-1]  # accuracy rises along the front: the last is the best
    return list(choices), acc, cost


# ---- curves and plans -------------------------------------------------------------------------


@dataclass
class Option:
    """A candidate's estimated accuracy and cost on one bin's problems."""

    spec: str
    accuracy: float
    seconds: float  # per problem; with a probe, what is spent after it
    ceiling: float  # oracle ceiling: pass@k, or a measured strategy's coverage
    extrapolated: bool = False
    measured: bool = False
    continues_probe: bool = False  # samples k - m more after the probe and votes over all k


@dataclass
class BinPlan:
    index: int
    name: str
    lo: float  # pass-rate range [lo, hi) (the last bin includes 1)
    hi: float
    share: float  # fraction of problems routed here
    pilot_problems: float  # effective number of pilot problems (routing weights summed)
    pass_rate: float  # mean pilot pass rate of those problems
    options: list[Option]
    pass_at_k: dict[str, float]
    maj_at_k: dict[str, float]
    saturation_n: int | None
    chosen: str | None = None
    predicted_accuracy: float | None = None
    predicted_seconds: float | None = None  # per problem, probe included
    ceiling: float | None = None  # the chosen option's oracle ceiling


@dataclass
class RoutingSummary:
    """One way of routing problems, priced: ``probe`` (the plan's probe), ``uniform`` (one
    strategy for all, no probe) or ``oracle`` (true pilot difficulty, free: an upper bound on
    what difficulty information is worth, Snell et al.'s oracle bins)."""

    routing: str
    feasible: bool
    accuracy: float | None = None
    seconds: float | None = None  # per problem
    choices: dict[str, str | None] = field(default_factory=dict)  # bin name -> spec
    note: str = ""


@dataclass
class Plan:
    budget_seconds: float
    n_problems: int  # the budget covers this many problems
    routing: str  # "probe" | "uniform" | "oracle"
    bins: list[BinPlan]
    thresholds: list[float]
    binning: str
    predicted_accuracy: float
    predicted_seconds: float  # per problem, probe included
    probe: Probe | None
    probe_seconds: float  # per problem (0 without a probe)
    oracle_ceiling: float  # pass@n over the pilot
    alternatives: list[RoutingSummary]
    candidates: list[str]
    epsilon: float
    cost_model: dict[str, Any]
    cost_unit: str
    pilot: dict[str, Any]  # the settings validation reruns with, and the pilot problems
    notes: list[str] = field(default_factory=list)

    @property
    def predicted_total_seconds(self) -> float:
        return self.predicted_seconds * self.n_problems

    @property
    def budget_per_problem(self) -> float:
        return self.budget_seconds / self.n_problems

    def choice_for(self, b: int) -> str:
        """The strategy of bin ``b`` (a bin the pilot left empty takes the nearest chosen)."""
        chosen = [(abs(x.index - b), x.index, x.chosen) for x in self.bins if x.chosen]
        if not chosen:
            raise ValueError("the plan chose nothing")
        return min(chosen)[2]  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["predicted_total_seconds"] = self.predicted_total_seconds
        d["budget_per_problem"] = self.budget_per_problem
        return jsonable(d)


def _weighted(values: Sequence[float], weights: Sequence[float]) -> float:
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights, strict=True)) / total if total else 0.0


@dataclass
class _Values:
    """Per-problem values of every candidate (no probe): acc[c][i], sec[c][i], ceil[c][i]."""

    acc: dict[str, list[float]]
    sec: dict[str, list[float]]
    ceil: dict[str, list[float]]


def _values(pilot: Pilot, candidates: Sequence[Candidate], model: TimeModel, seed: int) -> _Values:
    acc, sec, ceil = {}, {}, {}
    for c in candidates:
        acc[c.spec] = [problem_accuracy(p, c, seed) for p in pilot.problems]
        sec[c.spec] = [problem_seconds(p, c, model) for p in pilot.problems]
        ceil[c.spec] = [problem_ceiling(p, c) for p in pilot.problems]
    return _Values(acc, sec, ceil)


def _curves(pilot: Pilot, weights: Sequence[float]) -> tuple[dict[str, float], dict[str, float]]:
    """pass@k and maj@k (k = 1, 2, 4, ..., n) of the bin's problems, weighted."""
    from ttscale.eval.harness import k_values

    ks = k_values(pilot.n_samples)
    pass_k, maj_k = {}, {}
    for k in ks:
        pass_k[str(k)] = _weighted(
            [pass_at_k(p.n, p.n_correct, k) for p in pilot.problems], weights
        )
        maj_k[str(k)] = _weighted(
            [problem_accuracy(p, Candidate(f"majority@{k}", k, k)) for p in pilot.problems],
            weights,
        )
    return pass_k, maj_k


def _bin_plans(
    pilot: Pilot,
    thresholds: Sequence[float],
    weights: Sequence[Sequence[float]],  # weights[b][i]
    options: Sequence[Sequence[Option]],  # options[b]
    epsilon: float,
    names: Sequence[str] | None = None,
    ranges: Sequence[tuple[float, float]] | None = None,
) -> list[BinPlan]:
    n = len(pilot.problems)
    names = names or bin_names(len(weights))
    ranges = ranges or bin_ranges(thresholds)
    out = []
    for b, w in enumerate(weights):
        pass_k, maj_k = _curves(pilot, w)
        out.append(
            BinPlan(
                index=b,
                name=names[b],
                lo=ranges[b][0],
                hi=ranges[b][1],
                share=sum(w) / n,
                pilot_problems=sum(w),
                pass_rate=_weighted(pilot.pass_rates, w),
                options=list(options[b]),
                pass_at_k=pass_k,
                maj_at_k=maj_k,
                saturation_n=saturation_n(pilot.pass_rates, epsilon, w),
            )
        )
    return out


def _static_options(
    candidates: Sequence[Candidate], values: _Values, w: Sequence[float]
) -> list[Option]:
    return [
        Option(
            spec=c.spec,
            accuracy=_weighted(values.acc[c.spec], w),
            seconds=_weighted(values.sec[c.spec], w),
            ceiling=_weighted(values.ceil[c.spec], w),
            extrapolated=c.extrapolated,
            measured=c.measured,
        )
        for c in candidates
    ]


def _choose(bins: list[BinPlan], budget: float, extra: float = 0.0) -> tuple[float, float] | None:
    """Runs the knapsack on the bins' options within ``budget`` per problem (``extra`` per
    problem, the probe, spent first); records the choices; returns (accuracy, seconds)."""
    solved = knapsack(
        [(b.share, [(o.accuracy, o.seconds) for o in b.options]) for b in bins], budget - extra
    )
    if solved is None:
        return None
    choices, acc, cost = solved
    for b, j in zip(bins, choices, strict=True):
        if j is None:
            continue
        o = b.options[j]
        b.chosen, b.predicted_accuracy, b.ceiling = o.spec, o.accuracy, o.ceiling
        b.predicted_seconds = extra + o.seconds
    return acc, extra + cost


def choose(bins: list[BinPlan], budget_per_problem: float) -> tuple[float, float] | None:
    """Picks each bin's option (exact knapsack, see :func:`knapsack`), in place; returns the
    predicted (accuracy, seconds per problem), or None when nothing fits."""
    return _choose(bins, budget_per_problem)


def _probe_bins(
    pilot: Pilot,
    candidates: Sequence[Candidate],
    values: _Values,
    model: TimeModel,
    thresholds: Sequence[float],
    m: int,
    epsilon: float,
    seed: int,
) -> tuple[list[BinPlan], Probe, float]:
    """Bins as the probe routes them, with options conditional on the probe (simulated)."""
    probs = pilot.problems
    n_bins = len(thresholds) + 1
    cont = sorted({c.k for c in candidates if c.k is not None and c.k > m})
    sims = [simulate_probe(p, m, cont, seed=seed) for p in probs]
    level_probs = [np.bincount(s.level, minlength=m + 1)[: m + 1] / len(s.level) for s in sims]
    probe = calibrate_probe(pilot.pass_rates, level_probs, m, thresholds)
    route = np.array([probe.bin_of(j) for j in range(m + 1)])
    probe_sec = sum(model.seconds(p.prompt_tokens, m * p.mean_tokens, m) for p in probs) / len(
        probs
    )
    # masks[i][b]: (D,) whether draw d of problem i is routed to bin b; weights[b][i] =
    # P(problem i is routed to bin b).
    masks = [[(route[s.level] == b).astype(float) for b in range(n_bins)] for s in sims]
    weights = [[float(masks[i][b].mean()) for i in range(len(probs))] for b in range(n_bins)]

    def mean_given(b: int, x: Callable[[ProbeSim], np.ndarray]) -> float:
        """E[x | routed to b] over the pilot problems (0 for an empty bin)."""
        total = sum(weights[b])
        joint = sum(float((masks[i][b] * x(s)).mean()) for i, s in enumerate(sims))
        return joint / total if total else 0.0

    options: list[list[Option]] = []
    for b in range(n_bins):
        # majority@k with k <= m is represented by the probe's own vote over its m answers:
        # as cheap (already paid for) and at least as well informed.
        opts = [
            Option(
                spec=f"majority@{m}",
                accuracy=mean_given(b, lambda s: s.hits[m]),
                seconds=0.0,
                ceiling=mean_given(b, lambda s: s.covers[m]),
                continues_probe=True,
            )
        ]
        for c in candidates:
            if c.measured:  # starts over: its value does not depend on the probe's samples
                opts += _static_options([c], values, weights[b])
            elif c.k is not None and c.k > m:
                k = c.k
                sec = [model.seconds(0, (k - m) * p.mean_tokens, k - m) for p in probs]
                opts.append(
                    Option(
                        spec=c.spec,
                        accuracy=mean_given(b, lambda s, k=k: s.hits[k]),
                        seconds=_weighted(sec, weights[b]),
                        ceiling=mean_given(b, lambda s, k=k: s.covers[k]),
                        extrapolated=c.extrapolated,
                        continues_probe=True,
                    )
                )
        options.append(opts)
    bins = _bin_plans(pilot, thresholds, weights, options, epsilon)
    return bins, probe, probe_sec


def make_plan(
    pilot: Pilot,
    budget_seconds: float,
    n_problems: int,
    candidates: str | Sequence[str] = DEFAULT_CANDIDATES,
    *,
    n_bins: int = 3,
    binning: str = "fixed",
    probe_samples: int = 4,
    routing: str = "auto",
    epsilon: float = DEFAULT_EPSILON,
    hardware: str | None = None,
    max_extrapolation: int = MAX_EXTRAPOLATION,
    seed: int = 0,
) -> Plan:
    """The plan that maximizes predicted accuracy on ``n_problems`` problems within
    ``budget_seconds`` in total.

    ``routing``: ``probe`` (route each problem by a probe of ``probe_samples`` samples),
    ``uniform`` (one strategy for every problem), ``oracle`` (true pilot difficulty: analysis
    only, it cannot be run) or ``auto`` (the probe plan if its predicted accuracy beats the best
    uniform plan's by more than ``PROBE_MARGIN``, else the uniform one). ``hardware``: price
    with the analytic roofline model on that hardware instead of the pilot's measured time per
    token. Raises InfeasibleBudget when even
    the cheapest plan is over budget, ValueError for bad settings.
    """
    if not pilot.problems:
        raise ValueError("the pilot has no problems")
    if not (budget_seconds > 0 and math.isfinite(budget_seconds)):
        raise ValueError(f"the budget must be a positive number of seconds, not {budget_seconds}")
    if n_problems < 1:
        raise ValueError("the budget must cover at least 1 problem")
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must be in (0, 1), not {epsilon}")
    if routing not in (*ROUTINGS, "auto"):
        raise ValueError(f"routing must be one of auto, {', '.join(ROUTINGS)}; not {routing!r}")
    if probe_samples < 0 or probe_samples == 1 or probe_samples > pilot.n_samples:
        raise ValueError(
            f"probe_samples must be 0 (no probe) or in [2, {pilot.n_samples}] (the pilot's "
            f"samples), not {probe_samples}"
        )
    if routing == "probe" and probe_samples == 0:
        raise ValueError("probe routing needs probe_samples >= 2")
    cands = parse_candidates(candidates, pilot.n_samples, pilot.measured, max_extrapolation)
    model: TimeModel = (
        TokenTimeModel.fit(pilot) if hardware is None else analytic_time_model(pilot, hardware)
    )
    thresholds = difficulty_thresholds(pilot.pass_rates, n_bins, binning)
    n_bins_eff = len(thresholds) + 1
    values = _values(pilot, cands, model, seed)
    budget = budget_seconds / n_problems
    n = len(pilot.problems)
    onehot = [
        [1.0 if bin_of(p, thresholds) == b else 0.0 for p in pilot.pass_rates]
        for b in range(n_bins_eff)
    ]

    def summary(
        name: str,
        bins: list[BinPlan] | None,
        result: tuple[float, float] | None,
        note: str = "",
    ) -> RoutingSummary:
        if bins is None:
            return RoutingSummary(name, False, note=note or "not tried")
        if result is None:
            return RoutingSummary(name, False, note="over budget")
        return RoutingSummary(
            name, True, result[0], result[1], {b.name: b.chosen for b in bins}, note
        )

    # Oracle: Snell et al.'s per-difficulty optimum with free, perfect difficulty labels.
    oracle_bins = _bin_plans(
        pilot, thresholds, onehot, [_static_options(cands, values, w) for w in onehot], epsilon
    )
    oracle = _choose(oracle_bins, budget)

    # Uniform: the best single strategy, no probe. Its bins are the oracle bins (for the
    # table: how that one strategy fares per difficulty).
    all_w = [1.0] * n
    pooled = [_static_options(cands, values, all_w)]
    uniform_best = knapsack([(1.0, [(o.accuracy, o.seconds) for o in pooled[0]])], budget)
    uniform_bins = _bin_plans(
        pilot, thresholds, onehot, [_static_options(cands, values, w) for w in onehot], epsilon
    )
    uniform = None
    if uniform_best is not None:
        spec = pooled[0][uniform_best[0][0]].spec  # type: ignore[index]
        for b in uniform_bins:
            if b.share > 0:
                o = next(o for o in b.options if o.spec == spec)
                b.chosen, b.predicted_accuracy, b.ceiling = spec, o.accuracy, o.ceiling
                b.predicted_seconds = o.seconds
        uniform = (uniform_best[1], uniform_best[2])

    probe_result = probe_bins = probe = None
    probe_sec = 0.0
    if probe_samples and routing in ("auto", "probe"):
        probe_bins, probe, probe_sec = _probe_bins(
            pilot, cands, values, model, thresholds, probe_samples, epsilon, seed
        )
        probe_result = _choose(probe_bins, budget, extra=probe_sec)

    alternatives = [
        summary(
            "probe",
            probe_bins,
            probe_result,
            "not tried" if probe_samples else "no probe (probe_samples=0)",
        ),
        summary("uniform", uniform_bins, uniform),
        summary("oracle", oracle_bins, oracle, "true pilot difficulty: an upper bound"),
    ]
    picks: dict[str, tuple[list[BinPlan] | None, Any]] = {
        "probe": (probe_bins, probe_result),
        "uniform": (uniform_bins, uniform),
        "oracle": (oracle_bins, oracle),
    }
    if routing == "auto":
        chosen_routing = None
        if uniform is not None:
            chosen_routing = "uniform"
        # The probe plan must beat the uniform one by a margin: its accuracies are Monte Carlo
        # estimates, and its extra freedom (a choice per bin) overfits the pilot more.
        if probe_result is not None and (
            uniform is None or probe_result[0] > uniform[0] + PROBE_MARGIN
        ):
            chosen_routing = "probe"
    else:
        chosen_routing = routing if picks[routing][1] is not None else None
    if chosen_routing is None:
        # The cheapest plan of each routing tried: a probe plan can stop after the probe.
        floors = {
            "uniform": _cheapest(pooled[0]),
            "probe": probe_sec,
            "oracle": sum(b.share * _cheapest(b.options) for b in oracle_bins),
        }
        tried = ["probe", "uniform"] if routing == "auto" else [routing]
        floor = min(floors[r] for r in tried if r != "probe" or probe_bins is not None)
        raise InfeasibleBudget(
            f"budget {budget_seconds:g} s for {n_problems} problems ({budget:.4g} s/problem) is "
            f"below the cheapest plan, {floor:.4g} s/problem ({model.unit}); "
            f"raise the budget to at least {floor * n_problems:.4g} s or add cheaper candidates"
        )
    bins, (acc, sec) = picks[chosen_routing]
    notes = _notes(pilot, cands, chosen_routing, probe_samples, model)
    return Plan(
        budget_seconds=float(budget_seconds),
        n_problems=n_problems,
        routing=chosen_routing,
        bins=bins,  # type: ignore[arg-type]
        thresholds=list(thresholds),
        binning=binning,
        predicted_accuracy=acc,
        predicted_seconds=sec,
        probe=probe if chosen_routing == "probe" else None,
        probe_seconds=probe_sec if chosen_routing == "probe" else 0.0,
        oracle_ceiling=_weighted([pass_at_k(p.n, p.n_correct, p.n) for p in pilot.problems], all_w),
        alternatives=alternatives,
        candidates=[c.spec for c in cands],
        epsilon=epsilon,
        cost_model=model.to_dict(),
        cost_unit=model.unit,
        pilot={
            "model": pilot.model,
            "task": pilot.task,
            "n_problems": n,
            "n_samples": pilot.n_samples,
            "seed": pilot.seed,
            "params": pilot.params,
            "scorer": pilot.scorer,
            "concurrency": pilot.concurrency,
            "problem_ids": [p.id for p in pilot.problems],
            "questions": [p.question for p in pilot.problems],
            "pass_rates": pilot.pass_rates,
            "wall_seconds": pilot.wall_seconds,
        },
        notes=notes,
    )


def _cheapest(options: Sequence[Option]) -> float:
    return min((o.seconds for o in options), default=0.0)


def _notes(
    pilot: Pilot, cands: Sequence[Candidate], routing: str, m: int, model: TimeModel
) -> list[str]:
    notes = [
        f"predictions are in-sample: curves, bins and the probe's calibration all come from the "
        f"same {len(pilot.problems)} pilot problems, so they are optimistic; validate on new "
        "problems",
        "pass@k is an oracle ceiling (some sample right); majority voting saturates below it, at "
        "P(the most frequent answer is right)",
    ]
    if any(c.extrapolated for c in cands):
        notes.append(
            f"maj@k beyond the pilot's {pilot.n_samples} samples is extrapolated (plug-in: k "
            "draws with replacement from the pilot's answers), which overstates gains"
        )
    if routing == "probe":
        notes.append(
            f"every problem first gets a probe of {m} samples (majority@{m}); a bin choosing "
            f"majority@k samples k - {m} more and votes over all k; other strategies start over"
        )
    if isinstance(model, TokenTimeModel):
        notes.append(
            f"cost = {model.sec_per_token:.3g} s per token (prompt + generated; the pilot's "
            f"wall time per token, {100 * model.model_share:.0f}% of it in the model): a "
            "throughput approximation, see docs/PLANNER.md"
        )
    return notes


# ---- validation -------------------------------------------------------------------------------


@dataclass
class ValidationRecord:
    problem_id: str
    bin: int
    strategy: str
    answer: str | None
    correct: bool
    agreement: int | None  # the probe's agreement (None without a probe)
    probe_seconds: float  # wall
    strategy_seconds: float  # wall, after the probe
    model_seconds: float  # the plan's cost model applied to the tokens actually used
    prompt_tokens: int  # prefilled (computed), probe included
    generated_tokens: int

    @property
    def seconds(self) -> float:
        return self.probe_seconds + self.strategy_seconds


@dataclass
class BinValidation:
    index: int | None  # None: overall
    name: str
    strategy: str | None
    n: int
    share: float
    predicted_share: float
    accuracy: float | None
    accuracy_lo: float
    accuracy_hi: float
    predicted_accuracy: float | None
    seconds: float | None  # achieved wall s/problem
    model_seconds: float | None  # the cost model on the actual tokens, s/problem
    predicted_seconds: float | None


@dataclass
class Validation:
    n_problems: int
    routing: str
    bins: list[BinValidation]
    overall: BinValidation
    budget_seconds: float  # the plan's budget scaled to these problems
    total_seconds: float  # achieved wall time, all problems
    total_model_seconds: float  # the plan's cost model on the tokens actually used
    achieved_seconds: float  # in the plan's unit: wall, or roofline for an analytic plan
    within_budget: bool
    records: list[ValidationRecord]
    cost_unit: str
    analytic: bool = False  # the plan was priced by the analytic model (budget in roofline s)

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))


def held_out_problems(task: Task, plan: Plan, n_problems: int, seed_offset: int = 0) -> list:
    """``n_problems`` problems the pilot did not see: the task's problems at seed ``pilot seed +
    seed_offset``, minus the pilot's (by id and by question)."""
    seen_ids = set(plan.pilot["problem_ids"])
    seen_q = set(plan.pilot["questions"])
    pool = task.problems(n_problems + len(seen_ids), plan.pilot["seed"] + seed_offset)
    fresh = [p for p in pool if p.id not in seen_ids and p.question not in seen_q]
    return fresh[:n_problems]


def _time_model_from_plan(plan: Plan, pilot_shape: dict[str, Any] | None = None) -> TimeModel:
    cm = plan.cost_model
    if cm["kind"] == "tokens":
        return TokenTimeModel(cm["sec_per_token"], cm["model_share"], cm["unit"])
    from ttscale.cost import ModelShape, load_hardware

    if pilot_shape is None:
        raise ValueError("an analytic plan needs the model's shape")
    return AnalyticTimeModel(
        ModelShape(**pilot_shape), load_hardware(cm["hardware"]), cm["block_size"], cm["dtype"]
    )


def validate(
    llm: LLM,
    task: Task,
    plan: Plan,
    n_problems: int = 12,
    seed_offset: int = 0,
    *,
    concurrency: int | None = None,
    log: Callable[[str], None] | None = None,
) -> Validation:
    """Runs the plan on ``n_problems`` new problems and compares predicted with achieved
    accuracy and cost, per bin and overall.

    Probe plans: a first wave of ``majority@m`` on every problem (its cost counted), whose
    agreement picks the bin; then each problem's bin strategy (``majority@k`` continues with
    ``k - m`` fresh samples and votes over all ``k``; other strategies start over), all in one
    wave so different strategies batch together. Uniform plans: the one strategy. Times are
    wall-clock, each chunk's time split over its problems by engine time, with the pilot's
    sampling settings and concurrency. The oracle judges the final answers only.
    """
    if plan.routing == "oracle":
        raise ValueError("an oracle-routed plan needs true difficulty labels: it cannot be run")
    if n_problems < 1:
        raise ValueError("validation needs at least 1 problem")
    say = log or (lambda _msg: None)
    problems = held_out_problems(task, plan, n_problems, seed_offset)
    if not problems:
        raise ValueError(
            f"task {task.name!r} has no problems beyond the pilot's "
            f"{len(plan.pilot['problem_ids'])}"
        )
    params = sampling_params_from_dict(plan.pilot["params"])
    scorer = plan.pilot.get("scorer", "logprob")
    conc = concurrency or plan.pilot.get("concurrency", 8)
    model = _time_model_from_plan(plan, _shape_of(llm))
    n = len(problems)
    probe_runs: list[tuple[StrategyResult, float] | None] = [None] * n
    levels: list[int | None] = [None] * n
    llm.engine.reset_prefix_cache()
    if plan.routing == "probe":
        assert plan.probe is not None
        m = plan.probe.samples
        say(f"validate: probe majority@{m} on {n} problems")
        # The prefix cache is kept after the probe: a deployment would reuse the prompt's KV.
        probe_runs = run_wave(  # type: ignore[assignment]
            llm, task, problems, [f"majority@{m}"] * n, params, scorer=scorer, concurrency=conc
        )
        levels = [agreement([c.answer for c in r.candidates]) for r, _ in probe_runs]  # type: ignore[misc]
        bins = [plan.probe.bin_of(j) for j in levels]  # type: ignore[arg-type]
        strategies = [plan.choice_for(b) for b in bins]
    else:
        bins = [-1] * n  # difficulty unknown: one group
        strategies = [plan.choice_for(0)] * n

    # What runs after the probe: a majority continuation samples k - m more, with another seed
    # (the engine seeds sample i by (seed, i): the same seed would repeat the probe).
    cont_params = dataclasses.replace(
        params, seed=None if params.seed is None else params.seed + CONTINUATION_SEED_OFFSET
    )
    todo: list[tuple[int, str, SamplingParams]] = []
    for i, spec in enumerate(strategies):
        name, k, _ = parse_spec(spec)
        if probe_runs[i] is not None and name in ("majority", "sample"):
            extra = (k or 1) - len(probe_runs[i][0].candidates)  # type: ignore[index]
            if extra > 0:
                todo.append((i, f"majority@{extra}", cont_params))
        else:
            todo.append((i, spec, params))
    say(f"validate: strategies on {len(todo)} problems")
    wave = run_wave(
        llm,
        task,
        [problems[i] for i, _, _ in todo],
        [s for _, s, _ in todo],
        [p for _, _, p in todo],
        scorer=scorer,
        concurrency=conc,
    )
    runs = {i: (p is cont_params, res) for (i, _, p), res in zip(todo, wave, strict=True)}

    records = []
    for i, p in enumerate(problems):
        answers: list[str | None] = []
        prompt_tokens = gen = 0
        probe_wall = model_sec = 0.0
        if probe_runs[i] is not None:
            r, probe_wall = probe_runs[i]  # type: ignore[misc]
            answers = [c.answer for c in r.candidates]
            prompt_tokens += r.stats.computed_prompt_tokens
            gen += r.stats.generated_tokens
            model_sec += model.seconds(
                r.stats.computed_prompt_tokens, r.stats.generated_tokens, len(r.candidates)
            )
        s_wall = 0.0
        answer = majority_vote(answers)[0]  # the probe's vote, if nothing runs after it
        if i in runs:
            continuation, (r, s_wall) = runs[i]
            prompt_tokens += r.stats.computed_prompt_tokens
            gen += r.stats.generated_tokens
            model_sec += model.seconds(
                r.stats.computed_prompt_tokens, r.stats.generated_tokens, max(1, len(r.candidates))
            )
            if continuation:  # vote over the probe's and the new samples
                answer = majority_vote(answers + [c.answer for c in r.candidates])[0]
            else:
                answer = r.answer
        records.append(
            ValidationRecord(
                problem_id=p.id,
                bin=bins[i],
                strategy=strategies[i],
                answer=answer,
                correct=task.is_correct(p, answer),
                agreement=levels[i],
                probe_seconds=probe_wall,
                strategy_seconds=s_wall,
                model_seconds=model_sec,
                prompt_tokens=prompt_tokens,
                generated_tokens=gen,
            )
        )
    return _summarize_validation(plan, records, model.unit)


def _shape_of(llm: LLM) -> dict[str, Any] | None:
    try:
        return llm.engine.cost_meter.shape.to_dict()
    except AttributeError:
        return None


def _bin_validation(
    index: int | None,
    name: str,
    strategy: str | None,
    recs: Sequence[ValidationRecord],
    total: int,
    predicted_share: float,
    predicted_accuracy: float | None,
    predicted_seconds: float | None,
) -> BinValidation:
    k = sum(r.correct for r in recs)
    lo, hi = wilson_interval(k, len(recs))
    return BinValidation(
        index=index,
        name=name,
        strategy=strategy,
        n=len(recs),
        share=len(recs) / total if total else 0.0,
        predicted_share=predicted_share,
        accuracy=k / len(recs) if recs else None,
        accuracy_lo=lo,
        accuracy_hi=hi,
        predicted_accuracy=predicted_accuracy,
        seconds=sum(r.seconds for r in recs) / len(recs) if recs else None,
        model_seconds=sum(r.model_seconds for r in recs) / len(recs) if recs else None,
        predicted_seconds=predicted_seconds,
    )


def _summarize_validation(plan: Plan, records: list[ValidationRecord], unit: str) -> Validation:
    n = len(records)
    bins = []
    if plan.routing == "probe":
        for b in plan.bins:
            recs = [r for r in records if r.bin == b.index]
            bins.append(
                _bin_validation(
                    b.index,
                    b.name,
                    b.chosen or (plan.choice_for(b.index) if recs else None),
                    recs,
                    n,
                    b.share,
                    b.predicted_accuracy,
                    b.predicted_seconds,
                )
            )
    overall = _bin_validation(
        None,
        "all",
        None if plan.routing == "probe" else records[0].strategy,
        records,
        n,
        1.0,
        plan.predicted_accuracy,
        plan.predicted_seconds,
    )
    total = sum(r.seconds for r in records)
    total_model = sum(r.model_seconds for r in records)
    analytic = plan.cost_model.get("kind") == "analytic"
    achieved = total_model if analytic else total
    budget = plan.budget_seconds * n / plan.n_problems
    return Validation(
        n_problems=n,
        routing=plan.routing,
        bins=bins,
        overall=overall,
        budget_seconds=budget,
        total_seconds=total,
        total_model_seconds=total_model,
        achieved_seconds=achieved,
        within_budget=achieved <= budget,
        records=records,
        cost_unit=unit,
        analytic=analytic,
    )


# ---- reports ----------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _sec(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def strategy_label(plan: Plan, b: BinPlan) -> str:
    """The bin's choice as it runs: after a probe, majority@k continues the probe's samples."""
    if not b.chosen:
        return "-"
    if plan.probe is None:
        return b.chosen
    m = plan.probe.samples
    option = next((o for o in b.options if o.spec == b.chosen), None)
    if option is not None and option.continues_probe:
        k = parse_spec(b.chosen)[1] or 1
        return f"{b.chosen} (probe vote)" if k <= m else f"{b.chosen} (probe + {k - m})"
    return f"{b.chosen} (after probe)"


def plan_table(plan: Plan) -> Any:
    """A rich table: one row per bin (easiest first), the probe, the totals, and the other
    routings priced for comparison."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(
        title=f"plan ({plan.routing} routing): {plan.budget_seconds:g} s for {plan.n_problems} "
        f"problems = {plan.budget_per_problem:.3g} s/problem, in {escape(plan.cost_unit)}",
        title_justify="left",
    )
    right = ("share", "pilot pass rate", "pred. acc", "ceiling", "pred. s/problem", "sat. N")
    for col in ("bin", "pass rate", *right[:2], "strategy", *right[2:]):
        t.add_column(col, justify="right" if col in right else "left")
    for b in sorted(plan.bins, key=lambda b: -b.index):
        closing = "]" if b.hi >= 1.0 else ")"
        t.add_row(
            b.name,
            escape(f"[{b.lo:.2f}, {b.hi:.2f}{closing}"),
            _pct(b.share),
            _pct(b.pass_rate),
            strategy_label(plan, b),
            _pct(b.predicted_accuracy),
            _pct(b.ceiling),
            _sec(b.predicted_seconds),
            "-" if b.saturation_n is None else str(b.saturation_n),
        )
    t.add_section()
    if plan.probe is not None:
        m = plan.probe.samples
        t.add_row("probe", "", "100%", "", f"majority@{m}", "", "", _sec(plan.probe_seconds), "")
    t.add_row(
        "[bold]total[/bold]",
        "",
        "100%",
        _pct(_weighted([b.pass_rate for b in plan.bins], [b.share for b in plan.bins])),
        plan.routing,
        f"[bold]{_pct(plan.predicted_accuracy)}[/bold]",
        _pct(plan.oracle_ceiling),
        f"[bold]{_sec(plan.predicted_seconds)}[/bold]",
        "",
    )
    for alt in plan.alternatives:
        if alt.routing == plan.routing:
            continue
        what = ", ".join(dict.fromkeys(s for s in alt.choices.values() if s))
        t.add_row(
            f"[dim]alt: {alt.routing}[/dim]",
            "",
            "",
            "",
            f"[dim]{escape(what if alt.feasible else alt.note)}[/dim]",
            f"[dim]{_pct(alt.accuracy)}[/dim]",
            "",
            f"[dim]{_sec(alt.seconds)}[/dim]",
            "",
        )
    return t


def validation_table(val: Validation) -> Any:
    """Achieved vs predicted (in parentheses), per probe-assigned bin and overall."""
    from rich.markup import escape
    from rich.table import Table

    unit = "roofline s" if val.analytic else "wall s"
    t = Table(
        title=f"held-out validation: {val.n_problems} problems, {val.achieved_seconds:.3g} "
        f"{unit} of a {val.budget_seconds:.3g} s budget "
        f"({'within' if val.within_budget else 'OVER'})",
        title_justify="left",
    )
    other = "wall s/problem" if val.analytic else "cost model s/problem"
    cols = ("bin", "strategy", "n", "share (pred.)", "acc (pred.)", "acc 95% CI",
            f"{unit}/problem (pred.)", other)  # fmt: skip
    for col in cols:
        t.add_column(col, justify="left" if col in ("bin", "strategy") else "right")
    for b in [*sorted(val.bins, key=lambda b: -(b.index or 0)), val.overall]:
        if b is val.overall:
            t.add_section()
        achieved, second = (
            (b.model_seconds, b.seconds) if val.analytic else (b.seconds, b.model_seconds)
        )
        t.add_row(
            b.name,
            escape(b.strategy or "-"),
            str(b.n),
            f"{_pct(b.share)} ({_pct(b.predicted_share)})",
            f"{_pct(b.accuracy)} ({_pct(b.predicted_accuracy)})",
            "-" if not b.n else f"{_pct(b.accuracy_lo)}-{_pct(b.accuracy_hi)}",
            f"{_sec(achieved)} ({_sec(b.predicted_seconds)})",
            _sec(second),
        )
    return t


__all__ = [
    "DEFAULT_CANDIDATES",
    "DEFAULT_EPSILON",
    "AnalyticTimeModel",
    "BinPlan",
    "BinValidation",
    "Candidate",
    "DirectRun",
    "InfeasibleBudget",
    "Option",
    "Pilot",
    "PilotProblem",
    "Plan",
    "Probe",
    "RoutingSummary",
    "TokenTimeModel",
    "Validation",
    "ValidationRecord",
    "agreement",
    "bin_of",
    "calibrate_probe",
    "choose",
    "difficulty_thresholds",
    "held_out_problems",
    "knapsack",
    "maj_at_k_fair",
    "make_plan",
    "marginal_pass_gain",
    "needs_measurement",
    "parse_candidates",
    "pass_at_k_ext",
    "pilot",
    "plan_table",
    "plugin_maj_at_k",
    "problem_accuracy",
    "problem_ceiling",
    "problem_seconds",
    "run_wave",
    "saturation_n",
    "simulate_probe",
    "strategy_label",
    "validate",
    "validation_table",
]
