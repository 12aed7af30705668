"""Candidates and their per-problem values from the pilot: maj@k (exact over k-subsets, plug-in
beyond the samples), the pass@k ceiling, cost; and where more samples saturate."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ttscale.eval.metrics import MAJ_EXACT_LIMIT, MAJ_MC_SAMPLES, pass_at_k
from ttscale.strategies import make_strategy
from ttscale.strategy_spec import parse_strategy_spec
from ttscale.tts.votes import majority_vote

if TYPE_CHECKING:
    from ttscale.plan.costs import TimeModel
    from ttscale.plan.pilot_run import PilotProblem

DEFAULT_EPSILON = 0.01
# maj@k beyond the pilot's n samples is extrapolated (plug-in model) up to this factor, refused
# beyond: the plug-in vote converges to "is the empirical mode right", which n samples only
# estimate, so far-out extrapolations are mostly noise.
MAX_EXTRAPOLATION = 4
# Monte Carlo draws per problem for the plug-in extrapolation and the probe simulation.
MC_DRAWS = MAJ_MC_SAMPLES


# ---- candidates -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanCandidate:
    """A strategy the plan may pick. ``k``: samples voted over when estimated from the pilot's
    samples (``majority@k``, ``sample`` = k 1); None when measured directly."""

    spec: str
    k: int | None
    samples: int  # the N the cost model sees (samples / branches)
    extrapolated: bool = False

    @property
    def measured(self) -> bool:
        return self.k is None


def _specs(specs: str | Sequence[str]) -> list[str]:
    """Comma-separated or listed specs, stripped and deduplicated."""
    if isinstance(specs, str):
        specs = specs.split(",")
    return list(dict.fromkeys(s.strip() for s in specs if s.strip()))


def parse_candidates(
    specs: str | Sequence[str],
    n_samples: int,
    measured: Sequence[str] = (),
    max_extrapolation: int = MAX_EXTRAPOLATION,
) -> list[PlanCandidate]:
    """Validates candidate specs. ``majority@k`` / ``sample`` are estimated from the pilot's
    samples (extrapolated for ``n_samples < k <= max_extrapolation * n_samples``); any other
    strategy must be in ``measured`` (run directly by the pilot)."""
    out: list[PlanCandidate] = []
    for spec in _specs(specs):
        make_strategy(spec)  # ValueError with the reason for a bad spec
        parsed = parse_strategy_spec(spec)  # n is 1 for greedy and sample
        if parsed.name in ("majority", "sample"):
            k = parsed.n
            if k > max_extrapolation * n_samples:
                raise ValueError(
                    f"{spec}: a pilot of {n_samples} samples extrapolates maj@k up to "
                    f"k = {max_extrapolation * n_samples}; sample more in the pilot"
                )
            out.append(PlanCandidate(spec, k, k, extrapolated=k > n_samples))
        else:
            if spec not in measured:
                raise ValueError(
                    f"{spec} is not estimable from independent samples; the pilot must run it "
                    "directly (pilot(..., measure=[...]))"
                )
            out.append(PlanCandidate(spec, None, parsed.n))
    if not out:
        raise ValueError("no candidate strategy given")
    return out


def needs_measurement(specs: str | Sequence[str]) -> list[str]:
    """The candidates a pilot must run directly (everything but majority@k / sample)."""
    out = []
    for spec in _specs(specs):
        make_strategy(spec)
        if parse_strategy_spec(spec).name not in ("majority", "sample"):
            out.append(spec)
    return out


# ---- maj@k and pass@k of one problem ----------------------------------------------------------


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
    """Vectorized :func:`majority_vote` (same tie rule; -1 never votes) over prefixes of
    answer-id sequences ``seqs`` (draws, L); ``good[c]``: whether answer id c is right.
    Returns {length: (draws,) 1.0 where the vote over the first ``length`` is right}; rows go
    ``block`` at a time to bound memory (draws x L x C counts)."""
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
    exact_limit: int = MAJ_EXACT_LIMIT,
    draws: int = MC_DRAWS,
    seed: int = 0,
) -> float:
    """maj@k of one problem from its ``n`` samples: the mean over all k-subsets (exact up to
    ``exact_limit`` subsets, else ``draws`` seeded random ones) of the chance the vote is right,
    ties split evenly among the tied answers.

    Even splitting is :func:`majority_vote`'s tie rule averaged over sample orders; unlike
    :func:`ttscale.eval.metrics.maj_at_k` (the pilot's one order) it is less noisy and matches
    the probe simulation, which draws random orders.
    """
    n = len(answers)
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")

    def value(subset: Sequence[int]) -> float:
        _, counts = majority_vote([answers[i] for i in subset])
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
    """maj@k for ``k`` beyond the samples, by the plug-in model: k answers drawn with
    replacement from the samples' empirical distribution (Monte Carlo, seeded; ties as in
    :func:`majority_vote`). Biased: it sharpens toward "is the empirical mode right" faster
    than the truth when n is small."""
    ids, names = _answer_ids(answers)
    good = np.array([a in right for a in names], dtype=bool)
    seqs = ids[_rng(seed, k).integers(0, len(ids), size=(draws, k))]
    return float(_vote_hits(seqs, good, [k])[k].mean())


def pass_at_k_ext(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for k <= n, the plug-in ``1 - (1 - c/n)^k`` beyond."""
    if k <= n:
        return pass_at_k(n, c, k)
    return 1.0 - (1.0 - c / n) ** k


def problem_accuracy(pp: PilotProblem, cand: PlanCandidate, seed: int = 0) -> float:
    """Expected accuracy of ``cand`` on one pilot problem."""
    if cand.measured:
        return float(pp.direct[cand.spec].correct)
    k = cand.k or 1
    if k <= pp.n:
        return _maj_cached(
            tuple(pp.answers), frozenset(pp.right_answers), k, seed ^ _problem_key(pp)
        )
    return plugin_maj_at_k(pp.answers, pp.right_answers, k, seed=seed ^ _problem_key(pp))


def problem_ceiling(pp: PilotProblem, cand: PlanCandidate) -> float:
    """The oracle ceiling of ``cand``: pass@k (extended beyond n), or a measured strategy's
    coverage."""
    if cand.measured:
        return float(pp.direct[cand.spec].covered)
    return pass_at_k_ext(pp.n, pp.n_correct, cand.k or 1)


def problem_seconds(pp: PilotProblem, cand: PlanCandidate, model: TimeModel) -> float:
    """Predicted cost of ``cand`` on one problem: majority@k = the prompt prefilled once + k
    samples of the problem's mean length; a measured strategy = its own tokens."""
    if cand.measured:
        d = pp.direct[cand.spec]
        return model.seconds(d.computed_prompt_tokens, d.generated_tokens, cand.samples)
    k = cand.k or 1
    return model.seconds(pp.prompt_tokens, k * pp.mean_tokens, k)


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
    """The smallest N at which one more sample adds less than ``epsilon`` to pass@N, averaged
    (weighted) over the problems. 0 when nothing is solvable; None when no problem has weight.
    pass@N is the oracle ceiling: a majority vote saturates earlier and lower."""
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


__all__ = [
    "DEFAULT_EPSILON",
    "MAX_EXTRAPOLATION",
    "PlanCandidate",
    "maj_at_k_fair",
    "marginal_pass_gain",
    "needs_measurement",
    "parse_candidates",
    "pass_at_k_ext",
    "plugin_maj_at_k",
    "problem_accuracy",
    "problem_ceiling",
    "problem_seconds",
    "saturation_n",
]
