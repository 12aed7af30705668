"""From sampled, featurized problems to a chosen probe and its held-out report.

1. Feature/head search by grouped cross-validation on the *training* problems only: first every
   (pooling, layer) with a logistic head and the pairwise loss, then heads x losses on the best
   features (and the best layers concatenated). The criterion is the mean within-problem AUROC
   over problems with both correct and wrong candidates: what ranking inside a problem needs,
   and less noisy than a top-1 accuracy on a few dozen validation problems.
2. The chosen configuration is refitted on all training problems and measured once on the
   test problems (another seed range: never seen in the search).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from ttscale.verifier.data import ProblemSamples
from ttscale.verifier.metrics import ProblemView, auroc, evaluate
from ttscale.verifier.probe import FeatureSpec
from ttscale.verifier.train import (
    HEADS,
    LOSSES,
    ProbeHead,
    TrainConfig,
    cross_val_scores,
    group_folds,
    train_head,
)


@dataclass
class FeatureTable:
    """Candidates of several problems, flattened in problem order, with pooled features
    ``feats`` ``(N, len(poolings), len(layers), H)``."""

    items: list[ProblemSamples]
    feats: torch.Tensor
    poolings: tuple[str, ...]
    layers: tuple[int, ...]

    def __post_init__(self) -> None:
        n = sum(len(it.candidates) for it in self.items)
        if self.feats.shape[:3] != (n, len(self.poolings), len(self.layers)):
            raise ValueError(
                f"features {tuple(self.feats.shape)} do not match {n} candidates x "
                f"{len(self.poolings)} poolings x {len(self.layers)} layers"
            )
        self.labels = np.array([c.correct for it in self.items for c in it.candidates])
        self.groups = np.array([i for i, it in enumerate(self.items) for _ in it.candidates])

    def matrix(self, spec: FeatureSpec) -> torch.Tensor:
        """``(N, len(spec.layers) * H)``: the spec's layers under its pooling, concatenated."""
        p = self.poolings.index(spec.pooling)
        cols = [self.layers.index(layer) for layer in spec.layers]
        return self.feats[:, p, cols].reshape(len(self.feats), -1).float()

    def views(self, scores: np.ndarray) -> list[ProblemView]:
        out, start = [], 0
        for it in self.items:
            k = len(it.candidates)
            out.append(
                ProblemView(
                    answers=[c.answer for c in it.candidates],
                    correct=[c.correct for c in it.candidates],
                    scores=[float(s) for s in scores[start : start + k]],
                    finished=[c.finish_reason != "length" for c in it.candidates],
                    greedy_correct=it.greedy.correct,
                )
            )
            start += k
        return out


def within_auroc(labels: np.ndarray, groups: np.ndarray, scores: np.ndarray) -> float:
    """Mean AUROC inside problems that have both correct and wrong candidates."""
    vals = []
    for g in np.unique(groups):
        m = groups == g
        a = auroc(scores[m], labels[m])
        if a is not None:
            vals.append(a)
    return float(np.mean(vals)) if vals else float("nan")


@dataclass
class Trial:
    spec: FeatureSpec
    config: TrainConfig
    within_auroc: float
    pooled_auroc: float
    top1: float
    weighted: float
    seconds: float

    def row(self) -> dict[str, Any]:
        return {
            "pooling": self.spec.pooling,
            "layers": list(self.spec.layers),
            "head": self.config.head,
            "loss": self.config.loss,
            "within_auroc": round(self.within_auroc, 4),
            "pooled_auroc": round(self.pooled_auroc, 4),
            "top1": round(self.top1, 4),
            "weighted": round(self.weighted, 4),
            "seconds": round(self.seconds, 2),
        }


def cv_trial(
    table: FeatureTable, spec: FeatureSpec, config: TrainConfig, folds: Sequence[np.ndarray]
) -> Trial:
    t0 = time.perf_counter()
    scores = cross_val_scores(table.matrix(spec), table.labels, table.groups, config, folds)
    report = evaluate(table.views(scores))
    acc = report["accuracy"]
    return Trial(
        spec,
        config,
        within_auroc(table.labels, table.groups, scores),
        float(auroc(scores, table.labels) or float("nan")),
        acc["top1"]["accuracy"],  # type: ignore[index]
        acc["weighted"]["accuracy"],  # type: ignore[index]
        time.perf_counter() - t0,
    )


def search(
    table: FeatureTable,
    base: TrainConfig,
    folds: int = 4,
    seed: int = 0,
    top_features: int = 2,
    heads: Sequence[str] = HEADS,
    losses: Sequence[str] = LOSSES,
    log: Callable[[str], None] = print,
) -> list[Trial]:
    """Every trial, best first (by within-problem AUROC, out of fold)."""
    questions = [it.question for it in table.items]
    fold_ids = group_folds(table.groups, folds, seed, same=questions)
    trials: list[Trial] = []

    def run(spec: FeatureSpec, config: TrainConfig) -> None:
        trial = cv_trial(table, spec, config, fold_ids)
        trials.append(trial)
        log(f"  {trial.row()}")

    stage1 = replace(base, head="logreg", loss="pairwise")
    for pooling in table.poolings:
        for layer in table.layers:
            run(FeatureSpec(pooling, (layer,)), stage1)
    ranked = sorted(trials, key=lambda t: -t.within_auroc)
    specs = list(dict.fromkeys(t.spec for t in ranked[:top_features]))
    best_pool = ranked[0].spec.pooling
    best_layers = [t.spec.layers[0] for t in ranked if t.spec.pooling == best_pool][:3]
    if len(best_layers) > 1:
        specs.append(FeatureSpec(best_pool, tuple(sorted(best_layers))))
    for spec in specs:
        for head in heads:
            for loss in losses:
                config = replace(base, head=head, loss=loss)
                if spec in {t.spec for t in trials if t.config == config}:
                    continue
                run(spec, config)
    return sorted(trials, key=lambda t: -t.within_auroc)


def fit_and_test(
    train: FeatureTable, test: FeatureTable, spec: FeatureSpec, config: TrainConfig
) -> tuple[ProbeHead, dict[str, Any]]:
    """The head refitted on every training problem, and its report on the test problems
    (raw selection and with length-cut candidates excluded)."""
    head = train_head(train.matrix(spec), train.labels, train.groups, config)
    with torch.no_grad():
        scores = head(test.matrix(spec)).numpy().astype(np.float64)
    views = test.views(scores)
    logprob = np.array([c.mean_logprob for it in test.items for c in it.candidates])
    return head, {
        "probe": evaluate(views),
        "probe_hygiene": evaluate(views, hygiene=True),
        # The baseline a probe must beat: the engine's own mean token logprob as the score.
        "logprob": evaluate(test.views(logprob)),
        "config": asdict(config),
    }
