"""The budgeted choice: one option per difficulty bin, a multiple-choice knapsack solved exactly."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ttscale.plan.bins import BinPlan


def knapsack(
    bins: Sequence[tuple[float, Sequence[tuple[float, float]]]], budget: float
) -> tuple[list[int | None], float, float] | None:
    """Multiple-choice knapsack: each bin ``(share, [(accuracy, cost), ...])`` picks one option;
    maximize ``sum share * accuracy`` subject to ``sum share * cost <= budget``.

    Exact, by dynamic programming over Pareto fronts: after each bin only the partial plans no
    other beats on both cost and accuracy are kept (every later bin adds the same to both), so
    the budget is never discretized. Ties: higher accuracy, then lower cost, then earlier
    options. Bins with share 0 pick None. Returns ``(choices, accuracy, cost)``, or None if
    nothing fits.
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


def choose(
    bins: list[BinPlan], budget_per_problem: float, extra: float = 0.0
) -> tuple[float, float] | None:
    """Picks each bin's option by :func:`knapsack` within ``budget_per_problem`` (``extra``
    per problem, e.g. the probe, spent first) and records the choices in place; returns the
    predicted (accuracy, seconds per problem), or None when nothing fits."""
    solved = knapsack(
        [(b.share, [(o.accuracy, o.seconds) for o in b.options]) for b in bins],
        budget_per_problem - extra,
    )
    if solved is None:
        return None
    choices, acc, cost = solved
    for b, j in zip(bins, choices, strict=True):
        if j is not None:
            b.pick(b.options[j], extra)
    return acc, extra + cost


__all__ = ["choose", "knapsack"]
