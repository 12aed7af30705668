"""How big the KV pool is, what dtype it stores, and which attention backend reads it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_gb: float | None = None  # None: a fraction of free memory, capped (see below)
    kv_cache_memory_fraction: float = 0.25
    kv_cache_max_gb_default: float = 2.0  # cap of the fraction rule on CPU, where RAM is shared
    enable_prefix_caching: bool = True
    attention: str = "fast"  # a name in attention.registry: "fast" | "reference"
    # The pool's element type; None = the weights' dtype. Independent of the weights so a
    # quantized or lower-precision KV can be chosen without touching the model.
    kv_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise ValueError("kv_cache_gb must be > 0")
        if not 0 < self.kv_cache_memory_fraction < 1:
            raise ValueError("kv_cache_memory_fraction must be in (0, 1)")
        if self.kv_dtype is not None and self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {sorted(KV_DTYPES)} or None")

    def pool_dtype(self, weights_dtype: torch.dtype) -> torch.dtype:
        return weights_dtype if self.kv_dtype is None else KV_DTYPES[self.kv_dtype]
