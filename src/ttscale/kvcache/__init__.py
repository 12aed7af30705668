"""The KV cache's tensors: a block pool that knows nothing of requests (the block manager in
`engine/` does the bookkeeping), its sizing, and the slot arithmetic that maps a sequence's
positions to pool rows."""

from ttscale.kvcache.config import CacheConfig
from ttscale.kvcache.pool import KVCache
from ttscale.kvcache.slots import context_slots, slot_mapping

__all__ = ["CacheConfig", "KVCache", "context_slots", "slot_mapping"]
