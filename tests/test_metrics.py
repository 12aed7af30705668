"""Metrics: pass@k against brute force, majority vote rules, maj@k, summaries."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from ttscale.eval import maj_at_k, pass_at_k, summarize, wilson_interval
from ttscale.tts.votes import majority_vote

# --------------------------------------------------------------------------------------------
# pass@k


def _pass_at_k_brute(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of n samples (the first c correct) containing a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 10])
def test_pass_at_k_matches_brute_force(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute(n, c, k), abs=1e-12)


def test_pass_at_k_properties() -> None:
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c/n
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 8, 3) == 1.0  # n - c < k
    # large n: stable (a naive comb ratio would overflow floats) and monotone in k
    vals = [pass_at_k(2000, 7, k) for k in (1, 10, 100, 1000)]
    assert vals == sorted(vals) and 0 < vals[0] < vals[-1] < 1
    assert vals[1] == pytest.approx(1 - math.comb(1993, 10) / math.comb(2000, 10), rel=1e-12)
    for bad in [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


# --------------------------------------------------------------------------------------------
# majority vote


def test_majority_vote_basic() -> None:
    assert majority_vote(["a", "b", "a"]) == ("a", {"a": 2.0, "b": 1.0})
    assert majority_vote([None, "x", None]) == ("x", {"x": 1.0})
    assert majority_vote([None, None]) == (None, {})
    assert majority_vote([]) == (None, {})
    winner, dist = majority_vote(["b", "a", "c", "a"])
    assert winner == "a" and list(dist) == ["b", "a", "c"]  # first-appearance order


def test_majority_vote_ties() -> None:
    # the tied answer that reaches the maximum first wins
    assert majority_vote(["a", "b"])[0] == "a"
    assert majority_vote(["a", "b", "b", "a"])[0] == "b"  # b has 2 at index 2, a at index 3
    assert majority_vote(["a", "b", "a", "b"])[0] == "a"
    assert majority_vote([None, "c", "a", "a", "c"])[0] == "a"


def test_majority_vote_weights() -> None:
    assert majority_vote(["a", "b", "b"], [3.0, 1.0, 1.0]) == ("a", {"a": 3.0, "b": 2.0})
    assert majority_vote(["a", "b", "b"], [1.0, 1.0, 1.0])[0] == "b"
    # weighted tie 2 = 2: b reaches 2 at index 1, a at index 2
    assert majority_vote(["a", "b", "a"], [1.0, 2.0, 1.0])[0] == "b"
    assert majority_vote(["a", None, "b"], [0.5, 100.0, 0.7])[0] == "b"  # None's weight unused
    assert majority_vote(["a", "b"], [0.0, 0.0])[0] == "a"
    with pytest.raises(ValueError):
        majority_vote(["a"], [-1.0])
    with pytest.raises(ValueError):
        majority_vote(["a", "b"], [1.0])
    with pytest.raises(ValueError):
        majority_vote(["a"], [math.nan])


# --------------------------------------------------------------------------------------------
# maj@k


def test_maj_at_k_by_hand() -> None:
    answers = ["1", "1", "2", None]
    # k=2, 6 subsets: {1,1} {1,2}(tie -> 1) {1,-} {1,2} {1,-} ok; {2,-} wrong -> 5/6
    assert maj_at_k(answers, "1", 2) == pytest.approx(5 / 6)
    assert maj_at_k(answers, "1", 1) == pytest.approx(0.5)
    assert maj_at_k(answers, "1", 3) == 1.0
    assert maj_at_k(answers, "1", 4) == 1.0
    assert maj_at_k(answers, "2", 2) == pytest.approx(1 / 6)
    # ties follow majority_vote's rule inside each subset (kept in sampling order):
    # k=2 over [2,1,1,2]: {2,1} {2,1} {2,2} wrong, {1,1} {1,2} {1,2} right -> 1/2
    assert maj_at_k(["2", "1", "1", "2"], "1", 2) == pytest.approx(0.5)
    assert maj_at_k(["2", "1", "1", "2"], "1", 4) == 1.0  # 1 reaches 2 votes first
    assert maj_at_k([None, None], "1", 2) == 0.0


def test_maj_at_k_correct_forms_and_weights() -> None:
    answers = ["0.5", "1/3", "0.5", "2"]
    assert maj_at_k(answers, {"0.5", "2"}, 2) == maj_at_k(answers, lambda a: a in ("0.5", "2"), 2)
    # a huge weight on the single "2" makes it win every subset it is in (3 of 6)
    w = [1.0, 1.0, 1.0, 10.0]
    assert maj_at_k(answers, "2", 2, weights=w) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        maj_at_k(answers, "2", 0)
    with pytest.raises(ValueError):
        maj_at_k(answers, "2", 5)


def test_maj_at_k_matches_brute_force_and_monte_carlo() -> None:
    rng = random.Random(0)
    answers = [rng.choice(["a", "a", "b", "c", None]) for _ in range(12)]
    k = 5
    subsets = list(itertools.combinations(range(12), k))
    brute = sum(majority_vote([answers[i] for i in s])[0] == "a" for s in subsets) / len(subsets)
    assert maj_at_k(answers, "a", k) == pytest.approx(brute)
    mc = maj_at_k(answers, "a", k, exact_limit=0, num_samples=3000, seed=1)
    assert mc == maj_at_k(answers, "a", k, exact_limit=0, num_samples=3000, seed=1)  # seeded
    assert mc == pytest.approx(brute, abs=0.04)  # ~4.5 standard errors


# --------------------------------------------------------------------------------------------
# summaries


def test_wilson_interval() -> None:
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.49016, abs=1e-4) and hi == pytest.approx(0.94332, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and 0 < wilson_interval(0, 20)[1] < 0.2
    assert wilson_interval(20, 20)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_summarize() -> None:
    records = [
        {"correct": True, "tokens": 10, "wall_time": 1.0},
        {"correct": False, "tokens": 30, "wall_time": 2.0},
        {"correct": True, "tokens": 20},
        {"correct": True},
    ]
    s = summarize(records)
    assert s["n"] == 4 and s["n_correct"] == 3 and s["accuracy"] == 0.75
    assert (s["accuracy_lo"], s["accuracy_hi"]) == wilson_interval(3, 4)
    assert s["mean_tokens"] == 20 and s["total_tokens"] == 60
    assert s["mean_wall_time"] == 1.5 and s["total_wall_time"] == 3.0
    empty = summarize([])
    assert empty["n"] == 0 and empty["accuracy"] is None and empty["mean_tokens"] is None
    with pytest.raises(ValueError):
        summarize([{"tokens": 1}])
