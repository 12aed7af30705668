"""The one call a model makes into the KV cache: store this step's K/V, attend over the context."""

from __future__ import annotations

from typing import Protocol

import torch


class AttentionContext(Protocol):
    """Owns the KV cache and this step's layout (which tokens belong to which sequence).

    The model knows nothing of blocks or batches: it hands over the flattened tokens of every
    scheduled sequence and receives their attention output. Implementations must write the new
    K/V of `layer_idx` into the cache before reading it (a token attends to itself).
    """

    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q: (T, n_heads, head_dim); k, v: (T, n_kv_heads, head_dim) -> (T, n_heads, head_dim)."""
        ...
