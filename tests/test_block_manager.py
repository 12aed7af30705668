"""Tests of the paged KV-cache bookkeeping (no model, no torch).

Block ids are asserted exactly; they follow the documented allocation order: the free queue
starts as [0, 1, ..., n-1], allocation pops its head, released blocks are visited in reverse
table order, and eviction (only when the free queue is empty) takes the least recently freed
cached block.
"""

from __future__ import annotations

import random
from collections.abc import Hashable

import pytest

from ttscale.engine.block_manager import BlockManager
from ttscale.errors import NoFreeBlocksError


def toks(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


def snapshot(bm: BlockManager) -> tuple:
    """Everything observable plus the ordered pools, to prove a failed call changed nothing."""
    seqs = {s: (bm.block_table(s), bm.num_tokens(s)) for s in bm.seq_ids}
    refs = [bm.ref_count(b) for b in range(bm.num_blocks)]
    cached = [bm.is_cached(b) for b in range(bm.num_blocks)]
    return (
        seqs,
        refs,
        cached,
        list(bm._free),
        list(bm._evictable),
        {s: list(c) for s, c in bm._chain.items()},
        bm.stats(),
    )


def free_all(bm: BlockManager) -> None:
    for s in bm.seq_ids:
        bm.free(s)
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.num_used_blocks == 0


def new_seq(bm: BlockManager, seq_id: int, prompt: list[int], extra: Hashable = None) -> int:
    """Engine-style prefill: reuse the cache, reserve the rest, mark it computed."""
    cached = bm.allocate_prefix(seq_id, prompt, extra)
    assert bm.append_slots(seq_id, len(prompt) - cached) == []
    bm.commit_computed(seq_id, prompt, len(prompt))
    return cached


# ---------------------------------------------------------------- basic allocation


def test_allocate_and_append_across_block_boundaries() -> None:
    bm = BlockManager(8, block_size=4)
    assert bm.blocks_needed(None, 9) == 3
    assert bm.allocate_prefix(0, toks(10)) == 0
    assert bm.block_table(0) == [] and bm.num_tokens(0) == 0
    assert bm.append_slots(0, 10) == []
    assert bm.block_table(0) == [0, 1, 2]
    assert bm.num_tokens(0) == 10
    assert [bm.slot(0, p) for p in (0, 3, 4, 9)] == [0, 3, 4, 9]
    assert bm.blocks_needed(0, 2) == 0
    assert bm.blocks_needed(0, 3) == 1
    assert bm.append_slots(0, 2) == []  # fills block 2 exactly
    assert bm.block_table(0) == [0, 1, 2]
    assert bm.append_slots(0, 1) == []  # crosses into a fresh block
    assert bm.block_table(0) == [0, 1, 2, 3]
    assert bm.slot(0, 12) == 12
    assert [bm.ref_count(b) for b in range(8)] == [1, 1, 1, 1, 0, 0, 0, 0]
    assert bm.num_used_blocks == 4 and bm.num_free_blocks == 4
    assert bm.append_slots(0, 0) == []
    with pytest.raises(IndexError):
        bm.slot(0, 13)
    bm.check_integrity()

    # A second sequence takes the next blocks from the head of the free queue.
    assert bm.allocate_prefix(1, toks(5, 500)) == 0
    bm.append_slots(1, 5)
    assert bm.block_table(1) == [4, 5]

    # Freed uncached blocks go to the head of the free queue (reused first), in table order.
    bm.free(0)
    assert list(bm._free) == [0, 1, 2, 3, 6, 7]
    assert bm.allocate_prefix(2, []) == 0
    bm.append_slots(2, 9)
    assert bm.block_table(2) == [0, 1, 2]
    assert bm.peak_used_blocks == 6
    bm.check_integrity()
    free_all(bm)
    assert bm.peak_used_blocks == 6
    bm.reset_peak()
    assert bm.peak_used_blocks == 0


def test_errors() -> None:
    bm = BlockManager(4, block_size=4)
    bm.allocate_prefix(0, toks(3))
    with pytest.raises(ValueError):
        bm.allocate_prefix(0, toks(3))
    with pytest.raises(KeyError):
        bm.free(7)
    with pytest.raises(ValueError):
        bm.fork(0, [0])
    with pytest.raises(ValueError):
        bm.fork(0, [1, 1])
    with pytest.raises(ValueError):
        bm.append_slots(0, -1)
    with pytest.raises(ValueError):
        bm.truncate(0, 1)  # only 0 tokens reserved
    with pytest.raises(ValueError):
        bm.commit_computed(0, toks(3), 1)  # nothing reserved yet
    with pytest.raises(ValueError):
        BlockManager(0)
    bm.check_integrity()
    free_all(bm)


# ---------------------------------------------------------------- fork and copy-on-write


def test_fork_at_block_boundary_needs_no_copy() -> None:
    bm = BlockManager(8, block_size=4)
    new_seq(bm, 0, toks(8))
    assert bm.block_table(0) == [0, 1]
    bm.fork(0, [1, 2])
    assert bm.block_table(1) == bm.block_table(2) == [0, 1]
    assert bm.num_tokens(1) == 8
    assert bm.ref_count(0) == bm.ref_count(1) == 3
    assert bm.num_used_blocks == 2
    bm.check_integrity()
    # The next position starts a fresh block for each: no copy-on-write.
    assert bm.blocks_needed(1, 1) == 1
    assert bm.append_slots(1, 1) == []
    assert bm.append_slots(2, 1) == []
    assert bm.append_slots(0, 1) == []
    assert bm.block_table(1) == [0, 1, 2]
    assert bm.block_table(2) == [0, 1, 3]
    assert bm.block_table(0) == [0, 1, 4]
    assert bm.ref_count(1) == 3 and bm.ref_count(4) == 1
    bm.check_integrity()
    free_all(bm)


def test_fork_mid_block_copy_on_write() -> None:
    bm = BlockManager(8, block_size=4)
    new_seq(bm, 0, toks(6))
    assert bm.block_table(0) == [0, 1]
    bm.fork(0, [1, 2])
    assert bm.ref_count(1) == 3
    assert bm.num_free_blocks == 6  # fork allocates nothing
    # First child write: the shared partial tail block 1 is copied into block 2.
    assert bm.blocks_needed(1, 1) == 1
    assert bm.append_slots(1, 1) == [(1, 2)]
    assert bm.block_table(1) == [0, 2]
    assert bm.ref_count(1) == 2 and bm.ref_count(2) == 1 and bm.ref_count(0) == 3
    assert bm.slot(1, 6) == 2 * 4 + 2
    # Second child: copies too, into block 3.
    assert bm.append_slots(2, 2) == [(1, 3)]  # fills the copy exactly: no further block
    assert bm.block_table(2) == [0, 3]
    assert bm.ref_count(1) == 1
    # The parent is now the last owner: it writes in place.
    assert bm.blocks_needed(0, 1) == 0
    assert bm.append_slots(0, 1) == []
    assert bm.block_table(0) == [0, 1]
    assert bm.num_tokens(0) == 7
    bm.check_integrity()
    free_all(bm)


def test_parent_writing_first_copies_too() -> None:
    bm = BlockManager(8, block_size=4)
    new_seq(bm, 0, toks(5))
    bm.fork(0, [1])
    # Copy then a new block: CoW dst is allocated before the appended block.
    assert bm.append_slots(0, 4) == [(1, 2)]
    assert bm.block_table(0) == [0, 2, 3]
    assert bm.append_slots(1, 1) == []  # child now sole owner of block 1
    assert bm.block_table(1) == [0, 1]
    bm.check_integrity()
    free_all(bm)


def test_fork_64_after_140_token_prompt_allocates_nothing() -> None:
    bm = BlockManager(128, block_size=16)
    assert new_seq(bm, 0, toks(140)) == 0
    assert bm.block_table(0) == list(range(9))  # 8 full blocks + 12 tokens
    used, free = bm.num_used_blocks, bm.num_free_blocks
    children = list(range(1, 65))
    bm.fork(0, children)
    assert bm.num_used_blocks == used == 9
    assert bm.num_free_blocks == free == 119
    assert all(bm.ref_count(b) == 65 for b in range(9))
    assert all(bm.block_table(c) == list(range(9)) and bm.num_tokens(c) == 140 for c in children)
    bm.check_integrity()
    # Every child's first token copies the shared partial block 8, in allocation order.
    for i, c in enumerate(children):
        assert bm.append_slots(c, 1) == [(8, 9 + i)]
        assert bm.block_table(c)[-1] == 9 + i
    assert bm.ref_count(8) == 1
    assert bm.append_slots(0, 1) == []  # last owner writes in place
    assert all(bm.ref_count(b) == 65 for b in range(8))
    assert bm.num_used_blocks == 9 + 64
    bm.check_integrity()
    free_all(bm)


# ---------------------------------------------------------------- prefix caching


def test_prefix_reuse_same_prompt() -> None:
    bm = BlockManager(8, block_size=4)
    prompt = toks(10)
    assert new_seq(bm, 0, prompt) == 0
    assert bm.block_table(0) == [0, 1, 2]
    assert bm.is_cached(0) and bm.is_cached(1) and not bm.is_cached(2)  # partial: never hashed
    # Same prompt: the two full blocks are reused, the partial tail is recomputed.
    assert bm.allocate_prefix(1, prompt) == 8
    assert bm.block_table(1) == [0, 1]
    assert bm.num_tokens(1) == 8
    assert bm.ref_count(0) == bm.ref_count(1) == 2
    assert bm.append_slots(1, 2) == []
    assert bm.block_table(1) == [0, 1, 3]
    bm.commit_computed(1, prompt, 10)
    # A prompt sharing only the first block hits only that block.
    other = prompt[:4] + toks(6, 900)
    assert bm.allocate_prefix(2, other) == 4
    assert bm.block_table(2) == [0]
    st = bm.stats()
    assert st["prefix_query_tokens"] == 30 and st["prefix_hit_tokens"] == 12
    bm.check_integrity()
    free_all(bm)


def test_different_extra_key_does_not_share() -> None:
    bm = BlockManager(8, block_size=4)
    prompt = toks(10)
    new_seq(bm, 0, prompt, extra="lora-a")
    assert bm.allocate_prefix(1, prompt, "lora-b") == 0
    assert bm.allocate_prefix(2, prompt) == 0
    assert bm.allocate_prefix(3, prompt, "lora-a") == 8
    assert bm.block_table(3) == [0, 1]
    # A fork inherits the extra key: its commits extend the same chain.
    bm.append_slots(3, 6)
    bm.fork(3, [4])
    bm.commit_computed(4, [*prompt, 7, 7, 7, 7], 14)
    assert bm.is_cached(bm.block_table(4)[2])
    assert bm.allocate_prefix(5, [*prompt, 7, 7, 7, 7, 1], "lora-a") == 12
    bm.check_integrity()
    free_all(bm)


def test_exact_multiple_prompt_leaves_one_block_to_compute() -> None:
    bm = BlockManager(8, block_size=4)
    prompt = toks(8)
    new_seq(bm, 0, prompt)
    assert bm.is_cached(0) and bm.is_cached(1)
    assert bm.allocate_prefix(1, prompt) == 4  # not 8: the last token must be computed
    assert bm.block_table(1) == [0]
    assert bm.append_slots(1, 4) == []
    assert bm.block_table(1) == [0, 2]
    # The recomputed block duplicates block 1's key: it stays unhashed, block 1 keeps the key.
    bm.commit_computed(1, prompt, 8)
    assert not bm.is_cached(2) and bm.is_cached(1)
    assert bm.allocate_prefix(2, []) == 0
    bm.check_integrity()
    free_all(bm)


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(8, block_size=4, enable_prefix_caching=False)
    new_seq(bm, 0, toks(10))
    assert not any(bm.is_cached(b) for b in range(8))
    assert bm.allocate_prefix(1, toks(10)) == 0
    bm.free(0)
    assert list(bm._free)[:3] == [0, 1, 2]  # nothing evictable: straight back to the queue
    free_all(bm)


def test_duplicate_computation_left_unhashed() -> None:
    bm = BlockManager(8, block_size=4)
    prompt = toks(8)
    # Both admitted before either committed: both compute the same blocks.
    for s in (0, 1):
        assert bm.allocate_prefix(s, prompt) == 0
        bm.append_slots(s, 8)
    assert bm.block_table(0) == [0, 1] and bm.block_table(1) == [2, 3]
    bm.commit_computed(0, prompt, 8)
    bm.commit_computed(1, prompt, 8)
    assert [bm.is_cached(b) for b in range(4)] == [True, True, False, False]
    bm.free(1)
    assert list(bm._free) == [2, 3, 4, 5, 6, 7]  # unhashed duplicates are plain free blocks
    bm.free(0)
    assert list(bm._evictable) == [1, 0]
    bm.check_integrity()
    free_all(bm)


def test_eviction_lru_order_when_free_queue_empty() -> None:
    bm = BlockManager(4, block_size=4)
    a, b = toks(8, 100), toks(8, 200)
    new_seq(bm, 0, a)
    new_seq(bm, 1, b)
    assert bm.block_table(0) == [0, 1] and bm.block_table(1) == [2, 3]
    bm.free(0)
    bm.free(1)
    # Reverse table order: each chain's tail is older than its head.
    assert list(bm._evictable) == [1, 0, 3, 2]
    assert list(bm._free) == []
    assert bm.num_free_blocks == 4 and bm.num_used_blocks == 0
    bm.check_integrity()
    # The free queue is empty, so allocation evicts the least recently freed block: 1.
    assert bm.allocate_prefix(2, toks(4, 300)) == 0
    bm.append_slots(2, 4)
    assert bm.block_table(2) == [1]
    assert not bm.is_cached(1)
    assert bm.stats()["evictions"] == 1
    # Chain a lost its tail, but its head still serves as a prefix.
    assert bm.allocate_prefix(3, [*a, 1]) == 4
    assert bm.block_table(3) == [0]
    bm.append_slots(3, 5)  # evicts 3 then 2: chain b's tail first
    assert bm.block_table(3) == [0, 3, 2]
    assert bm.allocate_prefix(4, [*b, 1]) == 0
    bm.check_integrity()
    free_all(bm)


def test_reviving_an_evictable_block() -> None:
    bm = BlockManager(6, block_size=4)
    prompt = toks(9)
    new_seq(bm, 0, prompt)
    assert bm.block_table(0) == [0, 1, 2]
    bm.free(0)
    assert list(bm._evictable) == [1, 0] and bm._free[0] == 2
    assert bm.num_free_blocks == 6 and bm.num_used_blocks == 0
    # A hit takes blocks 0 and 1 out of the LRU and references them again.
    assert bm.allocate_prefix(1, prompt) == 8
    assert bm.block_table(1) == [0, 1]
    assert bm.ref_count(0) == bm.ref_count(1) == 1
    assert list(bm._evictable) == []
    assert bm.num_used_blocks == 2 and bm.num_free_blocks == 4
    bm.check_integrity()
    # Revived blocks cannot be evicted: fill the pool, then there is nothing left to take.
    bm.append_slots(1, 16)
    assert bm.num_free_blocks == 0
    with pytest.raises(NoFreeBlocksError):
        bm.append_slots(1, 1)
    assert bm.is_cached(0) and bm.is_cached(1)
    # Freed again: they re-enter the LRU at its most recent end.
    bm.free(1)
    assert list(bm._evictable) == [1, 0]
    bm.check_integrity()
    free_all(bm)


# ---------------------------------------------------------------- atomic failure, truncate


def test_no_free_blocks_leaves_state_unchanged() -> None:
    bm = BlockManager(4, block_size=4)
    new_seq(bm, 0, toks(6))
    new_seq(bm, 1, toks(8, 300))
    bm.free(1)  # blocks 3, 2 become evictable
    bm.fork(0, [2])
    before = snapshot(bm)
    assert bm.num_free_blocks == 2
    # Needs a CoW copy plus 2 new blocks = 3 > 2.
    assert bm.blocks_needed(2, 7) == 3
    with pytest.raises(NoFreeBlocksError):
        bm.append_slots(2, 7)
    assert snapshot(bm) == before
    with pytest.raises(NoFreeBlocksError):
        bm.append_slots(0, 11)
    assert snapshot(bm) == before
    bm.check_integrity()
    # Exactly enough: succeeds, evicting both cached blocks (3 first: it was freed first).
    assert bm.append_slots(2, 6) == [(1, 3)]
    assert bm.block_table(2) == [0, 3, 2]
    assert bm.num_free_blocks == 0
    bm.check_integrity()
    free_all(bm)


def test_truncate() -> None:
    bm = BlockManager(8, block_size=4)
    prompt = toks(10)
    new_seq(bm, 0, prompt)
    assert bm.block_table(0) == [0, 1, 2]
    bm.truncate(0, 6)
    assert bm.block_table(0) == [0, 1]
    assert bm.num_tokens(0) == 6
    assert bm._free[0] == 2  # the dropped block is reused first
    bm.check_integrity()
    # Block 1 is full and cached: rewriting position 6 must not corrupt the cache entry. The
    # copy goes to block 2, the most recently freed.
    assert bm.append_slots(0, 1) == [(1, 2)]
    assert bm.block_table(0) == [0, 2]
    assert bm.ref_count(1) == 0 and bm.is_cached(1)  # evictable, still hittable
    assert bm.allocate_prefix(1, prompt) == 8
    assert bm.block_table(1) == [0, 1]
    bm.free(1)
    # An uncached, unshared tail is written in place after truncation.
    bm.truncate(0, 5)
    assert bm.append_slots(0, 2) == []
    assert bm.block_table(0) == [0, 2]
    # Truncation into a shared block: the next write copies it.
    bm.fork(0, [2])
    bm.truncate(2, 6)
    assert bm.block_table(2) == [0, 2]
    assert bm.ref_count(2) == 2
    assert bm.append_slots(2, 1) == [(2, 3)]
    assert bm.ref_count(2) == 1
    bm.truncate(2, 0)
    assert bm.block_table(2) == [] and bm.num_tokens(2) == 0
    bm.check_integrity()
    free_all(bm)


def test_check_integrity_detects_corruption() -> None:
    bm = BlockManager(4, block_size=4)
    new_seq(bm, 0, toks(6))
    bm._ref[1] += 1
    with pytest.raises(AssertionError, match="block 1: ref_count 2 but 1"):
        bm.check_integrity()
    bm._ref[1] -= 1
    bm._free.append(2)
    with pytest.raises(AssertionError, match="duplicates"):
        bm.check_integrity()
    bm._free.pop()
    bm._tables[0].pop()
    with pytest.raises(AssertionError, match="seq 0: table has 1 blocks for 6 tokens"):
        bm.check_integrity()


# ---------------------------------------------------------------- randomized stress


def test_randomized_stress() -> None:
    """Random ops against a simulated KV pool: each slot stores the identity of the prefix
    whose KV it holds, so any sharing, CoW or cache-hit bug shows up as a wrong identity."""
    rng = random.Random(20240611)
    bs, nb = 4, 40
    bm = BlockManager(nb, block_size=bs)
    kv: list[int | None] = [None] * (nb * bs)
    tokens: dict[int, list[int]] = {}
    ident: dict[int, list[int]] = {}  # ident[s][p]: identity of (extra, tokens[: p + 1])
    extras: dict[int, Hashable] = {}
    prefixes = [[rng.randrange(8) for _ in range(rng.randrange(1, 14))] for _ in range(5)]
    next_id = 0
    counts = dict.fromkeys(("new", "cached", "decode", "cow", "fork", "free", "trunc", "oom"), 0)

    def extend(s: int, new: list[int]) -> None:
        for t in new:
            prev = ident[s][-1] if ident[s] else hash(("root", extras[s]))
            ident[s].append(hash((prev, t)))
        tokens[s].extend(new)

    def write(s: int, start: int, copies: list[tuple[int, int]]) -> None:
        for src, dst in copies:  # the runner applies copies before writing new KV
            kv[dst * bs : (dst + 1) * bs] = kv[src * bs : (src + 1) * bs]
        for p in range(start, bm.num_tokens(s)):
            kv[bm.slot(s, p)] = ident[s][p]

    def verify(s: int, upto: int) -> None:
        for p in range(upto):
            assert kv[bm.slot(s, p)] == ident[s][p], f"seq {s} pos {p} has wrong KV"

    def pick() -> int:
        return rng.choice(list(tokens))

    ops, weights = ["new", "decode", "fork", "free", "trunc", "commit"], [3, 6, 2, 2, 1, 1]
    for _ in range(5000):
        op = rng.choices(ops, weights)[0]
        if not tokens:
            op = "new"
        elif op in ("new", "fork") and len(tokens) >= 16:
            op = "free"  # keep the population bounded so admissions keep happening
        if op == "new":
            s, next_id = next_id, next_id + 1
            prompt = rng.choice(prefixes) + [rng.randrange(8) for _ in range(rng.randrange(4))]
            extras[s] = rng.choice([None, None, "x"])
            tokens[s], ident[s] = [], []
            extend(s, prompt)
            cached = bm.allocate_prefix(s, prompt, extras[s])
            assert cached % bs == 0 and cached < len(prompt)
            verify(s, cached)  # a cache hit must hold exactly this prompt's KV
            counts["new"] += 1
            counts["cached"] += cached > 0
            try:
                copies = bm.append_slots(s, len(prompt) - cached)
            except NoFreeBlocksError:
                counts["oom"] += 1
                bm.free(s)
                del tokens[s], ident[s], extras[s]
            else:
                assert copies == []
                write(s, cached, copies)
                bm.commit_computed(s, tokens[s], len(prompt))
        elif op == "decode":
            s = pick()
            if len(tokens[s]) > 40:
                bm.truncate(s, rng.randrange(len(tokens[s])))
                del tokens[s][bm.num_tokens(s) :], ident[s][bm.num_tokens(s) :]
            k = rng.randint(1, 5)
            n = bm.num_tokens(s)
            need = bm.blocks_needed(s, k)
            before = snapshot(bm)
            try:
                copies = bm.append_slots(s, k)
            except NoFreeBlocksError:
                counts["oom"] += 1
                assert need > bm.num_free_blocks
                assert snapshot(bm) == before
            else:
                # blocks_needed is exact; a CoW source we held alone is released.
                released = sum(bm.ref_count(src) == 0 for src, _ in copies)
                assert bm.num_used_blocks == before[6]["used"] + need - released
                counts["decode"] += 1
                counts["cow"] += len(copies)
                extend(s, [rng.randrange(8) for _ in range(k)])
                write(s, n, copies)
                if rng.random() < 0.8:
                    bm.commit_computed(s, tokens[s], bm.num_tokens(s))
        elif op == "fork":
            s = pick()
            kids = list(range(next_id, next_id + rng.randint(1, 3)))
            next_id += len(kids)
            free_before = bm.num_free_blocks
            bm.fork(s, kids)
            assert bm.num_free_blocks == free_before
            for c in kids:
                tokens[c], ident[c], extras[c] = list(tokens[s]), list(ident[s]), extras[s]
            counts["fork"] += 1
        elif op == "free":
            s = pick()
            bm.free(s)
            del tokens[s], ident[s], extras[s]
            counts["free"] += 1
        elif op == "trunc":
            s = pick()
            bm.truncate(s, rng.randint(0, bm.num_tokens(s)))
            del tokens[s][bm.num_tokens(s) :], ident[s][bm.num_tokens(s) :]
            counts["trunc"] += 1
        else:
            s = pick()
            bm.commit_computed(s, tokens[s], rng.randint(0, bm.num_tokens(s)))
        bm.check_integrity()
        for s in tokens:
            assert bm.num_tokens(s) == len(tokens[s])
            verify(s, len(tokens[s]))

    # Every kind of event actually happened.
    assert all(v > 10 for v in counts.values()), counts
    assert bm.stats()["evictions"] > 0
    free_all(bm)


def test_evict_cached_forgets_unreferenced_blocks_only():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate_prefix(1, list(range(9)))
    bm.append_slots(1, 9)
    bm.commit_computed(1, list(range(9)), 9)
    bm.allocate_prefix(2, [50, 51, 52, 53, 54])
    bm.append_slots(2, 5)
    bm.commit_computed(2, [50, 51, 52, 53, 54], 5)
    bm.free(1)  # its two full blocks stay cached, evictable
    assert bm.evict_cached() == 2
    bm.check_integrity()
    # Seq 2's full block is in use: still cached. Seq 1's prompt is not any more.
    assert bm.allocate_prefix(3, list(range(9))) == 0
    assert bm.allocate_prefix(4, [50, 51, 52, 53, 54, 55]) == 4
    for s in (2, 3, 4):
        bm.free(s)
    bm.check_integrity()
    assert bm.num_free_blocks == 8
