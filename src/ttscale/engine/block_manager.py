"""Paged KV-cache bookkeeping: block tables, ref counts, copy-on-write, fork, prefix caching.

The KV tensors themselves are owned by the model runner; this module only decides which
*block ids* (rows of ``block_size`` token slots in every layer's pool) each sequence uses.
Pure Python, no torch: every public call costs O(blocks it touches), never O(pool), except
:meth:`BlockManager.check_integrity`.

Block states (exactly one at any time)
--------------------------------------
* **referenced** — ``ref_count > 0``; appears ``ref_count`` times across all block tables.
* **evictable** — ``ref_count == 0`` but hashed (its KV is a reusable prefix-cache entry).
  Kept in LRU order of reaching ref 0; a prefix-cache hit revives it.
* **free** — ``ref_count == 0`` and unhashed; sits in the free queue.

Deterministic allocation order (tests rely on it)
-------------------------------------------------
1. The initial free queue is ``[0, 1, ..., num_blocks - 1]``.
2. Allocation pops the head of the free queue.
3. Only when the free queue is empty is the least-recently-freed evictable block taken; its
   hash is dropped (the cache entry is gone).
4. When a sequence releases blocks (:meth:`free`, :meth:`truncate`, or the source of a CoW
   copy reaching ref 0) they are visited in *reverse* table order: unhashed blocks are pushed
   to the head of the free queue (so they come back in table order), hashed ones to the
   most-recent end of the LRU. Reverse order makes the tail of a hash chain older than its
   head, so eviction eats chains from the end and the surviving part stays a usable prefix.
   Reusing the most recently freed blocks first keeps the working set in as few pool pages
   as possible: the pool is allocated uninitialized, so a never-used block costs a page fault
   on first write, and a recently used one is likely still in cache. (A FIFO queue walked the
   whole pool before reusing anything: every long run touched every page.)
5. With ``evict_before_growing`` (the engine's default, `CacheConfig.evict_before_growing`;
   off for a bare `BlockManager`), step 3 comes before step 2 whenever the
   free queue's head is a never-used block: the least-recently-freed evictable block is taken
   before the pool grows into untouched pages. Freed (touched) blocks still come first.

Resident memory of the pool
---------------------------
By 2 and 4, touched free blocks always come before never-used ones, so the pool's touched
blocks (its resident pages) grow only when no touched block is free: at any time they number
the peak of ``used + evictable`` so far. With prefix caching every full block a finished
sequence leaves behind stays cached (evictable) until the free queue runs dry, so a long run
grows the resident pool up to its whole size, the cache with it (docs/PERF_RSS.md measures a
benchmark run: 794 blocks touched for a peak of 584 in use). ``evict_before_growing`` bounds
the touched blocks by the peak in use instead, at the cost of a prefix cache that keeps only
what fits beside the working set in those blocks. ``stats()["touched"]`` counts them.

Prefix caching
--------------
A full block at table index ``i`` of a sequence has the key
``(parent_hash, extra_key, tuple(block_tokens))`` where ``parent_hash`` is ``hash()`` of the
key of block ``i - 1`` (``None`` for ``i == 0``). Keying the dict by that tuple (not by a bare
int hash) means a hit compares the block's tokens exactly; only the 64-bit parent hash could
collide. Keys are registered by :meth:`commit_computed` once the block's KV is written, and
looked up by :meth:`allocate_prefix`. Partial blocks are never hashed.

Write safety
------------
A block that a sequence is about to write (its partially filled tail) is copied first
(copy-on-write) if it is shared (``ref_count > 1``) *or* hashed. The hashed case only arises
after :meth:`truncate` into a full cached block: writing in place would corrupt a cache entry
that other requests may hit later. Copies are returned as ``(src, dst)`` pairs; the model
runner must apply them before the next forward pass writes KV. ``src`` stays intact until at
least the end of the call that returned the copy (it is released after all allocations).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from ttscale.errors import NoFreeBlocksError

__all__ = ["BlockManager", "NoFreeBlocksError"]

# Key of one full block in the prefix cache: (parent block hash, extra key, block tokens).
BlockKey = tuple[int | None, Hashable, tuple[int, ...]]


@dataclass
class BlockManager:
    """Bookkeeping of a paged KV cache of ``num_blocks`` blocks of ``block_size`` tokens.

    Invariants (verified by :meth:`check_integrity`):

    * ``ref_count(b)`` equals the number of occurrences of ``b`` in all block tables.
    * The free queue, the evictable LRU and the referenced blocks partition ``range(num_blocks)``;
      the free queue holds no duplicates and only unhashed blocks; evictable blocks are hashed.
    * Every hashed block's key maps back to it in the hash table, and vice versa.
    * ``len(block_table(s)) == ceil(num_tokens(s) / block_size)`` for every sequence.
    * A sequence's chain hashes cover at most its full blocks (``num_tokens // block_size``).
    """

    num_blocks: int
    block_size: int = 16
    enable_prefix_caching: bool = True
    # Evict a cached block rather than take a never-used one (see "Resident memory" above).
    evict_before_growing: bool = False

    # Per-block state, indexed by block id.
    _ref: list[int] = field(init=False, repr=False)
    _key: list[BlockKey | None] = field(init=False, repr=False)
    # Pools of ref-0 blocks: unhashed ones, most recently freed first (a stack), and hashed
    # ones in LRU order (oldest first).
    _free: deque[int] = field(init=False, repr=False)
    _evictable: OrderedDict[int, None] = field(init=False, repr=False)
    _cache: dict[BlockKey, int] = field(init=False, repr=False)
    # Per-sequence state.
    _tables: dict[int, list[int]] = field(init=False, repr=False)
    _ntok: dict[int, int] = field(init=False, repr=False)
    _extra: dict[int, Hashable] = field(init=False, repr=False)
    # hash() of the chain key of each leading full block already processed by
    # commit_computed / allocate_prefix; its length is the commit cursor (in blocks).
    _chain: dict[int, list[int]] = field(init=False, repr=False)
    # Counters.
    _used: int = field(init=False, repr=False)
    _peak: int = field(init=False, repr=False)
    _query_tokens: int = field(init=False, repr=False)
    _hit_tokens: int = field(init=False, repr=False)
    _evictions: int = field(init=False, repr=False)
    _cow_copies: int = field(init=False, repr=False)
    # Blocks >= this id were never allocated (the initial free queue hands them out in order,
    # after every touched free block).
    _fresh: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        self._ref = [0] * self.num_blocks
        self._key = [None] * self.num_blocks
        self._free = deque(range(self.num_blocks))
        self._evictable = OrderedDict()
        self._cache = {}
        self._tables = {}
        self._ntok = {}
        self._extra = {}
        self._chain = {}
        self._used = 0
        self._peak = 0
        self._query_tokens = 0
        self._hit_tokens = 0
        self._evictions = 0
        self._cow_copies = 0
        self._fresh = 0

    # ------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now: truly free plus evictable cached (ref 0) blocks."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks with ``ref_count > 0``."""
        return self._used

    @property
    def peak_used_blocks(self) -> int:
        """Maximum of :attr:`num_used_blocks` since construction or :meth:`reset_peak`."""
        return self._peak

    def reset_peak(self) -> None:
        """Restart peak tracking from the current usage."""
        self._peak = self._used

    def block_table(self, seq_id: int) -> list[int]:
        """A copy of the sequence's block table (logical block index -> block id)."""
        return list(self._tables[seq_id])

    def num_tokens(self, seq_id: int) -> int:
        """Number of positions whose KV slots the sequence has reserved."""
        return self._ntok[seq_id]

    def has_seq(self, seq_id: int) -> bool:
        return seq_id in self._tables

    @property
    def seq_ids(self) -> list[int]:
        """Registered sequence ids, in registration order."""
        return list(self._tables)

    def blocks_needed(self, seq_id: int | None, num_new_tokens: int) -> int:
        """Upper bound of blocks that appending ``num_new_tokens`` tokens would allocate.

        For an existing sequence this is exact: new tail blocks plus one if the write would
        trigger a copy-on-write. For ``seq_id=None`` (a new sequence) prefix-cache hits are
        ignored, so the true need may be smaller.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        bs = self.block_size
        if seq_id is None:
            return -(-num_new_tokens // bs)
        n = self._ntok[seq_id]
        table = self._tables[seq_id]
        return (
            -(-(n + num_new_tokens) // bs) - len(table) + self._needs_cow(table, n, num_new_tokens)
        )

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def is_cached(self, block_id: int) -> bool:
        """Whether the block holds a registered prefix-cache key."""
        return self._key[block_id] is not None

    def slot(self, seq_id: int, position: int) -> int:
        """Flat KV slot of ``position``: ``table[pos // bs] * bs + pos % bs``."""
        if not 0 <= position < self._ntok[seq_id]:
            raise IndexError(
                f"position {position} outside the {self._ntok[seq_id]} reserved "
                f"slots of seq {seq_id}"
            )
        bs = self.block_size
        return self._tables[seq_id][position // bs] * bs + position % bs

    def evict_cached(self) -> int:
        """Forgets every unreferenced cached block (they join the free queue, in LRU order);
        blocks in use keep their keys. Returns how many were evicted. Used to compare runs
        without one warming the cache for the next."""
        count = len(self._evictable)
        for b in self._evictable:
            del self._cache[self._key[b]]  # type: ignore[index]
            self._key[b] = None
            self._free.appendleft(b)
        self._evictable.clear()
        self._evictions += count
        return count

    def stats(self) -> dict[str, int | float]:
        """Counters for logging: pool usage and prefix-cache efficiency (in tokens)."""
        q = self._query_tokens
        return {
            "num_blocks": self.num_blocks,
            "used": self._used,
            "free": len(self._free),
            "evictable": len(self._evictable),
            "cached": len(self._cache),
            "peak": self._peak,
            "touched": self._fresh,
            "num_seqs": len(self._tables),
            "prefix_query_tokens": q,
            "prefix_hit_tokens": self._hit_tokens,
            "prefix_hit_rate": self._hit_tokens / q if q else 0.0,
            "evictions": self._evictions,
            "cow_copies": self._cow_copies,
        }

    # ---------------------------------------------------------------- mutations

    def allocate_prefix(
        self, seq_id: int, token_ids: Sequence[int], extra_key: Hashable = None
    ) -> int:
        """Register a new sequence, reusing cached full blocks of ``token_ids``.

        Returns the number of cached tokens (a multiple of ``block_size``, always strictly less
        than ``len(token_ids)`` when the prompt is non-empty, so at least one token is left to
        compute and produce logits). Allocates no new block, hence never raises
        :class:`NoFreeBlocksError`; the caller then calls :meth:`append_slots` for the rest.
        ``extra_key`` (e.g. a LoRA id or multimodal hash) is mixed into every block key and
        kept for the sequence's later :meth:`commit_computed` calls (and its forks).
        """
        if seq_id in self._tables:
            raise ValueError(f"seq {seq_id} already exists")
        bs = self.block_size
        hits: list[int] = []
        chain: list[int] = []
        if self.enable_prefix_caching:
            self._query_tokens += len(token_ids)
            parent: int | None = None
            # Leave the last token uncached: (len - 1) // bs full blocks at most.
            for i in range((len(token_ids) - 1) // bs if token_ids else 0):
                key = (parent, extra_key, tuple(token_ids[i * bs : (i + 1) * bs]))
                b = self._cache.get(key)
                if b is None:
                    break
                parent = hash(key)
                hits.append(b)
                chain.append(parent)
            for b in hits:
                if self._ref[b] == 0:
                    # Revive: an evictable block leaves the LRU and is referenced again.
                    del self._evictable[b]
                    self._used += 1
                self._ref[b] += 1
            if self._used > self._peak:
                self._peak = self._used
            self._hit_tokens += len(hits) * bs
        self._tables[seq_id] = hits
        self._ntok[seq_id] = len(hits) * bs
        self._extra[seq_id] = extra_key
        self._chain[seq_id] = chain
        return len(hits) * bs

    def append_slots(self, seq_id: int, num_new_tokens: int) -> list[tuple[int, int]]:
        """Reserve slots for positions ``[num_tokens, num_tokens + num_new_tokens)``.

        If the tail block that receives the first new position is partially filled and shared
        or hashed, it is replaced by a fresh copy first; the ``(src, dst)`` pair is returned so
        the runner copies the KV rows. Atomic: raises :class:`NoFreeBlocksError` and changes
        nothing when fewer than :meth:`blocks_needed` blocks are allocatable.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        table = self._tables[seq_id]
        n = self._ntok[seq_id]
        cow = self._needs_cow(table, n, num_new_tokens)
        new_blocks = -(-(n + num_new_tokens) // self.block_size) - len(table)
        need = new_blocks + cow
        if need > len(self._free) + len(self._evictable):
            raise NoFreeBlocksError(
                f"seq {seq_id} needs {need} blocks for {num_new_tokens} tokens, "
                f"{self.num_free_blocks} allocatable"
            )
        copies: list[tuple[int, int]] = []
        if cow:
            src = table[-1]
            dst = self._alloc()
            table[-1] = dst
            copies.append((src, dst))
            self._cow_copies += 1
        for _ in range(new_blocks):
            table.append(self._alloc())
        # Release the CoW source only now, so no allocation above could hand it out again
        # before the runner has copied from it.
        if cow:
            self._release(src)
        self._ntok[seq_id] = n + num_new_tokens
        return copies

    def commit_computed(self, seq_id: int, token_ids: Sequence[int], num_computed: int) -> None:
        """Record that the KV of positions ``[0, num_computed)`` is written.

        Registers the prefix-cache key of every block that became full and was not processed
        yet. A block whose key is already held by another block stays unhashed (the cache keeps
        one block per key); a block already hashed (e.g. shared with a fork) is left as is.
        """
        if not self.enable_prefix_caching:
            return
        n = self._ntok[seq_id]
        if not 0 <= num_computed <= min(n, len(token_ids)):
            raise ValueError(
                f"num_computed={num_computed} must be within [0, min(num_tokens={n}, "
                f"len(token_ids)={len(token_ids)})] for seq {seq_id}"
            )
        bs = self.block_size
        chain = self._chain[seq_id]
        full = num_computed // bs
        if len(chain) >= full:
            return
        table = self._tables[seq_id]
        extra = self._extra[seq_id]
        parent = chain[-1] if chain else None
        for i in range(len(chain), full):
            key = (parent, extra, tuple(token_ids[i * bs : (i + 1) * bs]))
            b = table[i]
            if self._key[b] is None and key not in self._cache:
                self._key[b] = key
                self._cache[key] = b
            parent = hash(key)
            chain.append(parent)

    def fork(self, parent_seq_id: int, child_seq_ids: Sequence[int]) -> None:
        """Give each child a copy of the parent's table and token count; no allocation.

        Every block of the parent gains ``len(child_seq_ids)`` references. Divergent writes
        later go through copy-on-write in :meth:`append_slots`.
        """
        table = self._tables[parent_seq_id]
        k = len(child_seq_ids)
        if len(set(child_seq_ids)) != k:
            raise ValueError(f"duplicate child ids in {list(child_seq_ids)}")
        for c in child_seq_ids:
            if c in self._tables:
                raise ValueError(f"child seq {c} already exists")
        if k == 0:
            return
        ref = self._ref
        for b in table:
            ref[b] += k
        n = self._ntok[parent_seq_id]
        extra = self._extra[parent_seq_id]
        chain = self._chain[parent_seq_id]
        for c in child_seq_ids:
            self._tables[c] = list(table)
            self._ntok[c] = n
            self._extra[c] = extra
            self._chain[c] = list(chain)

    def free(self, seq_id: int) -> None:
        """Drop the sequence and its references (KeyError if unknown)."""
        table = self._tables.pop(seq_id)
        del self._ntok[seq_id]
        del self._extra[seq_id]
        del self._chain[seq_id]
        for b in reversed(table):
            self._release(b)

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Shrink the sequence to its first ``num_tokens`` positions (roll back).

        Blocks past the new end lose this sequence's reference. A block that becomes the
        partial tail is not written here; the next :meth:`append_slots` copies it first if it
        is shared or cached.
        """
        n = self._ntok[seq_id]
        if not 0 <= num_tokens <= n:
            raise ValueError(f"cannot truncate seq {seq_id} from {n} to {num_tokens} tokens")
        bs = self.block_size
        table = self._tables[seq_id]
        keep = -(-num_tokens // bs)
        dropped = table[keep:]
        del table[keep:]
        for b in reversed(dropped):
            self._release(b)
        del self._chain[seq_id][num_tokens // bs :]
        self._ntok[seq_id] = num_tokens

    # -------------------------------------------------------------------- checks

    def check_integrity(self) -> None:
        """Verify every invariant from scratch (O(pool + tables)); AssertionError if broken."""
        nb, bs = self.num_blocks, self.block_size
        counts = [0] * nb
        for s, table in self._tables.items():
            n = self._ntok[s]
            if len(table) != -(-n // bs):
                raise AssertionError(
                    f"seq {s}: table has {len(table)} blocks for {n} tokens "
                    f"(expected {-(-n // bs)})"
                )
            if len(self._chain[s]) > n // bs:
                raise AssertionError(
                    f"seq {s}: {len(self._chain[s])} chain hashes but only {n // bs} full blocks"
                )
            for b in table:
                if not 0 <= b < nb:
                    raise AssertionError(f"seq {s}: block id {b} out of range")
                counts[b] += 1
        for key_map in (self._ntok, self._extra, self._chain):
            if key_map.keys() != self._tables.keys():
                raise AssertionError("per-seq dicts disagree on the set of sequences")
        for b in range(nb):
            if counts[b] != self._ref[b]:
                raise AssertionError(
                    f"block {b}: ref_count {self._ref[b]} but {counts[b]} table occurrences"
                )
        free_set = set(self._free)
        if len(free_set) != len(self._free):
            dups = sorted(b for b in free_set if self._free.count(b) > 1)
            raise AssertionError(f"free queue has duplicates: {dups}")
        evict_set = set(self._evictable)
        used_set = {b for b in range(nb) if self._ref[b] > 0}
        if free_set & evict_set:
            raise AssertionError(f"blocks both free and evictable: {sorted(free_set & evict_set)}")
        if free_set & used_set:
            raise AssertionError(f"referenced blocks in free queue: {sorted(free_set & used_set)}")
        if evict_set & used_set:
            raise AssertionError(f"referenced blocks evictable: {sorted(evict_set & used_set)}")
        missing = set(range(nb)) - free_set - evict_set - used_set
        if missing:
            raise AssertionError(f"blocks in no state (leaked): {sorted(missing)}")
        if len(used_set) != self._used:
            raise AssertionError(f"used counter {self._used} != {len(used_set)} referenced blocks")
        if self._peak < self._used:
            raise AssertionError(f"peak {self._peak} < used {self._used}")
        fresh = list(range(self._fresh, nb))
        if (
            len(self._free) < len(fresh)
            or list(self._free)[len(self._free) - len(fresh) :] != fresh
        ):
            raise AssertionError(
                f"never-used blocks {self._fresh}..{nb - 1} are not the free queue's tail"
            )
        for b in free_set:
            if self._key[b] is not None:
                raise AssertionError(f"free block {b} is still hashed")
        for b in evict_set:
            if self._key[b] is None:
                raise AssertionError(f"evictable block {b} is not hashed")
        hashed = 0
        for b in range(nb):
            key = self._key[b]
            if key is not None:
                hashed += 1
                if self._cache.get(key) != b:
                    raise AssertionError(
                        f"block {b}: its key maps to {self._cache.get(key)} in the cache"
                    )
        if hashed != len(self._cache):
            raise AssertionError(
                f"cache has {len(self._cache)} keys but {hashed} blocks are hashed"
            )
        if not self.enable_prefix_caching and self._cache:
            raise AssertionError("prefix caching disabled but cache is non-empty")

    # ------------------------------------------------------------------ helpers

    def _needs_cow(self, table: list[int], n: int, num_new_tokens: int) -> bool:
        """Whether writing position ``n`` must first copy the partial tail block."""
        if num_new_tokens == 0 or n % self.block_size == 0:
            return False  # nothing written, or the write starts a fresh block
        tail = table[-1]
        return self._ref[tail] > 1 or self._key[tail] is not None

    def _alloc(self) -> int:
        """Pop a block (free-queue head, else oldest evictable; with ``evict_before_growing`` the
        oldest evictable before a never-used one) and give it ref 1."""
        free = self._free
        if free and not (self.evict_before_growing and self._evictable and free[0] >= self._fresh):
            b = free.popleft()
            if b >= self._fresh:
                self._fresh = b + 1
        else:
            # Caller checked availability, so the LRU is non-empty here.
            b, _ = self._evictable.popitem(last=False)
            del self._cache[self._key[b]]  # type: ignore[index]
            self._key[b] = None
            self._evictions += 1
        self._ref[b] = 1
        self._used += 1
        if self._used > self._peak:
            self._peak = self._used
        return b

    def _release(self, b: int) -> None:
        """Drop one reference; at zero the block becomes evictable (hashed) or free."""
        r = self._ref[b] - 1
        self._ref[b] = r
        if r == 0:
            self._used -= 1
            if self._key[b] is not None:
                self._evictable[b] = None  # most-recently-freed end
            else:
                self._free.appendleft(b)  # reused first: its pages are resident and cache-warm
