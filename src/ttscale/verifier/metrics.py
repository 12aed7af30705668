"""How well a verifier ranks candidates, measured per problem.

Pooled AUROC mixes problems, so it rewards a probe that only knows which problems are hard.
What a strategy needs is ranking *within* a problem: the accuracy of the top-scored candidate,
of a score-weighted vote, and the within-problem AUROC over problems that have both correct
and wrong candidates. Every accuracy is per problem (0/1), so intervals bootstrap over
problems and comparisons are paired (McNemar's exact test on the discordant problems).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

from ttscale.tts.votes import majority_vote


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); ``None`` when one
    class is missing."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # mid-ranks over runs of equal scores
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


@dataclass(frozen=True)
class ProblemView:
    """What selection sees of one problem: candidates' answers, labels, scores, finish
    reasons, and whether greedy was right."""

    answers: Sequence[str | None]
    correct: Sequence[bool]
    scores: Sequence[float]
    finished: Sequence[bool]
    greedy_correct: bool


def _winner_correct(view: ProblemView, winner: str | None) -> bool:
    return winner is not None and any(
        c and a == winner for a, c in zip(view.answers, view.correct, strict=True)
    )


def select(view: ProblemView, hygiene: bool = False) -> dict[str, bool]:
    """Per-problem correctness of each selection rule. ``hygiene``: candidates cut off by the
    length limit take no part (unless every candidate was cut off)."""
    keep = list(range(len(view.answers)))
    if hygiene and any(view.finished):
        keep = [i for i in keep if view.finished[i]]
    answers = [view.answers[i] for i in keep]
    scores = [view.scores[i] for i in keep]
    # "weighted": sigmoid weights, P(correct) of a calibrated head (train.py applies Platt
    # scaling), as the probe scorer hands them to the weighted@N strategy. "weighted_softmax":
    # exp(s - max s) within the problem, blind to the logit's offset: a soft best-of-N.
    top_s = max(scores)
    soft = [math.exp(s - top_s) for s in scores]
    sig = [1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, s)))) for s in scores]
    top = keep[max(range(len(keep)), key=lambda j: scores[j])]
    return {
        "greedy": view.greedy_correct,
        "majority": _winner_correct(view, majority_vote(answers)[0]),
        "top1": bool(view.correct[top]),
        "weighted": _winner_correct(view, majority_vote(answers, sig)[0]),
        "weighted_softmax": _winner_correct(view, majority_vote(answers, soft)[0]),
        "pass": any(view.correct),
    }


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of the mean of per-problem values, resampling problems."""
    rng = np.random.default_rng(seed)
    n = len(values)
    if n == 0:
        return (math.nan, math.nan)
    means = values[rng.integers(0, n, size=(n_boot, n))].mean(1)
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict[str, float]:
    """Exact McNemar test of paired 0/1 outcomes: ``wins`` (a right, b wrong), ``losses`` and
    the two-sided p-value of the discordant split under p = 1/2."""
    wins = sum(bool(x) and not bool(y) for x, y in zip(a, b, strict=True))
    losses = sum(bool(y) and not bool(x) for x, y in zip(a, b, strict=True))
    p = 1.0 if wins + losses == 0 else float(binomtest(wins, wins + losses, 0.5).pvalue)
    return {"wins": wins, "losses": losses, "p_value": p}


def calibration(
    logits: Sequence[float], labels: Sequence[bool], bins: int = 10
) -> dict[str, float]:
    """Brier score and expected calibration error (equal-width bins) of sigmoid(logit) as
    P(correct)."""
    p = 1.0 / (1.0 + np.exp(-np.clip(np.asarray(logits, dtype=np.float64), -50, 50)))
    y = np.asarray(labels, dtype=np.float64)
    if len(p) == 0:
        return {"brier": math.nan, "ece": math.nan}
    which = np.minimum((p * bins).astype(int), bins - 1)
    ece = sum(
        abs(p[which == b].mean() - y[which == b].mean()) * (which == b).mean()
        for b in range(bins)
        if (which == b).any()
    )
    return {"brier": float(np.mean((p - y) ** 2)), "ece": float(ece)}


def evaluate(views: Sequence[ProblemView], hygiene: bool = False) -> dict[str, object]:
    """Accuracies with bootstrap 95% intervals, paired tests of the probe's rules against
    majority and greedy, pooled and mean within-problem AUROC."""
    rows = [select(v, hygiene) for v in views]
    out: dict[str, object] = {"n_problems": len(views), "hygiene": hygiene}
    acc: dict[str, dict[str, float]] = {}
    for rule in ("greedy", "majority", "top1", "weighted", "weighted_softmax", "pass"):
        vals = np.array([r[rule] for r in rows], dtype=np.float64)
        lo, hi = bootstrap_ci(vals)
        acc[rule] = {"accuracy": float(vals.mean()) if len(vals) else math.nan, "lo": lo, "hi": hi}
    out["accuracy"] = acc
    out["tests"] = {
        f"{rule}_vs_{base}": mcnemar([r[rule] for r in rows], [r[base] for r in rows])
        for rule in ("top1", "weighted")
        for base in ("majority", "greedy")
    }
    diffs = {}
    for rule in ("top1", "weighted"):
        d = np.array([float(r[rule]) - float(r["majority"]) for r in rows])
        lo, hi = bootstrap_ci(d)
        diffs[f"{rule}_minus_majority"] = {"mean": float(d.mean()), "lo": lo, "hi": hi}
    out["differences"] = diffs
    all_scores = [s for v in views for s in v.scores]
    all_labels = [c for v in views for c in v.correct]
    out["pooled_auroc"] = auroc(all_scores, all_labels)
    out["calibration"] = calibration(all_scores, all_labels)
    within = [a for v in views if (a := auroc(v.scores, v.correct)) is not None]
    out["within_auroc"] = float(np.mean(within)) if within else None
    out["mixed_problems"] = len(within)
    out["sample_accuracy"] = float(np.mean(all_labels)) if all_labels else math.nan
    return out
