"""Quantized KV pools. The formats store fewer bytes per token and dequantize only the rows a
read gathers, so no full-precision copy of the pool (or of a whole context) ever exists."""

from __future__ import annotations

import torch

from ttscale.kvcache.pool import KVCache

INT8_MAX = 127


class Int8KVCache(KVCache):
    """int8 K and V, symmetric, one fp32 scale per (token, KV head): row = round(x / s) with
    s = max|x| / 127 over the head's channels. Per-token scales make a token's bytes
    independent of its neighbours, so prefix caching, forks and copy-on-write work on blocks
    exactly as in a float pool (`row_tensors` includes the scales, so a copied block keeps
    them). Bytes per token and layer: 2 * KVH * (D + 4), 0.53x bf16 at head_dim 64."""

    quantized = True

    def _allocate(self, rows: int, device: torch.device) -> None:
        shape = (self.num_layers, rows, self.n_kv_heads, self.head_dim)
        self.k = torch.empty(shape, dtype=torch.int8, device=device)
        self.v = torch.empty(shape, dtype=torch.int8, device=device)
        self.k_scale = torch.empty(shape[:3], dtype=torch.float32, device=device)
        self.v_scale = torch.empty(shape[:3], dtype=torch.float32, device=device)

    def row_tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v, self.k_scale, self.v_scale]

    @staticmethod
    def token_bytes(n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * n_kv_heads * (head_dim + 4)

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * self.token_bytes(self.n_kv_heads, self.head_dim, self.dtype)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError("an int8 KV pool has no float rows: read through keys() / values()")

    def _write(self, layer_idx: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        for codes, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, s = quantize_int8(x)
            codes[layer_idx].index_copy_(0, slots, q)
            scales[layer_idx].index_copy_(0, slots, s)

    def keys(self, layer_idx: int, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return _dequant(self.k[layer_idx], self.k_scale[layer_idx], slots, dtype)

    def values(self, layer_idx: int, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return _dequant(self.v[layer_idx], self.v_scale[layer_idx], slots, dtype)

    def keys_by_head(self, layer_idx: int, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._by_head(self.k[layer_idx], self.k_scale[layer_idx], slots, dtype)

    def values_by_head(
        self, layer_idx: int, slots: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        return self._by_head(self.v[layer_idx], self.v_scale[layer_idx], slots, dtype)

    def _by_head(
        self, codes: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        flat = self.head_rows(slots)
        rows = codes.view(-1, self.head_dim).index_select(0, flat).to(dtype)
        rows.mul_(scales.view(-1).index_select(0, flat).to(dtype)[:, None])
        return rows.view(*slots.shape, self.head_dim)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, KVH, D) -> int8 codes (T, KVH, D) and fp32 scales (T, KVH)."""
    x = x.float()
    scale = x.abs().amax(dim=-1).clamp_min(1e-12) / INT8_MAX
    codes = torch.round(x / scale[..., None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def _dequant(
    codes: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    rows = codes.index_select(0, slots).to(dtype)
    return rows.mul_(scales.index_select(0, slots).to(dtype)[..., None])


_POOLS: dict[str, type[KVCache]] = {"int8": Int8KVCache}


def pool_class(kv_format: str) -> type[KVCache]:
    """The pool class of a canonical `CacheConfig.kv_cache_dtype` (float formats: KVCache)."""
    return _POOLS.get(kv_format, KVCache)


def kv_bytes_per_value(kv_format: str, head_dim: int, read_dtype: torch.dtype) -> float:
    """Bytes one K or V value takes in a pool of `kv_format` (a canonical
    `CacheConfig.kv_cache_dtype`), scales included: what the cost model prices KV traffic at.
    `read_dtype`: the dtype a float pool stores (`CacheConfig.pool_dtype`)."""
    return pool_class(kv_format).token_bytes(1, head_dim, read_dtype) / (2 * head_dim)
