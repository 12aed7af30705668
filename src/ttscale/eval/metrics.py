"""Metrics of a sampling evaluation: pass@k, maj@k, accuracy summaries (votes are counted by
``ttscale.tts.votes``, the same rule the voting strategies select by).

Conventions: answers are *normalized* strings (``task.extract_answer`` output) and ``None``
means "no answer extracted"; ``None`` never votes and is never correct.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from ttscale.tts.votes import check_weights, plurality

# maj_at_k: enumerate all C(n, k) subsets up to this many, else Monte Carlo.
MAJ_EXACT_LIMIT = 20_000
# Monte Carlo subsets per (problem, k): standard error <= 0.5 / sqrt(4000) ~ 0.008 on one
# problem, far below the between-problem noise of any benchmark mean.
MAJ_MC_SAMPLES = 4_000

Z95 = 1.959963984540054  # two-sided 95% normal quantile


# --------------------------------------------------------------------------------------------
# pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator of pass@k from ``n`` samples of which ``c`` are correct (Chen et al.
    2021): the probability that a uniformly random ``k``-subset of the samples contains a
    correct one, ``1 - C(n-c, k) / C(n, k)``.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` -- no huge binomials, no cancellation for
    large ``n``. Requires ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError("n, c and k must be integers")
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


# --------------------------------------------------------------------------------------------
# maj@k


def _correct_fn(correct: Collection[str] | str | Callable[[str], bool]) -> Callable[[str], bool]:
    if callable(correct):
        return correct
    if isinstance(correct, str):
        return lambda a: a == correct
    accepted = frozenset(correct)
    return lambda a: a in accepted


def maj_at_k(
    answers: Sequence[str | None],
    correct: Collection[str] | str | Callable[[str], bool],
    k: int,
    *,
    weights: Sequence[float] | None = None,
    exact_limit: int = MAJ_EXACT_LIMIT,
    num_samples: int = MAJ_MC_SAMPLES,
    seed: int = 0,
) -> float:
    """Expected accuracy of a majority vote over ``k`` of the ``n`` samples of one problem.

    ``answers``: the ``n`` normalized answers (``None`` = nothing extracted), in sampling order.
    ``correct``: the correct normalized answer(s): a string, a collection of strings, or a
    predicate (e.g. ``lambda a: task.is_correct(problem, a)``); it is called once per distinct
    answer. ``weights``: optional per-sample vote weights (weighted maj@k).

    The value is the mean, over all ``k``-subsets of the samples (kept in sampling order, so
    the tie rule of :func:`ttscale.tts.votes.majority_vote` applies unchanged), of
    ``1[winner is correct]``; a subset whose answers are all ``None`` counts as wrong. It is
    exact when ``C(n, k) <= exact_limit`` (all subsets enumerated) and otherwise a Monte Carlo
    estimate from ``num_samples`` uniform random subsets drawn with ``random.Random(seed)`` --
    deterministic for a given seed.
    ``maj@1`` is the fraction of correct samples and ``maj@n`` the vote over all samples.
    """
    n = len(answers)
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    check_weights(n, weights)
    is_correct = _correct_fn(correct)

    # Answers -> small ints (first-appearance order) so subset votes hash ints, not strings.
    ids: dict[str, int] = {}
    keys: list[int | None] = []
    for a in answers:
        keys.append(None if a is None else ids.setdefault(a, len(ids)))
    good = [False] * len(ids)
    for a, i in ids.items():
        good[i] = bool(is_correct(a))

    def hit(subset: Sequence[int]) -> bool:
        sub_w = None if weights is None else [weights[i] for i in subset]
        winner, _ = plurality([keys[i] for i in subset], sub_w)
        return winner is not None and good[winner]

    if k == 1:  # closed form: each sample alone wins its vote
        return sum(key is not None and good[key] for key in keys) / n
    if k == n:
        return float(hit(range(n)))
    if math.comb(n, k) <= exact_limit:
        subsets = list(itertools.combinations(range(n), k))
        return sum(hit(s) for s in subsets) / len(subsets)
    if num_samples < 1:
        raise ValueError("num_samples must be >= 1")
    rng = random.Random(seed)
    hits = sum(hit(sorted(rng.sample(range(n), k))) for _ in range(num_samples))
    return hits / num_samples


# --------------------------------------------------------------------------------------------
# summaries


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (default 95%); ``(0, 1)`` if ``n == 0``.

    Unlike the normal interval it stays inside [0, 1] and is sensible at 0% / 100% accuracy,
    which small-model evaluations hit often.
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}, {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate per-problem records into a JSON-ready summary.

    Each record needs ``correct`` (bool); ``tokens`` (generated tokens for the problem, all
    samples) and ``wall_time`` (seconds) are optional and averaged over the records that have
    them (``None`` when none do). Returns ``n``, ``n_correct``, ``accuracy`` (``None`` if
    ``n == 0``), ``accuracy_lo`` / ``accuracy_hi`` (95% Wilson interval), ``mean_tokens``,
    ``total_tokens``, ``mean_wall_time``, ``total_wall_time``.
    """
    n = len(records)
    try:
        n_correct = sum(bool(r["correct"]) for r in records)
    except KeyError:
        raise ValueError("every record needs a 'correct' key") from None
    lo, hi = wilson_interval(n_correct, n)
    tokens = [r["tokens"] for r in records if r.get("tokens") is not None]
    times = [float(r["wall_time"]) for r in records if r.get("wall_time") is not None]
    return {
        "n": n,
        "n_correct": n_correct,
        "accuracy": n_correct / n if n else None,
        "accuracy_lo": lo,
        "accuracy_hi": hi,
        "mean_tokens": sum(tokens) / len(tokens) if tokens else None,
        "total_tokens": sum(tokens) if tokens else None,
        "mean_wall_time": sum(times) / len(times) if times else None,
        "total_wall_time": sum(times) if times else None,
    }
