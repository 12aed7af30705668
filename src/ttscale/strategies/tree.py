"""tree@N: KV-aware tree search after ETS (Hooper et al., 2025, "ETS: Efficient Tree Search for
Inference-Time Scaling").

Beam search keeps the top-scoring nodes whatever they cost in memory. ETS instead keeps the set
of nodes that maximizes

    sum_i score_i x_i - lambda_kv * (KV blocks kept) / B + lambda_div * (clusters covered) / C

where the KV term counts a block once however many kept nodes share it (shared ancestors are
free after the first), so siblings of a kept node are cheap and distant nodes are expensive,
and the coverage term keeps distinct lines of reasoning alive. Here the KV "nodes" are the
engine's real blocks (each branch's block table). B is the mean table length and C the number
of clusters, so the lambdas are unitless. Step texts are clustered lexically (Jaccard overlap
of their word sets), a cheap stand-in for ETS's embedding clustering.

The selection is a small integer program, solved exactly with `scipy.optimize.milp`.
"""

from __future__ import annotations

import re

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from ttscale.strategies.base import Query
from ttscale.strategies.search import LevelSearch
from ttscale.tts.session import Branch


class KVAwareTreeSearch(LevelSearch):
    def __init__(
        self,
        spec: str,
        n: int,
        lambda_kv: float = 0.5,
        lambda_div: float = 0.5,
        similarity: float = 0.6,
        sampling: dict[str, float] | None = None,
    ) -> None:
        super().__init__(spec, sampling)
        self.n, self.lambda_kv, self.lambda_div, self.similarity = (
            n,
            lambda_kv,
            lambda_div,
            similarity,
        )

    def expansions(
        self, live: list[Branch], query: Query, width: int, stats: dict[str, list]
    ) -> list[tuple[Branch, int]]:
        """Keeps the set the integer program picks; spreads the width over it, best first."""
        keep = self.select(live, query, max_keep=width)
        stats.setdefault("kept_per_step", []).append(len(keep))
        keep.sort(key=lambda b: self.path_score(b, query), reverse=True)
        fanout = [width // len(keep) + (i < width % len(keep)) for i in range(len(keep))]
        return list(zip(keep, fanout, strict=True))

    def select(self, nodes: list[Branch], query: Query, max_keep: int) -> list[Branch]:
        """Solves the ETS integer program over the candidate nodes; returns the kept ones."""
        n = len(nodes)
        blocks = sorted(set().union(*(b.kv_blocks for b in nodes)))
        clusters = cluster_texts([b.step_text for b in nodes], self.similarity)
        num_clusters = max(clusters) + 1
        index = {blk: j for j, blk in enumerate(blocks)}
        mean_blocks = max(1.0, float(np.mean([len(b.kv_blocks) for b in nodes])))
        # Variables: x (n nodes) | y (blocks) | z (clusters), all binary.
        nx, ny, nz = n, len(blocks), num_clusters
        scores = np.array([self.path_score(b, query) for b in nodes])
        c = np.concatenate(
            [
                -scores,  # milp minimizes
                np.full(ny, self.lambda_kv / mean_blocks),
                np.full(nz, -self.lambda_div / num_clusters),
            ]
        )
        rows, lower, upper = [], [], []

        def row() -> np.ndarray:
            return np.zeros(nx + ny + nz)

        for i, b in enumerate(nodes):  # x_i <= y_b for each block b of node i
            for blk in b.kv_blocks:
                r = row()
                r[i], r[nx + index[blk]] = 1, -1
                rows.append(r)
                lower.append(-np.inf)
                upper.append(0)
        for k in range(nz):  # z_k <= sum of x_i in cluster k
            r = row()
            r[nx + ny + k] = 1
            for i, ck in enumerate(clusters):
                if ck == k:
                    r[i] = -1
            rows.append(r)
            lower.append(-np.inf)
            upper.append(0)
        r = row()  # keep between 1 and max_keep nodes
        r[:nx] = 1
        rows.append(r)
        lower.append(1)
        upper.append(max(1, max_keep))
        res = milp(
            c,
            constraints=LinearConstraint(np.array(rows), lower, upper),
            integrality=np.ones(nx + ny + nz),
            bounds=Bounds(0, 1),
        )
        if not res.success:  # cannot happen for this feasible program; be safe anyway
            return sorted(nodes, key=lambda b: -self.path_score(b, query))[:max_keep]
        return [b for i, b in enumerate(nodes) if res.x[i] > 0.5]


def cluster_texts(texts: list[str], threshold: float) -> list[int]:
    """Greedy single-link clustering by Jaccard similarity of word sets; cluster ids 0..k-1."""
    words = [set(re.findall(r"\w+", t.lower())) for t in texts]
    labels = [-1] * len(texts)
    k = 0
    for i in range(len(texts)):
        if labels[i] >= 0:
            continue
        labels[i] = k
        for j in range(i + 1, len(texts)):
            if labels[j] < 0 and _jaccard(words[i], words[j]) >= threshold:
                labels[j] = k
        k += 1
    return labels


def _jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)
