"""Choosing and testing an answer probe (:mod:`ttscale.verifier.answers`).

The search is grouped cross-validation on the training problems only, like the text probe's
(:mod:`ttscale.verifier.fit`), but the criterion is what the probe is for: the out-of-fold
share of problems whose top-scored *answer* is correct (mean within-problem AUROC breaks ties).
Every layer alone with three heads (MLP and linear with the listwise loss, MLP with BCE), then
the best three layers concatenated. The chosen configuration is refitted on every training
problem and measured once on the test problems, against the majority vote of the same samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ttscale.verifier.answers import AnswerTable
from ttscale.verifier.fit import within_auroc
from ttscale.verifier.metrics import bootstrap_ci, mcnemar
from ttscale.verifier.train import ProbeHead, TrainConfig, group_folds, train_head

HEAD_TRIALS = (("mlp", "listwise"), ("logreg", "listwise"), ("mlp", "bce"))


@dataclass
class AnswerTrial:
    layers: tuple[int, ...]
    config: TrainConfig
    top1: float
    majority: float
    within_auroc: float
    seconds: float

    def row(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "head": self.config.head,
            "loss": self.config.loss,
            "top1": round(self.top1, 4),
            "majority": round(self.majority, 4),
            "within_auroc": round(self.within_auroc, 4),
            "seconds": round(self.seconds, 2),
        }


def _per_problem(table: AnswerTable, scores: np.ndarray, problems: Sequence[int]) -> np.ndarray:
    """1 where the problem's top-scored answer is correct (0 for a problem without answers)."""
    out = np.zeros(len(problems))
    for k, g in enumerate(problems):
        rows = np.flatnonzero(table.groups == g)
        if len(rows):
            out[k] = float(table.labels[rows[int(np.argmax(scores[rows]))]])
    return out


def _vote_counts(table: AnswerTable) -> np.ndarray:
    # log count column; the first-seen answer wins a tie, as in the majority vote.
    return table.feats[:, -1].numpy().astype(np.float64) - 1e-9 * np.arange(len(table.labels))


def cv_answer_trial(
    table: AnswerTable,
    n_problems: int,
    layers: tuple[int, ...],
    config: TrainConfig,
    folds: Sequence[np.ndarray],
) -> AnswerTrial:
    t0 = time.perf_counter()
    x = table.matrix(layers)
    scores = np.zeros(len(table.labels))
    for fold in folds:
        val = np.isin(table.groups, fold)
        head = train_head(x[~val], table.labels[~val], table.groups[~val], config)
        with torch.no_grad():
            scores[val] = head(x[val]).numpy()
    problems = list(range(n_problems))
    return AnswerTrial(
        layers,
        config,
        float(_per_problem(table, scores, problems).mean()),
        float(_per_problem(table, _vote_counts(table), problems).mean()),
        within_auroc(table.labels, table.groups, scores),
        time.perf_counter() - t0,
    )


def rank_trial(trial: AnswerTrial) -> tuple[float, float]:
    """Sort key, best first: out-of-fold top-1 accuracy, then within-problem AUROC."""
    return (-trial.top1, -trial.within_auroc)


def search_answer_probe(
    table: AnswerTable,
    n_problems: int,
    base: TrainConfig,
    folds: int = 4,
    seed: int = 0,
    log: Callable[[str], None] = print,
    questions: Sequence[str] | None = None,
) -> list[AnswerTrial]:
    """Every trial, best first. ``questions`` (one per problem): repeated questions share a
    fold (see :func:`group_folds`)."""
    fold_ids = group_folds(np.arange(n_problems), folds, seed, same=questions)
    trials: list[AnswerTrial] = []

    def run(layers: tuple[int, ...], head: str, loss: str) -> None:
        trial = cv_answer_trial(
            table, n_problems, layers, replace(base, head=head, loss=loss), fold_ids
        )
        trials.append(trial)
        log(f"  {trial.row()}")

    if not table.layers:  # a likelihood table: two numbers, a logistic head
        for loss in ("bce", "listwise"):
            run((), "logreg", loss)
        return sorted(trials, key=rank_trial)
    for layer in table.layers:
        for head, loss in HEAD_TRIALS:
            run((layer,), head, loss)
    best = sorted(trials, key=rank_trial)
    top_layers = list(dict.fromkeys(t.layers[0] for t in best))[:3]
    if len(top_layers) > 1:
        head, loss = best[0].config.head, best[0].config.loss
        run(tuple(sorted(top_layers)), head, loss)
    return sorted(trials, key=rank_trial)


def fit_and_test_answers(
    train: AnswerTable,
    test: AnswerTable,
    n_test: int,
    layers: tuple[int, ...],
    config: TrainConfig,
) -> tuple[ProbeHead, dict[str, Any]]:
    """The head refitted on every training problem; on the test problems: accuracy of its top
    answer and of the majority vote with bootstrap 95% intervals, and McNemar's test."""
    head = train_head(train.matrix(layers), train.labels, train.groups, config)
    with torch.no_grad():
        scores = head(test.matrix(layers)).numpy().astype(np.float64)
    problems = list(range(n_test))
    probe = _per_problem(test, scores, problems)
    majority = _per_problem(test, _vote_counts(test), problems)
    report: dict[str, Any] = {"n_problems": n_test}
    for name, values in (("probe", probe), ("majority", majority)):
        lo, hi = bootstrap_ci(values)
        report[name] = {"accuracy": float(values.mean()), "lo": lo, "hi": hi}
    report["probe_vs_majority"] = mcnemar(probe.astype(bool), majority.astype(bool))
    report["within_auroc"] = within_auroc(test.labels, test.groups, scores)
    return head, report
