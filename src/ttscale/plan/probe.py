"""The probe: route a new problem by the answer agreement of a first wave of ``m`` samples,
calibrated on the pilot; and the bins a probe plan sees, simulated on the pilot's samples so
that the probe's cost and routing errors are in the prediction."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ttscale.plan.bins import (
    BinPlan,
    Option,
    Values,
    bin_of,
    bin_plans,
    static_options,
    weighted,
)
from ttscale.plan.costs import TimeModel
from ttscale.plan.curves import MC_DRAWS, PlanCandidate, _answer_ids, _problem_key, _rng, _vote_hits
from ttscale.plan.pilot_run import Pilot, PilotProblem
from ttscale.tts.votes import majority_vote


def agreement(answers: Sequence[str | None]) -> int:
    """Votes of the most frequent answer (None never votes): the probe's difficulty signal
    (self-consistency: agreement tracks accuracy, Wang et al. 2022)."""
    _, totals = majority_vote(answers)
    return int(max(totals.values())) if totals else 0


@dataclass
class ProbeSim:
    """One pilot problem under the probe protocol, per draw of a random order of its samples
    (extended by plug-in draws beyond n): the probe is the first m, a continuation to k the
    first k."""

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
    if names:  # vectorized agreement() of the first m
        level = (seqs[:, :m, None] == np.arange(len(names))).sum(axis=1).max(axis=1)
    else:
        level = np.zeros(draws, dtype=np.int64)
    covers = {k: correct[:, :k].any(axis=1).astype(float) for k in lengths}
    return ProbeSim(level=level, hits=hits, covers=covers)


@dataclass
class Probe:
    """Routes a problem by the agreement of ``samples`` probe answers: ``calibration[j]`` is the
    mean pilot pass rate of problems whose probe agreed j times (over simulated probes), and
    the bin is where that falls."""

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


def probe_bins(
    pilot: Pilot,
    candidates: Sequence[PlanCandidate],
    values: Values,
    model: TimeModel,
    thresholds: Sequence[float],
    m: int,
    epsilon: float,
    seed: int,
) -> tuple[list[BinPlan], Probe, float]:
    """Bins as a probe of ``m`` samples routes the pilot problems, with options conditional on
    the probe (simulated); returns them, the probe and its seconds per problem."""
    probs = pilot.problems
    n_bins = len(thresholds) + 1
    cont = sorted({c.k for c in candidates if c.k is not None and c.k > m})
    sims = [simulate_probe(p, m, cont, seed=seed) for p in probs]
    level_probs = [np.bincount(s.level, minlength=m + 1)[: m + 1] / len(s.level) for s in sims]
    probe = calibrate_probe(pilot.pass_rates, level_probs, m, thresholds)
    route = np.array([probe.bin_of(j) for j in range(m + 1)])
    probe_sec = sum(model.seconds(p.prompt_tokens, m * p.mean_tokens, m) for p in probs)
    probe_sec /= len(probs)
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
                opts += static_options([c], values, weights[b])
            elif c.k is not None and c.k > m:
                k = c.k
                sec = [model.seconds(0, (k - m) * p.mean_tokens, k - m) for p in probs]
                opts.append(
                    Option(
                        spec=c.spec,
                        accuracy=mean_given(b, lambda s, k=k: s.hits[k]),
                        seconds=weighted(sec, weights[b]),
                        ceiling=mean_given(b, lambda s, k=k: s.covers[k]),
                        extrapolated=c.extrapolated,
                        continues_probe=True,
                    )
                )
        options.append(opts)
    return bin_plans(pilot, thresholds, weights, options, epsilon), probe, probe_sec


__all__ = ["Probe", "ProbeSim", "agreement", "calibrate_probe", "probe_bins", "simulate_probe"]
