"""Two evaluation runs side by side: per strategy, the accuracy difference on the problems
both ran, whether it is real, and what it costs.

Paired, because both runs answer the same problems: a problem that is easy for one is easy
for the other, so pairing removes most of the between-problem noise that makes two
independent 95% intervals overlap at 16 problems (+-20 points each).

- McNemar's exact test (McNemar 1947; the exact binomial form, as in Fagerland et al. 2013)
  on the discordant problems: under "no difference", each problem one run gets right and the
  other wrong is equally likely to go either way, so ``b_only ~ Binomial(b_only + a_only,
  1/2)``; two-sided p.
- A paired bootstrap interval (Efron & Tibshirani 1993, percentile method) for the accuracy
  difference: problems resampled with replacement, both runs' outcomes kept together.
- Cost ratios B / A of the mean seconds (amortized), FLOPs and bytes per problem over the
  same shared problems.

Pure: records in (``store.load_records``), numbers out; the CLI prints and plots them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# Per-problem costs compared, as (label, record field).
COST_FIELDS = (("seconds", "amortized_time"), ("flops", "flops"), ("bytes", "bytes"))


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (1.0 when there are none):
    twice the smaller binomial tail of Binomial(a_only + b_only, 1/2), capped at 1."""
    if a_only < 0 or b_only < 0:
        raise ValueError("discordant counts must be >= 0")
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_bootstrap_ci(
    a: Sequence[bool],
    b: Sequence[bool],
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of mean(b) - mean(a) over problems resampled with replacement
    (pairs kept together). Seeded: the same runs always give the same interval."""
    if len(a) != len(b) or not a:
        raise ValueError("a and b must be non-empty and paired (same length)")
    if not 0 < level < 1:
        raise ValueError("level must be in (0, 1)")
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)  # (P,)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))  # (n_boot, P)
    means = d[idx].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


@dataclass(frozen=True)
class StrategyComparison:
    """One strategy in runs A and B, on the ``n`` problems both ran."""

    strategy: str
    n: int
    accuracy_a: float
    accuracy_b: float
    diff: float  # accuracy_b - accuracy_a
    ci_lo: float  # paired bootstrap interval of diff
    ci_hi: float
    a_only: int  # problems A got right and B wrong
    b_only: int
    p_value: float  # exact McNemar, two-sided
    cost_ratios: dict[str, float | None] = field(default_factory=dict)  # B / A per problem
    only_in_a: int = 0  # problems this strategy ran in A alone (left out)
    only_in_b: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _by_problem(records: Sequence[dict[str, Any]], strategy: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["strategy"] == strategy:
            out.setdefault(str(r["problem_id"]), r)
    return out


def _mean_cost(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r.get(key) for r in rows]
    if not values or any(not isinstance(v, (int, float)) for v in values):
        return None  # one run without the cost model: no ratio rather than a partial one
    return sum(values) / len(values)


def compare_strategy(
    records_a: Sequence[dict[str, Any]],
    records_b: Sequence[dict[str, Any]],
    strategy: str,
    n_boot: int = 10_000,
    seed: int = 0,
) -> StrategyComparison:
    """``strategy`` in both runs, on their shared problems; ValueError if they share none."""
    a, b = _by_problem(records_a, strategy), _by_problem(records_b, strategy)
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError(f"{strategy}: the two runs share no problem")
    ca = [bool(a[p]["correct"]) for p in shared]
    cb = [bool(b[p]["correct"]) for p in shared]
    a_only = sum(x and not y for x, y in zip(ca, cb, strict=True))
    b_only = sum(y and not x for x, y in zip(ca, cb, strict=True))
    lo, hi = paired_bootstrap_ci(ca, cb, n_boot=n_boot, seed=seed)
    ratios: dict[str, float | None] = {}
    for label, key in COST_FIELDS:
        mean_a = _mean_cost([a[p] for p in shared], key)
        mean_b = _mean_cost([b[p] for p in shared], key)
        ok = mean_a is not None and mean_b is not None and mean_a > 0
        ratios[label] = mean_b / mean_a if ok else None  # type: ignore[operator]
    n = len(shared)
    return StrategyComparison(
        strategy=strategy,
        n=n,
        accuracy_a=sum(ca) / n,
        accuracy_b=sum(cb) / n,
        diff=(sum(cb) - sum(ca)) / n,
        ci_lo=lo,
        ci_hi=hi,
        a_only=a_only,
        b_only=b_only,
        p_value=mcnemar_exact(a_only, b_only),
        cost_ratios=ratios,
        only_in_a=len(set(a) - set(b)),
        only_in_b=len(set(b) - set(a)),
    )


def shared_strategies(
    records_a: Sequence[dict[str, Any]], records_b: Sequence[dict[str, Any]]
) -> list[str]:
    """Strategies both runs hold, in A's order."""
    in_b = {r["strategy"] for r in records_b}
    return list(dict.fromkeys(r["strategy"] for r in records_a if r["strategy"] in in_b))


def compare_runs(
    records_a: Sequence[dict[str, Any]],
    records_b: Sequence[dict[str, Any]],
    strategies: Sequence[str] | None = None,
    n_boot: int = 10_000,
    seed: int = 0,
) -> list[StrategyComparison]:
    """Every strategy both runs hold (or the ones asked for, each of which both must hold)."""
    common = shared_strategies(records_a, records_b)
    if strategies is None:
        if not common:
            raise ValueError("the two runs share no strategy")
        strategies = common
    for s in strategies:
        if s not in common:
            have_a = sorted({r["strategy"] for r in records_a})
            have_b = sorted({r["strategy"] for r in records_b})
            raise ValueError(
                f"strategy {s!r} is not in both runs (A: {', '.join(have_a) or 'none'}; "
                f"B: {', '.join(have_b) or 'none'})"
            )
    return [compare_strategy(records_a, records_b, s, n_boot, seed) for s in strategies]


def settings_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """What differs between two runs' settings (run.json), as 'key: A -> B' lines: what the
    comparison is a comparison of."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b), key=str):
            out += settings_diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


__all__ = [
    "COST_FIELDS",
    "StrategyComparison",
    "compare_runs",
    "compare_strategy",
    "mcnemar_exact",
    "paired_bootstrap_ci",
    "settings_diff",
    "shared_strategies",
]
