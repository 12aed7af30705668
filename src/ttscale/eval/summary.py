"""The summary of an evaluation: per-strategy accuracy (Wilson interval), coverage,
pass@k / maj@k and mean / total cost, computed from the store's records."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from ttscale.eval.metrics import maj_at_k, pass_at_k, wilson_interval
from ttscale.eval.store import BASE_STATS

# Numeric record keys that are not per-problem costs (kept out of the cost discovery).
_NOT_COST = frozenset({"n_candidates", "chunk_size", "amortized_time"})
# maj@k with large N falls back to Monte Carlo; 1000 subsets per (problem, k) keeps the summary
# of a 500-problem run at N=64 to seconds, with a per-problem standard error <= 0.016.
MAJ_SAMPLES = 1000


def k_values(n: int) -> list[int]:
    """1, the powers of 2 below n, and n."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return [*ks, n]


def _mean(values: Sequence[float]) -> float | None:
    # fsum: exactly rounded, so a summary does not depend on the order records arrived in.
    return math.fsum(values) / len(values) if values else None


def cost_keys(records: Iterable[dict[str, Any]]) -> list[str]:
    """Numeric per-problem fields beyond the base stats (cost model fields), in order seen."""
    keys: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k in BASE_STATS or k in _NOT_COST:
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                keys[k] = None
    return list(keys)


def strategy_summary(strategy: str, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregates one strategy's records (one per problem).

    pass@k and maj@k are computed when every problem has >= 2 candidates, at k = 1, the powers
    of 2 and N (the fewest candidates any problem has, so every k fits every problem): pass@k
    with the unbiased estimator, maj@k over the k-subsets of the candidates. Times are
    amortized (chunk time / chunk size), so ``total_wall_time`` is the real elapsed time.
    """
    n = len(records)
    n_correct = sum(bool(r["correct"]) for r in records)
    lo, hi = wilson_interval(n_correct, n)

    def col(key: str) -> list[float]:
        return [float(r[key]) for r in records if r.get(key) is not None]

    covered = sum(any(c["correct"] for c in r["candidates"]) for r in records)
    computed, cached = sum(col("computed_prompt_tokens")), sum(col("cached_prompt_tokens"))
    out: dict[str, Any] = {
        "strategy": strategy,
        "n": n,
        "n_correct": n_correct,
        "accuracy": n_correct / n if n else None,
        "accuracy_lo": lo,
        "accuracy_hi": hi,
        "coverage": covered / n if n else None,
        "mean_candidates": _mean(col("n_candidates")),
        "mean_tokens": _mean(col("generated_tokens")),
        "total_tokens": sum(col("generated_tokens")),
        "mean_prompt_tokens": _mean(col("prompt_tokens")),
        "mean_computed_prompt_tokens": _mean(col("computed_prompt_tokens")),
        "mean_cached_prompt_tokens": _mean(col("cached_prompt_tokens")),
        "prompt_cache_share": cached / (computed + cached) if computed + cached else None,
        "mean_forks": _mean(col("forks")),
        "mean_peak_kv_blocks": _mean(col("peak_kv_blocks")),
        "max_peak_kv_blocks": max(col("peak_kv_blocks"), default=None),
        "mean_wall_time": _mean(col("amortized_time")),
        "total_wall_time": math.fsum(col("amortized_time")),
        "mean_session_time": _mean(col("wall_time")),
        # Runs that measured these times (a resumed folder has several; records written
        # before sessions were recorded count as one): times of different runs were taken
        # under different machine load.
        "timing_sessions": len({r.get("session") for r in records}),
    }
    for key in cost_keys(records):
        values = col(key)
        out[f"mean_{key}"] = _mean(values)
        out[f"total_{key}"] = math.fsum(values)

    k_max = min((len(r["candidates"]) for r in records), default=0)
    if k_max >= 2:
        ks = k_values(k_max)
        out["k_max"] = k_max
        per_problem_pass: dict[int, list[float]] = {k: [] for k in ks}
        per_problem_maj: dict[int, list[float]] = {k: [] for k in ks}
        for r in records:
            cands = r["candidates"][:k_max]  # the same N for every problem
            right = {c["answer"] for c in cands if c["correct"]}
            answers = [c["answer"] for c in cands]
            n_right = sum(bool(c["correct"]) for c in cands)
            for k in ks:
                per_problem_pass[k].append(pass_at_k(k_max, n_right, k))
                per_problem_maj[k].append(
                    maj_at_k(answers, right.__contains__, k, num_samples=MAJ_SAMPLES)
                )
        out["pass_at_k"] = {str(k): math.fsum(v) / n for k, v in per_problem_pass.items()}
        out["maj_at_k"] = {str(k): math.fsum(v) / n for k, v in per_problem_maj.items()}
    return out


def summarize_records(
    records: Iterable[dict[str, Any]],
    problem_ids: Sequence[str] | None = None,
    order: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Per-strategy summaries; strategies in ``order`` first, then as they appear. With
    ``problem_ids``, only those problems count (so every strategy is judged on the same set)."""
    wanted = set(problem_ids) if problem_ids is not None else None
    by_strategy: dict[str, list[dict[str, Any]]] = {s: [] for s in order}
    for r in records:
        if wanted is None or r["problem_id"] in wanted:
            by_strategy.setdefault(r["strategy"], []).append(r)
    return [strategy_summary(s, rs) for s, rs in by_strategy.items() if rs]


__all__ = ["MAJ_SAMPLES", "cost_keys", "k_values", "strategy_summary", "summarize_records"]
