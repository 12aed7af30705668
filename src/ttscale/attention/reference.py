"""Eager attention, one sequence at a time: the definition every fast path is tested against."""

from __future__ import annotations

import torch

from ttscale.attention.base import PagedAttentionBase, soft_cap
from ttscale.attention.sparse import selection_mask
from ttscale.attention.spec import AttentionLayerSpec


class ReferencePagedAttention(PagedAttentionBase):
    """Reads the cache through `KVCache.gather`, fp32 softmax, full masks: slow and obvious.
    Block top-k is dense attention with the unselected positions masked out, per KV head."""

    def __call__(
        self, spec: AttentionLayerSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        self._store(spec, k, v)
        out = torch.empty_like(q)
        groups = q.shape[1] // k.shape[1]
        sparse_of = {}
        if self._is_sparse(spec):
            assert self.sparse is not None
            sparse_of = {i: r for r, i in enumerate(self.sparse.rows)}
        for i, start in enumerate(self.meta.query_start):
            q_len, ctx_len = self.meta.query_lens[i], self.meta.context_lens[i]
            keys, values = self.cache.gather(spec.layer_idx, self.meta.context_slots(i, q.device))
            keys = keys.repeat_interleave(groups, dim=1)  # (S, H, D)
            values = values.repeat_interleave(groups, dim=1)
            qi = q[start : start + q_len]  # (Q, H, D)
            scores = torch.einsum("qhd,shd->hqs", qi.float(), keys.float()) * spec.scale
            scores = soft_cap(scores, spec.soft_cap)
            allowed = self._mask(q_len, ctx_len, spec.sliding_window, q.device)  # (Q, S)
            if i in sparse_of:
                assert self.sparse is not None and self.cache.key_means is not None
                means = self.cache.key_means[spec.layer_idx]
                chosen = selection_mask(qi, means, self.sparse, sparse_of[i], ctx_len)
                allowed = allowed & chosen.repeat_interleave(groups, dim=0)[:, None, :]
            scores.masked_fill_(~allowed, float("-inf"))
            probs = scores.softmax(dim=-1)
            out[start : start + q_len] = torch.einsum("hqs,shd->qhd", probs, values.float()).to(
                q.dtype
            )
        return out
