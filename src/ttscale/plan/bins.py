"""Difficulty bins (by pilot pass rate) and each bin's options: the candidates' accuracy, cost
and ceiling averaged over the pilot problems routed there, plus its pass@k / maj@k curves."""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ttscale.eval.metrics import pass_at_k
from ttscale.eval.summary import k_values
from ttscale.plan.costs import TimeModel
from ttscale.plan.curves import (
    PlanCandidate,
    problem_accuracy,
    problem_ceiling,
    problem_seconds,
    saturation_n,
)
from ttscale.plan.pilot_run import Pilot

BIN_NAMES = {1: ("all",), 2: ("hard", "easy"), 3: ("hard", "medium", "easy")}


def difficulty_thresholds(
    pass_rates: Sequence[float], n_bins: int = 3, method: str = "fixed"
) -> list[float]:
    """Ascending pass-rate thresholds; bin b holds ``thresholds[b-1] <= p < thresholds[b]``,
    bin 0 the hardest.

    ``fixed``: equal widths, ``b / n_bins`` (3 bins: p < 1/3 hard, < 2/3 medium, else easy),
    comparable between runs. ``quantile``: about equally many pilot problems per bin (as Snell
    et al.); tied pass rates stay together, so there may be fewer bins than asked.
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

    def pick(self, option: Option, extra: float = 0.0) -> None:
        """Records ``option`` as the choice (``extra``: seconds per problem spent before it)."""
        self.chosen, self.predicted_accuracy = option.spec, option.accuracy
        self.ceiling, self.predicted_seconds = option.ceiling, extra + option.seconds


def weighted(values: Sequence[float], weights: Sequence[float]) -> float:
    """The ``weights``-weighted mean of ``values`` (0 when the weights sum to 0)."""
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights, strict=True)) / total if total else 0.0


@dataclass
class Values:
    """Per-problem values of every candidate (no probe): acc[c][i], sec[c][i], ceil[c][i]."""

    acc: dict[str, list[float]]
    sec: dict[str, list[float]]
    ceil: dict[str, list[float]]

    @classmethod
    def of(
        cls, pilot: Pilot, candidates: Sequence[PlanCandidate], model: TimeModel, seed: int
    ) -> Values:
        acc, sec, ceil = {}, {}, {}
        for c in candidates:
            acc[c.spec] = [problem_accuracy(p, c, seed) for p in pilot.problems]
            sec[c.spec] = [problem_seconds(p, c, model) for p in pilot.problems]
            ceil[c.spec] = [problem_ceiling(p, c) for p in pilot.problems]
        return cls(acc, sec, ceil)


def static_options(
    candidates: Sequence[PlanCandidate], values: Values, w: Sequence[float]
) -> list[Option]:
    """The candidates' options on problems weighted by ``w`` (no probe)."""
    return [
        Option(
            spec=c.spec,
            accuracy=weighted(values.acc[c.spec], w),
            seconds=weighted(values.sec[c.spec], w),
            ceiling=weighted(values.ceil[c.spec], w),
            extrapolated=c.extrapolated,
            measured=c.measured,
        )
        for c in candidates
    ]


def _curves(pilot: Pilot, weights: Sequence[float]) -> tuple[dict[str, float], dict[str, float]]:
    """pass@k and maj@k (k = 1, 2, 4, ..., n) of the bin's problems, weighted."""
    pass_k, maj_k = {}, {}
    for k in k_values(pilot.n_samples):
        pass_k[str(k)] = weighted([pass_at_k(p.n, p.n_correct, k) for p in pilot.problems], weights)
        maj_k[str(k)] = weighted(
            [problem_accuracy(p, PlanCandidate(f"majority@{k}", k, k)) for p in pilot.problems],
            weights,
        )
    return pass_k, maj_k


def bin_plans(
    pilot: Pilot,
    thresholds: Sequence[float],
    weights: Sequence[Sequence[float]],
    options: Sequence[Sequence[Option]],
    epsilon: float,
) -> list[BinPlan]:
    """One unchosen :class:`BinPlan` per bin b, with pilot problem i weighted by
    ``weights[b][i]`` (its probability of being routed there) and options ``options[b]``."""
    n = len(pilot.problems)
    names = bin_names(len(weights))
    ranges = bin_ranges(thresholds)
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
                pass_rate=weighted(pilot.pass_rates, w),
                options=list(options[b]),
                pass_at_k=pass_k,
                maj_at_k=maj_k,
                saturation_n=saturation_n(pilot.pass_rates, epsilon, w),
            )
        )
    return out


__all__ = [
    "BinPlan",
    "Option",
    "Values",
    "bin_names",
    "bin_of",
    "bin_plans",
    "bin_ranges",
    "difficulty_thresholds",
    "static_options",
    "weighted",
]
