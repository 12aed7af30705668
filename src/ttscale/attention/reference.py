"""Eager attention, one sequence at a time: the definition every fast path is tested against."""

from __future__ import annotations

import torch

from ttscale.attention.base import PagedAttentionBase, soft_cap
from ttscale.attention.spec import AttentionLayerSpec


class ReferencePagedAttention(PagedAttentionBase):
    """Reads the cache through `KVCache.gather`, fp32 softmax, full masks: slow and obvious."""

    def __call__(
        self, spec: AttentionLayerSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        self._store(spec, k, v)
        out = torch.empty_like(q)
        groups = q.shape[1] // k.shape[1]
        for i, start in enumerate(self.meta.query_start):
            q_len, ctx_len = self.meta.query_lens[i], self.meta.context_lens[i]
            keys, values = self.cache.gather(spec.layer_idx, self.meta.context_slots(i, q.device))
            keys = keys.repeat_interleave(groups, dim=1)  # (S, H, D)
            values = values.repeat_interleave(groups, dim=1)
            qi = q[start : start + q_len]  # (Q, H, D)
            scores = torch.einsum("qhd,shd->hqs", qi.float(), keys.float()) * spec.scale
            scores = soft_cap(scores, spec.soft_cap)
            allowed = self._mask(q_len, ctx_len, spec.sliding_window, q.device)
            scores.masked_fill_(~allowed, float("-inf"))
            probs = scores.softmax(dim=-1)
            out[start : start + q_len] = torch.einsum("hqs,shd->qhd", probs, values.float()).to(
                q.dtype
            )
        return out
