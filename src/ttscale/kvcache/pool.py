"""The KV block pool: per layer, K and V tensors of `(num_blocks + 1) * block_size` rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class KVCache:
    """The tensors of the block pool; knows nothing of sequences (see engine.block_manager).

    Layout: each layer's K (and V) is `(num_blocks * block_size + block_size, n_kv_heads,
    head_dim)`; the last block is the null block (see below). Every read and write of the
    cache goes through `store` / `gather` / `keys` / `values`, so another layout or an element
    format changes the pool classes only: a quantized format (quant.py) adds per-row tensors
    (scales) to `row_tensors`, and copy-on-write copies every row tensor.

    With `track_block_keys`, `key_means[layer]` is `(num_blocks + 1, n_kv_heads, head_dim)`
    fp32: the mean (dequantized) key of each block, set when the block's last slot is written
    (a block is scored by block top-k only once full, and a rewrite of its last slot, after a
    rollback or reuse, recomputes it). Copy-on-write copies it with the block.
    """

    quantized = False

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        track_block_keys: bool = False,
    ) -> None:
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.dtype = dtype  # the dtype reads return by default (a quantized pool: its scales')
        # One extra "null" block after the pool, kept at zero: padded gathers read it, so
        # masked positions never meet NaN garbage (0 * NaN = NaN). The pool itself is left
        # uninitialized: every slot is written before it is read, and untouched pages of a
        # multi-GiB pool then cost no resident memory.
        rows = (num_blocks + 1) * block_size
        self.null_slot = num_blocks * block_size
        self._allocate(rows, torch.device(device))
        for t in self.row_tensors():
            t[:, self.null_slot :].zero_()
        self.key_means: torch.Tensor | None = None
        if track_block_keys:
            shape = (num_layers, num_blocks + 1, n_kv_heads, head_dim)
            self.key_means = torch.zeros(shape, dtype=torch.float32, device=device)

    def _allocate(self, rows: int, device: torch.device) -> None:
        shape = (self.num_layers, rows, self.n_kv_heads, self.head_dim)
        self.k = torch.empty(shape, dtype=self.dtype, device=device)
        self.v = torch.empty(shape, dtype=self.dtype, device=device)

    def row_tensors(self) -> list[torch.Tensor]:
        """Every tensor indexed (layer, slot, ...): what copy-on-write duplicates."""
        return [self.k, self.v]

    def block_tensors(self) -> list[torch.Tensor]:
        """Every tensor indexed (layer, block, ...) (a format's per-block scales; the mean
        keys are handled apart): what copy-on-write duplicates too."""
        return []

    @property
    def device(self) -> torch.device:
        return self.k.device

    @staticmethod
    def token_bytes(n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one token's K and V take in one layer."""
        return 2 * n_kv_heads * head_dim * dtype.itemsize

    @classmethod
    def block_bytes(
        cls, n_kv_heads: int, head_dim: int, dtype: torch.dtype, block_size: int
    ) -> float:
        """Bytes one block takes in one layer, its scales included (not the mean keys)."""
        return block_size * cls.token_bytes(n_kv_heads, head_dim, dtype)

    @property
    def bytes_per_token(self) -> float:
        """Bytes one token's K and V take over all layers, scales included."""
        per_block = self.block_bytes(self.n_kv_heads, self.head_dim, self.dtype, self.block_size)
        return self.num_layers * per_block / self.block_size

    # ---- access -------------------------------------------------------------------------

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's raw (K, V) pools, (rows, n_kv_heads, head_dim), for fused kernels that
        gather themselves. Float pools only: a quantized pool's rows need their scales."""
        return self.k[layer_idx], self.v[layer_idx]

    def store(self, layer_idx: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes new K/V rows (T, n_kv_heads, head_dim) at flat `slots` (T,)."""
        self._write(layer_idx, slots, k, v)
        if self.key_means is not None:
            self._update_key_means(layer_idx, slots)

    def _write(self, layer_idx: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer_idx].index_copy_(0, slots, k.to(self.dtype))
        self.v[layer_idx].index_copy_(0, slots, v.to(self.dtype))

    def _update_key_means(self, layer_idx: int, slots: torch.Tensor) -> None:
        """Mean key of every block whose last slot this write filled (writes within a block
        run in position order, so the rest of the block is already there)."""
        bs = self.block_size
        blocks = slots[slots % bs == bs - 1] // bs
        if blocks.numel() == 0:
            return
        rows = (blocks[:, None] * bs + torch.arange(bs, device=slots.device)).flatten()
        keys = self.keys(layer_idx, rows, torch.float32)  # (n * bs, KVH, D)
        means = keys.view(blocks.numel(), bs, self.n_kv_heads, self.head_dim).mean(dim=1)
        self.key_means[layer_idx].index_copy_(0, blocks, means)  # type: ignore[index]

    def keys(self, layer_idx: int, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(len(slots), n_kv_heads, head_dim) K rows in `dtype`, converted (or dequantized)
        after the gather so only the rows read are (`index_select`: several times faster on
        CPU than advanced indexing)."""
        rows = self.k[layer_idx].index_select(0, slots)
        return rows if rows.dtype == dtype else rows.to(dtype)

    def values(self, layer_idx: int, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """As `keys`, for V."""
        rows = self.v[layer_idx].index_select(0, slots)
        return rows if rows.dtype == dtype else rows.to(dtype)

    def head_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Flat (slot, KV head) row indices of `slots` (..., KVH, S), where each KV head
        reads its own slots (block top-k selects per head)."""
        heads = torch.arange(self.n_kv_heads, device=slots.device)[:, None]
        return (slots * self.n_kv_heads + heads).flatten()

    def keys_by_head(self, layer_idx: int, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """slots (..., KVH, S), each KV head its own -> K (..., KVH, S, head_dim) in `dtype`."""
        rows = self.k[layer_idx].view(-1, self.head_dim).index_select(0, self.head_rows(slots))
        return rows.view(*slots.shape, self.head_dim).to(dtype)

    def values_by_head(
        self, layer_idx: int, slots: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """As `keys_by_head`, for V."""
        rows = self.v[layer_idx].view(-1, self.head_dim).index_select(0, self.head_rows(slots))
        return rows.view(*slots.shape, self.head_dim).to(dtype)

    def gather(self, layer_idx: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V rows at `slots` -> two (len(slots), n_kv_heads, head_dim) tensors in
        `self.dtype` (what the reference backend reads)."""
        return self.keys(layer_idx, slots, self.dtype), self.values(layer_idx, slots, self.dtype)

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks src -> dst in every layer (K, V, scales, and
        the block's mean key)."""
        if not copies:
            return
        bs = self.block_size
        offsets = torch.arange(bs, device=self.device)
        src_blocks = torch.tensor([s for s, _ in copies], device=self.device)
        dst_blocks = torch.tensor([d for _, d in copies], device=self.device)
        src = (src_blocks[:, None] * bs + offsets).flatten()
        dst = (dst_blocks[:, None] * bs + offsets).flatten()
        for t in self.row_tensors():
            t[:, dst] = t[:, src]
        for t in self.block_tensors():
            t[:, dst_blocks] = t[:, src_blocks]
        if self.key_means is not None:
            self.key_means[:, dst_blocks] = self.key_means[:, src_blocks]

    def fill_random(self, num_slots: int, generator: torch.Generator) -> None:
        """Random unit-scale KV in the first `num_slots` slots of every layer (calibration:
        untouched pool pages would page-fault, and read as zeros, during timed steps)."""
        for layer in range(self.num_layers):
            slots = torch.arange(num_slots, device=self.device)
            shape = (num_slots, self.n_kv_heads, self.head_dim)
            k = torch.randn(shape, generator=generator, device=self.device)
            v = torch.randn(shape, generator=generator, device=self.device)
            self.store(layer, slots, k, v)
