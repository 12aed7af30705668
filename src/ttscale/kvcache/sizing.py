"""How many blocks a pool of a given format gets from the configured memory budget."""

from __future__ import annotations

import math

import torch

from ttscale.kvcache.config import CacheConfig
from ttscale.kvcache.pool import KVCache
from ttscale.kvcache.quant import pool_class


def block_bytes(
    config: CacheConfig, num_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes one block takes in every layer: K, V, scales, and the fp32 mean key block top-k
    keeps per block and KV head."""
    pool = pool_class(config.kv_cache_dtype)
    size = num_layers * pool.block_bytes(n_kv_heads, head_dim, dtype, config.block_size)
    if config.tracks_block_keys:
        size += num_layers * n_kv_heads * head_dim * 4
    return math.ceil(size)


def make_kv_cache(
    config: CacheConfig,
    num_layers: int,
    n_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> KVCache:
    """A pool of `config.kv_cache_dtype` as large as the config's budget allows (at least 2
    blocks, or ValueError). `dtype`: what reads return (`config.pool_dtype(weights)`); a
    smaller format gets proportionally more blocks from the same budget."""
    per_block = block_bytes(config, num_layers, n_kv_heads, head_dim, dtype)
    if config.kv_cache_gb is not None:
        budget = config.kv_cache_gb * 2**30
    else:
        budget = free_memory_bytes(device) * config.kv_cache_memory_fraction
        if device.type == "cpu":
            budget = min(budget, config.kv_cache_max_gb_default * 2**30)
    num_blocks = int(budget // per_block)
    if num_blocks < 2:
        raise ValueError(
            f"KV cache budget {budget / 2**30:.3f} GiB holds {num_blocks} blocks of "
            f"{per_block} bytes; at least 2 are needed: raise kv_cache_gb (or "
            "kv_cache_memory_fraction)"
        )
    return pool_class(config.kv_cache_dtype)(
        num_layers,
        num_blocks,
        config.block_size,
        n_kv_heads,
        head_dim,
        dtype,
        device,
        track_block_keys=config.tracks_block_keys,
    )


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30
