"""How big the KV pool is, what format it stores, and how attention reads it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Full-precision pool formats; the names users may give for them.
FLOAT_FORMATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Quantized formats (kvcache/quant.py). int8: symmetric, one fp32 scale per token and KV head;
# kivi4 / kivi2: KIVI's asymmetric 4 / 2-bit codes, keys per channel per block, values per token.
QUANT_FORMATS = ("int8", "kivi4", "kivi2")
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16"}
KV_CACHE_DTYPES = ("auto", *FLOAT_FORMATS, *_ALIASES, *QUANT_FORMATS)

SPARSE_POLICIES = ("dense", "block_topk")


def canonical_kv_format(name: str, what: str = "kv_cache_dtype") -> str:
    """'bf16' -> 'bfloat16'; ValueError naming the option (`what`) and the allowed values
    for an unknown name."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"{what} must be one of {', '.join(KV_CACHE_DTYPES)}, not {name!r}")
    return _ALIASES.get(name, name)


def min_kv_budget(block_size: int, window: int) -> int:
    """The smallest block top-k budget: the sink block, the local window (whole blocks) and
    the current block, which are always read."""
    return block_size * (2 + -(-window // block_size))


def check_sparse(policy: str, budget: int, block_size: int, window: int, what: str) -> None:
    """ValueError naming `what` (the option) if the policy or budget cannot run."""
    if policy not in SPARSE_POLICIES:
        raise ValueError(f"{what} must be one of {', '.join(SPARSE_POLICIES)}, not {policy!r}")
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise ValueError(f"kv_budget must be an integer, not {budget!r}")
    if policy == "block_topk" and budget < min_kv_budget(block_size, window):
        raise ValueError(
            f"kv_budget={budget} is smaller than the tokens block top-k always reads: the sink "
            f"block ({block_size}) + the local window ({window}, in whole blocks) + the current "
            f"block ({block_size}) = {min_kv_budget(block_size, window)}"
        )


@dataclass(frozen=True)
class CacheConfig:
    # Tokens per KV block. None: 16, or 32 for the KIVI formats, whose key group is the block:
    # 32 is KIVI's group, and its scales cost 0.31x / 0.19x bf16's bytes against 0.34x /
    # 0.22x at 16 (kvcache/quant.py).
    block_size: int | None = None
    kv_cache_gb: float | None = None  # None: a fraction of free memory, capped (see below)
    kv_cache_memory_fraction: float = 0.25
    kv_cache_max_gb_default: float = 2.0  # cap of the fraction rule on CPU, where RAM is shared
    enable_prefix_caching: bool = True
    # Take the least recently used cached block before a never-used one, so the pool's
    # resident pages (an untouched block costs no memory) stay at the peak working set;
    # False keeps every cached prefix until the pool is full, up to kv_cache_gb resident
    # (engine/block_manager.py, "Resident memory of the pool"; docs/PERF_RSS.md).
    evict_before_growing: bool = True
    attention: str = "fast"  # a name in attention.registry: "fast" | "reference"
    # The pool's element format, independent of the weights: "auto" = the weights' dtype
    # (bf16 for quantized matmul weights: models/quant.py kv_dtype), a float dtype, or a
    # quantized format ("int8"). A smaller format holds more blocks in the same kv_cache_gb.
    kv_cache_dtype: str = "auto"
    # Block top-k sparse decode attention (after Kinetics): "dense" or "block_topk". With
    # block_topk the pool keeps each block's mean key (per KV head), decode rows of the
    # layers not in `sparse_dense_layers` read at most `kv_budget` tokens: the first block,
    # the last `sparse_window` tokens (whole blocks), the current block and the best-scoring
    # blocks of the rest. Requests may override the policy and budget (SamplingParams).
    sparse_attention: str = "dense"
    kv_budget: int = 256
    sparse_window: int = 64
    sparse_dense_layers: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kv_cache_dtype", canonical_kv_format(self.kv_cache_dtype))
        if self.block_size is None:
            kivi = self.kv_cache_dtype in ("kivi4", "kivi2")
            object.__setattr__(self, "block_size", 32 if kivi else 16)
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise ValueError("kv_cache_gb must be > 0")
        if not 0 < self.kv_cache_memory_fraction < 1:
            raise ValueError("kv_cache_memory_fraction must be in (0, 1)")
        if isinstance(self.sparse_window, bool) or not isinstance(self.sparse_window, int):
            raise ValueError(f"sparse_window must be an integer, not {self.sparse_window!r}")
        if self.sparse_window < 0:
            raise ValueError("sparse_window must be >= 0")
        object.__setattr__(self, "sparse_dense_layers", tuple(self.sparse_dense_layers))
        if any(isinstance(i, bool) or not isinstance(i, int) for i in self.sparse_dense_layers):
            raise ValueError("sparse_dense_layers must be layer indices")
        check_sparse(
            self.sparse_attention,
            self.kv_budget,
            self.block_size,
            self.sparse_window,
            "sparse_attention",
        )
        if self.sparse_attention != "dense" and self.attention not in ("fast", "reference"):
            raise ValueError(
                f"sparse_attention={self.sparse_attention!r} needs attention='fast' or "
                f"'reference', not {self.attention!r}"
            )

    @property
    def quantized(self) -> bool:
        return self.kv_cache_dtype in QUANT_FORMATS

    @property
    def tracks_block_keys(self) -> bool:
        """Whether the pool keeps per-block mean keys (what block top-k scores)."""
        return self.sparse_attention == "block_topk"

    def pool_dtype(self, weights_dtype: torch.dtype) -> torch.dtype:
        """The dtype attention computes in over this pool (a quantized pool dequantizes to
        the weights' dtype)."""
        return FLOAT_FORMATS.get(self.kv_cache_dtype, weights_dtype)
