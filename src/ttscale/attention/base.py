"""The one call a model makes into the KV cache: store this step's K/V, attend over the context."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from ttscale.attention.metadata import AttentionMetadata
from ttscale.attention.spec import AttentionLayerSpec
from ttscale.kvcache.pool import KVCache


class AttentionContext(Protocol):
    """Owns the KV cache and this step's layout (which tokens belong to which sequence).

    The model knows nothing of blocks or batches: it hands over the flattened tokens of every
    scheduled sequence with its layer's spec and receives their attention output.
    Implementations must write the new K/V of the layer into the cache before reading it (a
    token attends to itself).
    """

    def __call__(
        self, spec: AttentionLayerSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q: (T, n_heads, head_dim); k, v: (T, n_kv_heads, head_dim) -> (T, n_heads, head_dim)."""
        ...


class PagedAttentionBase:
    """What every paged backend shares: the cache, the step's layout, the layers' specs, and
    the KV traffic it reports to the cost model."""

    def __init__(
        self, cache: KVCache, meta: AttentionMetadata, specs: Sequence[AttentionLayerSpec]
    ) -> None:
        self.cache, self.meta, self.specs = cache, meta, list(specs)
        for spec in self.specs:
            if spec.sparsity is not None:
                raise NotImplementedError(
                    f"{type(self).__name__} has no sparse attention policy "
                    f"{spec.sparsity!r} (layer {spec.layer_idx})"
                )
        # KV token slots read per layer this step (mean over layers); the cascade path lowers
        # it, reading `kv_tokens_shared` of them once for `shared_groups` fork groups.
        self.kv_tokens_read = sum(meta.context_lens)
        self.kv_tokens_shared = 0
        self.shared_groups = 0

    def _store(self, spec: AttentionLayerSpec, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache.store(spec.layer_idx, self.meta.slot_mapping, k, v)

    @staticmethod
    def _mask(q_len: int, ctx_len: int, window: int | None, device: torch.device) -> torch.Tensor:
        """(q_len, ctx_len) bool, True = may attend: causal from offset ctx-q, plus window."""
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=device)[:, None]
        k_pos = torch.arange(ctx_len, device=device)[None, :]
        allowed = k_pos <= q_pos
        if window is not None:
            allowed &= k_pos > q_pos - window
        return allowed


def soft_cap(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    return scores if cap is None else torch.tanh(scores / cap) * cap
