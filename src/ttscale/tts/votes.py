"""Vote counting over candidates' answers: what voting strategies select by and what the
evaluation's maj@k averages, so both count votes the same way.

Conventions: answers are *normalized* strings (``task.extract_answer`` output) and ``None``
means "no answer extracted"; ``None`` never votes.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


def plurality(keys: Sequence[K | None], weights: Sequence[float] | None) -> tuple[K | None, dict]:
    """:func:`majority_vote` over any hashable keys, weights unchecked (callers that vote many
    subsets of the same answers, like maj@k, check them once)."""
    totals: dict[K, float] = {}
    for i, key in enumerate(keys):
        if key is None:
            continue
        w = 1.0 if weights is None else float(weights[i])
        totals[key] = totals.get(key, 0.0) + w
    if not totals:
        return None, totals
    best = max(totals.values())
    if sum(1 for v in totals.values() if v == best) == 1:
        return next(k for k, v in totals.items() if v == best), totals
    # Tie: replay the votes; the first key whose running total reaches the maximum wins. The
    # running total at a key's last vote is bit-identical to its final total (same additions in
    # the same order), so exact comparison is safe.
    running: dict[K, float] = {}
    for i, key in enumerate(keys):
        if key is None:
            continue
        running[key] = running.get(key, 0.0) + (1.0 if weights is None else float(weights[i]))
        if totals[key] == best and running[key] == best:
            return key, totals
    raise AssertionError("unreachable: the maximum is reached by some key")


def check_weights(n: int, weights: Sequence[float] | None) -> None:
    """Raises ValueError unless ``weights`` is None or n finite weights >= 0."""
    if weights is None:
        return
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} answers")
    for w in weights:
        if not (w >= 0.0 and math.isfinite(w)):
            # Summing signed scores would make extra votes *lower* an answer's total; raw
            # reward-model logits need a monotone map to [0, inf) (e.g. sigmoid) first.
            raise ValueError(
                f"vote weights must be finite and >= 0, got {w} "
                "(map raw reward-model logits through a sigmoid first)"
            )


def majority_vote(
    answers: Sequence[str | None], weights: Sequence[float] | None = None
) -> tuple[str | None, dict[str, float]]:
    """Plurality vote over normalized answers.

    Returns ``(winner, totals)``: ``totals`` maps each answer to its vote count (or summed
    weight), in order of first appearance; ``winner`` has the largest total. ``None`` answers do
    not vote; no votes at all gives ``(None, {})``.

    Ties are broken deterministically: the winner is the tied answer that *reached* the maximum
    total first when the votes are read in order (``[a, b, b, a]`` -> ``b``, which had 2 votes
    at position 2, before ``a`` at position 3). With weights (finite, >= 0, e.g. reward-model
    scores for weighted voting) the same rule applies to running weight sums; if every weight
    is 0, every answer ties at 0 and the first answer wins.
    """
    check_weights(len(answers), weights)
    return plurality(answers, weights)


def vote_with_ties(
    answers: Sequence[str | None],
    weights: Sequence[float] | None = None,
    scores: Sequence[float | None] | None = None,
) -> tuple[str | None, dict[str, float], list[str]]:
    """:func:`majority_vote`, saying which answers tied for the lead.

    Returns ``(winner, totals, tied)``; ``tied`` lists every answer with the maximal total in
    order of first appearance (a single answer when there is no tie). The documented rule for
    a tie: the tied answer with the highest candidate score wins (when ``scores`` are given),
    then the one that reached the maximum first (:func:`majority_vote`'s rule).
    """
    winner, totals = majority_vote(answers, weights)
    if not totals:
        return None, totals, []
    best = max(totals.values())
    tied = [a for a, v in totals.items() if v == best]
    if len(tied) > 1 and scores is not None:
        top: dict[str, float] = {}
        for a, s in zip(answers, scores, strict=True):
            if a in tied and s is not None:
                top[a] = max(top.get(a, float("-inf")), s)
        if top:
            best_score = max(top.values())
            leaders = [a for a in tied if top.get(a) == best_score]
            if winner not in leaders:
                winner = leaders[0]
    return winner, totals, tied


__all__ = ["check_weights", "majority_vote", "plurality", "vote_with_ties"]
