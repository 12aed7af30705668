"""The one call a model makes into the KV cache: store this step's K/V, attend over the context."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from ttscale.attention.metadata import AttentionMetadata
from ttscale.attention.sparse import BlockTopK, SparseRows, sparse_row_indices, sparse_rows
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
    """What every paged backend shares: the cache, the step's layout, the layers' specs, the
    step's block top-k rows, and the KV traffic it reports to the cost model."""

    # Sparsity policies (spec.sparsity types) a backend implements; others raise.
    SPARSITY: tuple[type, ...] = (BlockTopK,)

    def __init__(
        self, cache: KVCache, meta: AttentionMetadata, specs: Sequence[AttentionLayerSpec]
    ) -> None:
        self.cache, self.meta, self.specs = cache, meta, list(specs)
        sparse_specs = [s for s in self.specs if s.sparsity is not None]
        for spec in sparse_specs:
            if not isinstance(spec.sparsity, self.SPARSITY):
                raise NotImplementedError(
                    f"{type(self).__name__} has no sparse attention policy "
                    f"{spec.sparsity!r} (layer {spec.layer_idx})"
                )
            if spec.sliding_window is not None:
                raise ValueError(f"layer {spec.layer_idx}: block top-k on a windowed layer")
        # Decode rows that read sparsely this step (None: none do).
        self.sparse: SparseRows | None = None
        if sparse_specs and meta.kv_budgets is not None:
            if cache.key_means is None:
                raise ValueError("block top-k needs a pool that keeps block mean keys")
            budgets = meta.kv_budgets
            rows = sparse_row_indices(meta.query_lens, meta.context_lens, budgets)
            if rows:
                window = sparse_specs[0].sparsity.window  # type: ignore[union-attr]
                self.sparse = sparse_rows(
                    rows,
                    meta.block_tables,
                    meta.context_lens,
                    budgets,  # type: ignore[arg-type]
                    meta.block_size,
                    window,
                    cache.num_blocks,
                    cache.device,
                )
        self.sparse_layers = len(sparse_specs) if self.sparse is not None else 0
        # KV token slots read per layer this step (mean over layers); the cascade path lowers
        # it, reading `kv_tokens_shared` of them once for `shared_groups` fork groups, and
        # block top-k lowers it on its layers.
        self.kv_tokens_skipped = round(self._sparse_saving())
        self.kv_tokens_read = sum(meta.context_lens) - self.kv_tokens_skipped
        self.kv_tokens_shared = 0
        self.shared_groups = 0
        # Block mean keys scored per layer this step (mean over layers): the block-search read.
        self.kv_blocks_scored = 0
        if self.sparse is not None:
            scored = int(self.sparse.num_blocks.sum())
            self.kv_blocks_scored = round(scored * self.sparse_layers / max(1, len(self.specs)))

    def kv_reads(self) -> dict[str, int]:
        """This step's KV accounting, as `StepShape` takes it (cost/shapes.py)."""
        return {
            "kv_tokens_read": self.kv_tokens_read,
            "kv_tokens_shared": self.kv_tokens_shared,
            "shared_groups": self.shared_groups,
            "kv_blocks_scored": self.kv_blocks_scored,
            "kv_tokens_skipped": self.kv_tokens_skipped,
        }

    def _sparse_saving(self) -> float:
        """Tokens per layer (mean over layers) block top-k does not read, vs dense."""
        if self.sparse is None:
            return 0.0
        dense = sum(self.meta.context_lens[i] for i in self.sparse.rows)
        return (dense - self.sparse.tokens_read) * self.sparse_layers / len(self.specs)

    def _is_sparse(self, spec: AttentionLayerSpec) -> bool:
        """Whether this layer reads block top-k this step. The backend's own specs (the
        engine's policy on the model's specs, `sparse.with_block_topk`) decide, whatever
        spec a caller passes (a compiled graph passes the model's)."""
        if self.sparse is None:
            return False
        return (spec.sparsity or self.specs[spec.layer_idx].sparsity) is not None

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
