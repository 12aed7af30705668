"""The KV block pool: per layer, K and V tensors of `(num_blocks + 1) * block_size` rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ttscale.kvcache.config import CacheConfig


class KVCache:
    """The tensors of the block pool; knows nothing of sequences (see engine.block_manager).

    Layout: each layer's K (and V) is `(num_blocks * block_size + block_size, n_kv_heads,
    head_dim)`; the last block is the null block (see below). Every read and write of the
    cache goes through `store` / `gather` / `layer`, so another layout or an element format
    (quantized KV) changes this class only.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.dtype = dtype
        # One extra "null" block after the pool, kept at zero: padded gathers read it, so
        # masked positions never meet NaN garbage (0 * NaN = NaN). The pool itself is left
        # uninitialized: every slot is written before it is read, and untouched pages of a
        # multi-GiB pool then cost no resident memory.
        shape = (num_layers, (num_blocks + 1) * block_size, n_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.null_slot = num_blocks * block_size
        self.k[:, self.null_slot :].zero_()
        self.v[:, self.null_slot :].zero_()

    @property
    def device(self) -> torch.device:
        return self.k.device

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return 2 * num_layers * block_size * n_kv_heads * head_dim * dtype.itemsize

    @classmethod
    def sized(
        cls,
        config: CacheConfig,
        num_layers: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVCache:
        """A pool as large as the config's budget allows (at least 2 blocks, or ValueError)."""
        block_bytes = cls.bytes_per_block(
            num_layers, config.block_size, n_kv_heads, head_dim, dtype
        )
        if config.kv_cache_gb is not None:
            budget = config.kv_cache_gb * 2**30
        else:
            budget = free_memory_bytes(device) * config.kv_cache_memory_fraction
            if device.type == "cpu":
                budget = min(budget, config.kv_cache_max_gb_default * 2**30)
        num_blocks = int(budget // block_bytes)
        if num_blocks < 2:
            raise ValueError(
                f"KV cache budget {budget / 2**30:.3f} GiB holds {num_blocks} blocks of "
                f"{block_bytes} bytes; at least 2 are needed: raise kv_cache_gb (or "
                "kv_cache_memory_fraction)"
            )
        return cls(num_layers, num_blocks, config.block_size, n_kv_heads, head_dim, dtype, device)

    # ---- access -------------------------------------------------------------------------

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's (K, V) pools, (rows, n_kv_heads, head_dim), for fused kernels that
        gather themselves."""
        return self.k[layer_idx], self.v[layer_idx]

    def store(self, layer_idx: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes new K/V rows (T, n_kv_heads, head_dim) at flat `slots` (T,)."""
        self.k[layer_idx].index_copy_(0, slots, k.to(self.dtype))
        self.v[layer_idx].index_copy_(0, slots, v.to(self.dtype))

    def gather(self, layer_idx: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V rows at `slots` -> two (len(slots), n_kv_heads, head_dim) tensors.
        `index_select` is several times faster on CPU than advanced indexing."""
        return self.k[layer_idx].index_select(0, slots), self.v[layer_idx].index_select(0, slots)

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks src -> dst in every layer."""
        if not copies:
            return
        bs = self.block_size
        offsets = torch.arange(bs, device=self.device)
        src = torch.tensor([s for s, _ in copies], device=self.device)[:, None] * bs + offsets
        dst = torch.tensor([d for _, d in copies], device=self.device)[:, None] * bs + offsets
        src, dst = src.flatten(), dst.flatten()
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30
