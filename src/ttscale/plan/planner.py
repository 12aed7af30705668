"""The plan: price every routing (probe, uniform, oracle) on the pilot and keep the most
accurate one within the budget (:func:`make_plan`)."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ttscale.eval.metrics import pass_at_k
from ttscale.eval.store import jsonable
from ttscale.plan.bins import (
    BinPlan,
    Option,
    Values,
    bin_of,
    bin_plans,
    difficulty_thresholds,
    static_options,
    weighted,
)
from ttscale.plan.costs import TimeModel, TokenTimeModel, pilot_time_model
from ttscale.plan.curves import DEFAULT_EPSILON, MAX_EXTRAPOLATION, PlanCandidate, parse_candidates
from ttscale.plan.knapsack import choose, knapsack
from ttscale.plan.pilot_run import Pilot
from ttscale.plan.probe import Probe, probe_bins

DEFAULT_CANDIDATES = ("greedy", "majority@2", "majority@4", "majority@8")
# How much more accurate (predicted) a probe plan must be to be preferred to a uniform one.
PROBE_MARGIN = 0.005
ROUTINGS = ("probe", "uniform", "oracle")


class InfeasibleBudget(ValueError):
    """Even the cheapest plan costs more than the budget."""


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
    """One strategy per difficulty bin, how problems reach their bin, and the predictions."""

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
    token. Raises InfeasibleBudget when even the cheapest plan is over budget, ValueError for
    bad settings.
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
    model = pilot_time_model(pilot, hardware)
    thresholds = difficulty_thresholds(pilot.pass_rates, n_bins, binning)
    n_bins_eff = len(thresholds) + 1
    values = Values.of(pilot, cands, model, seed)
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
    oracle_bins = bin_plans(
        pilot, thresholds, onehot, [static_options(cands, values, w) for w in onehot], epsilon
    )
    # Uniform: the best single strategy, no probe. Its bins are the oracle bins (for the
    # table: how that one strategy fares per difficulty).
    uniform_bins = copy.deepcopy(oracle_bins)
    oracle = choose(oracle_bins, budget)
    pooled = static_options(cands, values, [1.0] * n)
    uniform_best = knapsack([(1.0, [(o.accuracy, o.seconds) for o in pooled])], budget)
    uniform = None
    if uniform_best is not None:
        spec = pooled[uniform_best[0][0]].spec  # type: ignore[index]
        for b in uniform_bins:
            if b.share > 0:
                b.pick(next(o for o in b.options if o.spec == spec))
        uniform = (uniform_best[1], uniform_best[2])

    probe_result = probed = probe = None
    probe_sec = 0.0
    if probe_samples and routing in ("auto", "probe"):
        probed, probe, probe_sec = probe_bins(
            pilot, cands, values, model, thresholds, probe_samples, epsilon, seed
        )
        probe_result = choose(probed, budget, extra=probe_sec)

    alternatives = [
        summary(
            "probe",
            probed,
            probe_result,
            "not tried" if probe_samples else "no probe (probe_samples=0)",
        ),
        summary("uniform", uniform_bins, uniform),
        summary("oracle", oracle_bins, oracle, "true pilot difficulty: an upper bound"),
    ]
    picks: dict[str, tuple[list[BinPlan] | None, Any]] = {
        "probe": (probed, probe_result),
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
            "uniform": _cheapest(pooled),
            "probe": probe_sec,
            "oracle": sum(b.share * _cheapest(b.options) for b in oracle_bins),
        }
        tried = ["probe", "uniform"] if routing == "auto" else [routing]
        floor = min(floors[r] for r in tried if r != "probe" or probed is not None)
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
        oracle_ceiling=weighted(
            [pass_at_k(p.n, p.n_correct, p.n) for p in pilot.problems], [1.0] * n
        ),
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
    pilot: Pilot, cands: Sequence[PlanCandidate], routing: str, m: int, model: TimeModel
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


__all__ = [
    "DEFAULT_CANDIDATES",
    "PROBE_MARGIN",
    "ROUTINGS",
    "InfeasibleBudget",
    "Plan",
    "RoutingSummary",
    "make_plan",
]
