"""Which blocks the block manager hands out, seen as resident memory (docs/PERF_RSS.md).

The KV pool is allocated uninitialized: a block costs resident pages from its first write on.
Freed blocks are reused before never-used ones, so the pool's touched blocks
(`stats()["touched"]`) grow only with the peak of blocks in use plus cached ones; with
`evict_before_growing` a cached block is evicted before a never-used block is taken, and the
touched blocks stay at the peak in use.
"""

from __future__ import annotations

import pytest

from tests.conftest import assert_pool_full, make_tiny_model, tiny_llm
from ttscale import SamplingParams
from ttscale.engine.block_manager import BlockManager


def run(bm: BlockManager, seq_id: int, prompt: list[int], new_tokens: int = 0) -> list[int]:
    """Prefill `prompt` (reusing the cache), then decode `new_tokens` one at a time."""
    cached = bm.allocate_prefix(seq_id, prompt)
    bm.append_slots(seq_id, len(prompt) - cached)
    tokens = list(prompt)
    bm.commit_computed(seq_id, tokens, len(tokens))
    for i in range(new_tokens):
        bm.append_slots(seq_id, 1)
        tokens.append(1000 + seq_id * 100 + i)
        bm.commit_computed(seq_id, tokens, len(tokens))
    return bm.block_table(seq_id)


def test_freed_blocks_are_reused_before_untouched_ones() -> None:
    bm = BlockManager(64, block_size=4, enable_prefix_caching=False)
    first = run(bm, 1, list(range(10)), new_tokens=5)  # 15 tokens: 4 blocks
    assert first == [0, 1, 2, 3]
    bm.free(1)
    # The next sequence gets the same blocks back (in table order), not blocks 4..7.
    assert run(bm, 2, list(range(50, 60)), new_tokens=5) == first
    bm.free(2)
    # A hundred sequences of varying length, at most three alive at once: the touched blocks
    # never exceed the peak in use.
    alive: list[int] = []
    for s in range(3, 103):
        run(bm, s, list(range(s, s + 3 + s % 7)), new_tokens=s % 5)
        alive.append(s)
        if len(alive) == 3:
            bm.free(alive.pop(s % 3))
        bm.check_integrity()
    stats = bm.stats()
    assert stats["touched"] == stats["peak"] < 16


def test_touched_free_blocks_come_before_untouched_with_prefix_caching() -> None:
    bm = BlockManager(32, block_size=4)
    run(bm, 1, list(range(10)))  # blocks 0, 1 full (cached), 2 partial
    bm.free(1)  # 0, 1 evictable; 2 free (touched)
    assert bm.stats()["evictable"] == 2
    # Default: the touched free block first, then never-used ones; the cache is kept whole.
    assert run(bm, 2, list(range(100, 110))) == [2, 3, 4]
    assert bm.stats()["touched"] == 5
    assert bm.allocate_prefix(3, list(range(10))) == 8  # seq 1's prompt still hits
    assert bm.block_table(3) == [0, 1]
    for s in (2, 3):
        bm.free(s)
    bm.check_integrity()


def test_evict_before_growing_evicts_before_touching_new_blocks() -> None:
    bm = BlockManager(32, block_size=4, evict_before_growing=True)
    run(bm, 1, list(range(10)))  # blocks 0, 1 full (cached), 2 partial
    bm.free(1)  # LRU: 1 then 0 (a chain is released from its tail); 2 free
    # The touched free block first, then the least recently freed cached block (the tail of
    # seq 1's chain, so its head stays a usable prefix), then the other one.
    assert run(bm, 2, list(range(100, 110))) == [2, 1, 0]
    assert bm.stats()["touched"] == 3
    assert bm.stats()["evictions"] == 2
    assert bm.allocate_prefix(3, list(range(10))) == 0  # seq 1's prompt was evicted
    bm.free(3)
    # With nothing evictable and no touched block free, the pool grows.
    assert run(bm, 4, list(range(200, 205))) == [3, 4]
    bm.check_integrity()
    # A cache hit still works while its blocks are not needed.
    bm.free(4)
    bm.free(2)  # 2, 1 cached (its full blocks), 0 free (partial tail)
    assert bm.allocate_prefix(5, list(range(100, 110))) == 8
    assert bm.block_table(5) == [2, 1]
    bm.free(5)
    bm.check_integrity()


def test_evict_before_growing_keeps_the_randomized_invariants(monkeypatch) -> None:
    """The block manager's randomized stress test (simulated KV contents: a wrong share, copy
    or cache hit shows up as wrong KV), with `evict_before_growing`."""
    from tests import test_block_manager

    made: list[BlockManager] = []

    def make(*args, **kwargs) -> BlockManager:
        made.append(BlockManager(*args, **kwargs, evict_before_growing=True))
        return made[-1]

    monkeypatch.setattr(test_block_manager, "BlockManager", make)
    test_block_manager.test_randomized_stress()
    assert made and made[0].stats()["touched"] == made[0].stats()["peak"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_model(path, "llama")
    return path


def test_engine_touches_the_working_set(model_dir) -> None:
    """Distinct prompts, sampled in parallel one request after another, as bench_engine.py
    does: by default every finished sample's full blocks stay cached and the pool grows by
    them; with `evict_before_growing` it stays at the peak in use, and the outputs are the same."""
    params = SamplingParams(n=4, temperature=0.8, seed=0, max_tokens=12, ignore_eos=True)
    outputs, stats = {}, {}
    for evict_before_growing in (False, True):
        llm = tiny_llm(model_dir)
        bm = llm.engine.block_manager
        bm.evict_before_growing = evict_before_growing
        outs = []
        for i in range(6):
            prompt = [5 + i, 17, 42, 99, 7, 250, 31, 8 + i]
            out = llm.generate([prompt], params, use_tqdm=False)[0]
            outs.append([list(o.token_ids) for o in out.outputs])
        assert_pool_full(llm)
        outputs[evict_before_growing], stats[evict_before_growing] = outs, bm.stats()
    assert outputs[True] == outputs[False]
    assert stats[True]["peak"] == stats[False]["peak"]
    assert stats[True]["touched"] == stats[True]["peak"]
    # By default earlier requests' cached blocks are kept: the pool grows by them.
    assert stats[False]["touched"] > stats[False]["peak"]
    assert stats[False]["evictions"] == 0 < stats[True]["evictions"]
