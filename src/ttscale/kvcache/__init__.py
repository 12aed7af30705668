"""The KV cache's tensors: a block pool that knows nothing of requests (the block manager in
`engine/` does the bookkeeping), its formats (float, int8) and sizing, and the slot arithmetic
that maps a sequence's positions to pool rows."""

from ttscale.kvcache.config import CacheConfig
from ttscale.kvcache.pool import KVCache
from ttscale.kvcache.quant import Int8KVCache
from ttscale.kvcache.sizing import make_kv_cache
from ttscale.kvcache.slots import context_slots, slot_mapping

__all__ = [
    "CacheConfig",
    "Int8KVCache",
    "KVCache",
    "context_slots",
    "make_kv_cache",
    "slot_mapping",
]
