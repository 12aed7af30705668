"""Training a probe head on pooled hidden states: logistic regression or a 1-hidden-layer MLP,
pointwise (BCE), pairwise within a problem (a correct candidate should outscore a wrong one
of the *same* problem: RankNet's logistic pair loss) or listwise (a softmax over a problem's
rows should put its mass on the correct ones: ListNet-style, what picking one answer out of
a problem's distinct answers needs), full-batch Adam on CPU in seconds.

Splits are by problem (:func:`group_folds`): candidates of one problem are never on both sides,
or a probe that memorizes problems would look like one that ranks candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ttscale.threads import one_torch_thread

HEADS = ("logreg", "mlp")
LOSSES = ("bce", "pairwise", "both", "listwise")


@dataclass(frozen=True)
class TrainConfig:
    head: str = "logreg"
    loss: str = "pairwise"
    hidden: int = 64  # MLP width
    epochs: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, not {self.head!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, not {self.loss!r}")
        if self.epochs < 1 or self.hidden < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("epochs, hidden and lr must be positive, weight_decay >= 0")


class ProbeHead(nn.Module):
    """Standardization (train-set mean/std, kept as buffers so they ship with the weights)
    followed by a linear map or a 1-hidden-layer MLP to one logit. Input ``(N, D)``."""

    def __init__(self, dim: int, head: str = "logreg", hidden: int = 64) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, not {head!r}")
        self.head = head
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        if head == "logreg":
            self.net = nn.Sequential(nn.Linear(dim, 1))
        else:
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x.float() - self.mean) / self.std).squeeze(-1)  # (N,)


def within_pairs(labels: np.ndarray, groups: np.ndarray) -> torch.Tensor:
    """All (correct, wrong) index pairs inside each problem: ``(P, 2)`` int64."""
    pairs = []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        pos, neg = idx[labels[idx]], idx[~labels[idx]]
        if len(pos) and len(neg):
            pairs.append(np.stack(np.meshgrid(pos, neg, indexing="ij"), -1).reshape(-1, 2))
    if not pairs:
        return torch.zeros((0, 2), dtype=torch.long)
    return torch.from_numpy(np.concatenate(pairs)).long()


def train_head(
    x: torch.Tensor, labels: np.ndarray, groups: np.ndarray, config: TrainConfig
) -> ProbeHead:
    """A head fitted on ``x`` ``(N, D)``; ``labels`` ``(N,)`` bool, or soft targets in [0, 1]
    (process labels: a rollout success rate; pairs then use targets >= 0.5); ``groups``
    problem ids ``(N,)``. Deterministic for a given seed."""
    with one_torch_thread():  # tiny matmuls: a thread barrier per op costs more than the op
        return _train(x, labels, groups, config)


def _train(
    x: torch.Tensor, labels: np.ndarray, groups: np.ndarray, config: TrainConfig
) -> ProbeHead:
    torch.manual_seed(config.seed)
    x = x.float()
    targets = np.asarray(labels, dtype=np.float32)
    model = ProbeHead(x.shape[1], config.head, config.hidden)
    model.mean.copy_(x.mean(0))
    model.std.copy_(x.std(0).clamp_min(1e-4))
    y = torch.from_numpy(targets)
    pairs = within_pairs(targets >= 0.5, np.asarray(groups))
    use_pairs = config.loss in ("pairwise", "both") and len(pairs) > 0
    lists = _lists(targets >= 0.5, np.asarray(groups)) if config.loss == "listwise" else None
    use_list = lists is not None and len(lists[0]) > 0
    use_bce = config.loss in ("bce", "both") or not (use_pairs or use_list)
    # Class balance for BCE: correct candidates are a minority on hard tasks.
    n_pos = float(y.sum())
    pos_weight = torch.tensor((len(y) - n_pos) / max(n_pos, 1.0))
    xs = (x - model.mean) / model.std  # standardized once, not every epoch
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    for _ in range(config.epochs):
        opt.zero_grad()
        s = model.net(xs).squeeze(-1)
        loss = torch.zeros(())
        if use_bce:
            loss = loss + nn.functional.binary_cross_entropy_with_logits(
                s, y, pos_weight=pos_weight
            )
        if use_pairs:
            loss = loss + nn.functional.softplus(s[pairs[:, 1]] - s[pairs[:, 0]]).mean()
        if use_list:
            rows, segment, positive = lists  # type: ignore[misc]
            loss = loss + _listwise_loss(s[rows], segment, positive)
        loss.backward()
        opt.step()
    model.eval()
    _calibrate(model, x, y)
    return model


def _lists(labels: np.ndarray, groups: np.ndarray) -> tuple[torch.Tensor, ...]:
    """Rows of the problems that have a correct row and a wrong one (the others carry no
    ranking signal): their indices, their problem's position among those, their labels."""
    rows, segment = [], []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        if labels[idx].any() and not labels[idx].all():
            rows.append(idx)
            segment.append(np.full(len(idx), len(rows) - 1))
    if not rows:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, torch.zeros(0, dtype=torch.bool)
    cat = np.concatenate(rows)
    return (
        torch.from_numpy(cat).long(),
        torch.from_numpy(np.concatenate(segment)).long(),
        torch.from_numpy(labels[cat]),
    )


def _listwise_loss(s: torch.Tensor, segment: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over problems of -log(softmax mass on the correct rows)."""
    n = int(segment.max()) + 1
    top = torch.full((n,), -torch.inf).scatter_reduce(0, segment, s.detach(), "amax")
    e = torch.exp(s - top[segment])
    total = torch.zeros(n).index_add(0, segment, e)
    good = torch.zeros(n).index_add(0, segment, e * positive)
    return -(torch.log(good) - torch.log(total)).mean()


def _calibrate(model: ProbeHead, x: torch.Tensor, y: torch.Tensor) -> None:
    """Platt scaling folded into the last layer: sigmoid(a * s + b) fitted by plain BCE, so
    the sigmoid of a logit estimates P(correct) whatever the loss (a pairwise loss leaves the
    bias untrained; class-balanced BCE shifts it). Order within a problem is unchanged."""
    with torch.no_grad():
        s = model(x)
    a = torch.ones((), requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([a, b], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(a * s + b, y)
        loss.backward()
        return loss

    opt.step(closure)
    last = model.net[-1]
    assert isinstance(last, nn.Linear)
    with torch.no_grad():
        scale = a.detach().clamp_min(1e-3)  # a must stay positive: ranking is the head's job
        last.weight.mul_(scale)
        last.bias.mul_(scale).add_(b.detach())


def group_folds(
    groups: np.ndarray, k: int, seed: int = 0, same: Sequence[str] | None = None
) -> list[np.ndarray]:
    """``k`` disjoint sets of problem ids covering every problem: fold ``i`` is validation,
    the rest training. Problems, not candidates, are shuffled and dealt. ``same``: a key per
    problem id (its question): problems with one key land in one fold, since a question that
    a generator asks twice would otherwise be validated on its own training copy -- and a
    head that memorizes questions would look like one that ranks answers."""
    uniq = np.unique(groups)
    keys = uniq if same is None else np.array([same[int(g)] for g in uniq])
    distinct = np.unique(keys)
    if len(distinct) < k:
        raise ValueError(f"{len(distinct)} distinct problems cannot make {k} folds")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(distinct)
    if same is None:
        return [perm[i::k] for i in range(k)]
    fold_of = {key: i % k for i, key in enumerate(perm)}
    which = np.array([fold_of[key] for key in keys])
    return [uniq[which == i] for i in range(k)]


def cross_val_scores(
    x: torch.Tensor,
    labels: np.ndarray,
    groups: np.ndarray,
    config: TrainConfig,
    folds: Sequence[np.ndarray],
) -> np.ndarray:
    """Out-of-fold scores: each candidate scored by a head that never saw its problem."""
    scores = np.zeros(len(labels), dtype=np.float64)
    for fold in folds:
        val = np.isin(groups, fold)
        head = train_head(x[~val], labels[~val], groups[~val], config)
        with torch.no_grad():
            scores[val] = head(x[val]).numpy()
    return scores
