"""Quantized KV pools (kvcache/quant.py): int8 rows, their bytes, copy-on-write of scales, the
fast path's per-tile dequantization against the eager reference, and the engine end to end.

Tolerances: fast vs reference over the same int8 pool 1e-5 (fp32, both read the same
dequantized rows, only summation order differs); int8 round trip max |x - x'| <= scale / 2.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_llm
from ttscale.attention.metadata import AttentionMetadata
from ttscale.attention.paged import PagedAttention
from ttscale.attention.reference import ReferencePagedAttention
from ttscale.attention.spec import AttentionLayerSpec
from ttscale.kvcache import CacheConfig, Int8KVCache, KVCache, make_kv_cache
from ttscale.kvcache.quant import Kivi2KVCache, KiviKVCache, kv_bytes_per_value, quantize_int8
from ttscale.sampling.params import SamplingParams

BS, KVH, H, D = 4, 2, 6, 32  # head_dim 32: one KIVI value group


def test_int8_round_trip_within_half_a_step():
    x = torch.randn(50, KVH, D) * torch.rand(50, KVH, 1) * 10
    cache = Int8KVCache(1, 16, BS, KVH, D)
    slots = torch.arange(50)
    cache.store(0, slots, x, -x)
    k, v = cache.gather(0, slots)
    _, scale = quantize_int8(x)
    assert ((k - x).abs() <= scale[..., None] / 2 + 1e-6).all()
    assert torch.equal(v, -k)
    assert k.dtype == torch.float32
    assert cache.keys(0, slots, torch.bfloat16).dtype == torch.bfloat16


def test_kivi_round_trip_residual_and_bytes():
    """Keys within half a step of their block's per-channel scale, values of their group's;
    the block still being written reads back exactly (full-precision residual)."""
    x = torch.randn(2, 10, KVH, D) * torch.linspace(0.1, 4, D)  # channels of unequal range
    for cls, bits in ((KiviKVCache, 4), (Kivi2KVCache, 2)):
        cache = cls(2, 16, BS, KVH, D)
        slots = torch.arange(10)
        for layer in range(2):  # layers store in order; the last one unstages full blocks
            cache.store(layer, slots, x[layer], 2 * x[layer])
        assert cache.staged_blocks == 1  # block 2: slots 8, 9
        k, v = cache.gather(1, slots)
        blocks = x[1, :8].view(2, BS, KVH, D)
        step = (blocks.amax(1) - blocks.amin(1)) / (2**bits - 1)  # (2, KVH, D)
        err = (k[:8] - x[1, :8]).abs().view(2, BS, KVH, D)
        assert (err <= step[:, None] / 2 + 2e-2 * step[:, None] + 1e-3).all()
        assert torch.equal(k[8:], x[1, 8:]) and torch.equal(v[8:], 2 * x[1, 8:])
        groups = (2 * x[1, :8]).view(8, KVH, D // 32, 32)
        vstep = (groups.amax(-1) - groups.amin(-1)) / (2**bits - 1)
        verr = (v[:8] - 2 * x[1, :8]).abs().view(8, KVH, D // 32, 32)
        assert (verr <= vstep[..., None] / 2 + 2e-2 * vstep[..., None] + 1e-3).all()
    # head_dim 64 (SmolLM2), bf16 = 256 B per token and head: kivi4 64 + 8 + 256 / block.
    for fmt, block, ratio in (("kivi4", 16, 88), ("kivi4", 32, 80), ("kivi2", 32, 48)):
        per_value = kv_bytes_per_value(fmt, 64, torch.bfloat16, block)
        assert per_value * 2 * 64 == pytest.approx(ratio)
    assert 80 / 256 <= 0.33 and 48 / 256 <= 0.2  # the targets, at block_size 32


def test_kivi_copy_on_write_and_rewrite_keep_the_residual():
    cache = KiviKVCache(1, 8, BS, KVH, D)
    x = torch.randn(6, KVH, D)
    cache.store(0, torch.arange(6), x, x)  # block 0 full (quantized), block 1 holds 2
    cache.copy_blocks([(1, 5)])  # the fork's partial block: its residual comes along
    assert torch.equal(cache.gather(0, torch.tensor([20, 21]))[0], x[4:6])
    cache.store(0, torch.tensor([22]), x[:1], x[:1])  # each copy then goes its own way
    assert cache.stage_of[1] != cache.stage_of[5]
    # A rollback rewrites offset 2 of the quantized block 0: the rest keeps its values.
    before = cache.gather(0, torch.arange(4))[0]
    cache.store(0, torch.tensor([2]), x[5:6], x[5:6])
    after = cache.gather(0, torch.arange(4))[0]
    assert torch.equal(after[2], x[5]) and torch.equal(after[[0, 1, 3]], before[[0, 1, 3]])


def test_int8_bytes_per_token_and_pool_size():
    # head_dim 64 (SmolLM2): int8 + fp32 scales = (64 + 4) / 128 of bf16 = 0.53x.
    assert kv_bytes_per_value("int8", 64, torch.float32) / 2 <= 0.55
    assert kv_bytes_per_value("bfloat16", 64, torch.bfloat16) == 2
    dims = dict(num_layers=2, n_kv_heads=2, head_dim=64, dtype=torch.bfloat16)
    dims["device"] = torch.device("cpu")
    bf16 = make_kv_cache(CacheConfig(kv_cache_gb=0.01, kv_cache_dtype="bf16"), **dims)
    int8 = make_kv_cache(CacheConfig(kv_cache_gb=0.01, kv_cache_dtype="int8"), **dims)
    assert isinstance(int8, Int8KVCache) and not isinstance(bf16, Int8KVCache)
    assert int8.bytes_per_token / bf16.bytes_per_token == pytest.approx(68 / 128)
    assert int8.num_blocks == pytest.approx(bf16.num_blocks * 128 / 68, rel=0.01)


def test_unknown_kv_dtype_is_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of auto.*int8.*'int3'"):
        CacheConfig(kv_cache_dtype="int3")


def test_copy_on_write_keeps_scales_and_block_key_means():
    cache = Int8KVCache(1, 8, BS, KVH, D, track_block_keys=True)
    x = torch.randn(BS, KVH, D) * 5
    cache.store(0, torch.arange(BS), x, x)  # fills block 0: its mean key is set
    assert cache.key_means is not None
    mean = cache.keys(0, torch.arange(BS), torch.float32).mean(0)
    assert torch.allclose(cache.key_means[0, 0], mean)
    cache.copy_blocks([(0, 3)])
    dst = torch.arange(3 * BS, 4 * BS)
    assert torch.equal(cache.k_scale[0, dst], cache.k_scale[0, :BS])
    assert torch.equal(cache.gather(0, dst)[0], cache.gather(0, torch.arange(BS))[0])
    assert torch.equal(cache.key_means[0, 3], cache.key_means[0, 0])


def _run(cache_cls, tables, context_lens, query_lens, window=None, tile=None, monkeypatch=None):
    torch.manual_seed(0)
    src = KVCache(1, 64, BS, KVH, D)
    src.k.normal_()
    src.v.normal_()
    slots = []
    for table, ctx, q in zip(tables, context_lens, query_lens, strict=True):
        slots += [table[p // BS] * BS + p % BS for p in range(ctx - q, ctx)]
    meta = AttentionMetadata(torch.tensor(slots), query_lens, context_lens, tables, BS)
    T = sum(query_lens)
    q, k, v = torch.randn(T, H, D), torch.randn(T, KVH, D), torch.randn(T, KVH, D)
    if tile is not None:
        monkeypatch.setattr(PagedAttention, "QUANT_TILE", tile)
    outs = []
    for cls in (ReferencePagedAttention, PagedAttention):
        c = cache_cls(1, 64, BS, KVH, D)
        every = torch.arange(64 * BS)
        c.store(0, every, src.k[0, : 64 * BS], src.v[0, : 64 * BS])
        spec = AttentionLayerSpec(0, D**-0.5, sliding_window=window)
        outs.append(cls(c, meta, [spec])(spec, q, k, v))
    return outs


@pytest.mark.parametrize("cache_cls", [Int8KVCache, KiviKVCache], ids=["int8", "kivi4"])
@pytest.mark.parametrize("tile", [None, 4, 12], ids=["one-tile", "tile4", "tile12"])
@pytest.mark.parametrize("window", [None, 9])
def test_fast_path_over_quantized_kv_matches_reference(monkeypatch, cache_cls, tile, window):
    """Fork groups (cascade), singles and a prefill chunk; the suffix read in tiles of `tile`
    keys (rows shorter than a tile's start see no key in it: the merge must ignore that
    tile)."""
    tables = [[0, 1, 2, 10], [0, 1, 2, 11], [0, 1, 2, 12, 13], [30, 31], [40, 41, 42]]
    ref, fast = _run(
        cache_cls, tables, [14, 15, 18, 6, 9], [1, 1, 1, 1, 5], window, tile, monkeypatch
    )
    assert torch.isfinite(fast).all()
    assert (ref - fast).abs().max() < 1e-5


def test_engine_int8_kv_close_to_fp32_with_forks_and_prefix_cache(model_dir):
    """n=4 greedy samples fork off one prompt (shared blocks, copy-on-write of the partial
    block) and a second request hits the prefix cache: int8 KV logprobs stay close to the
    fp32 cache's and the bookkeeping stays intact."""
    params = SamplingParams(n=4, temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
    prompt = list(range(5, 40))
    outs = {}
    for fmt in ("auto", "int8"):
        llm = tiny_llm(model_dir, kv_cache_dtype=fmt)
        outs[fmt] = llm.generate([prompt, prompt[:-3]], params, use_tqdm=False)
        llm.engine.check_integrity()
        assert llm.engine.executor.kv_cache.quantized == (fmt == "int8")
    int8_llm = llm
    cache = int8_llm.engine.executor.kv_cache
    assert int8_llm.engine.kv_stats()["kv_bytes_per_token"] == cache.bytes_per_token == 160
    assert int8_llm.engine.cost_meter.kv_bytes_per_value == pytest.approx(
        (16 + 4) / 16
    )  # head_dim 16
    for a, b in zip(outs["auto"], outs["int8"], strict=True):
        ta = a.outputs[0].token_ids
        tb = b.outputs[0].token_ids
        # The first token reads only the prompt's quantized KV: same greedy choice.
        assert ta[0] == tb[0]
        for sample in b.outputs:  # greedy samples of one prompt stay identical under int8
            assert sample.token_ids == tb


def test_engine_kivi_with_forks_prefix_cache_and_sparse(tmp_path, model_dir):
    """kivi4 on a tiny model with head_dim 32: n=4 greedy forks share the prompt's blocks
    (residual copied on write), a second request reuses the cached prefix, block top-k reads
    the quantized blocks; the first token is among the fp32 cache's top 3 (this prompt's top
    two are 0.15 nats apart: 4-bit KV may swap them). head_dim 16 is refused when the engine
    starts."""
    from tests.conftest import make_tiny_model

    make_tiny_model(tmp_path, num_attention_heads=2, num_key_value_heads=1)
    params = SamplingParams(n=4, temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3)
    prompt = list(range(5, 40))
    ref = tiny_llm(tmp_path).generate([prompt], params, use_tqdm=False)[0].outputs[0]
    top3 = {t for t, _ in ref.top_logprobs[0]}
    for options in ({}, {"sparse_attention": "block_topk", "kv_budget": 24, "sparse_window": 8}):
        llm = tiny_llm(tmp_path, kv_cache_dtype="kivi4", **options)
        outs = llm.generate([prompt, prompt[:-3]], params, use_tqdm=False)
        llm.engine.check_integrity()
        assert outs[0].outputs[0].token_ids[0] in top3
        assert all(o.token_ids == outs[0].outputs[0].token_ids for o in outs[0].outputs)
    with pytest.raises(ValueError, match="KIVI needs head_dim divisible by 32"):
        tiny_llm(model_dir, kv_cache_dtype="kivi2")


def test_kivi_copy_on_write_after_its_stages_grew_in_a_step(tmp_path):
    """Regression (session 5, arithmetic eval with kivi4): staging buffers grown inside a
    forward are inference tensors; a later copy-on-write into them runs before the next
    forward and must not fail. Many concurrent forks of partial blocks grow the stages."""
    from tests.conftest import make_tiny_model

    make_tiny_model(tmp_path, num_attention_heads=2, num_key_value_heads=1)
    llm = tiny_llm(tmp_path, kv_cache_dtype="kivi4", kv_cache_gb=0.05)
    from ttscale.strategies.api import make_query, solve_many
    from ttscale.tts.hygiene import Hygiene

    params = SamplingParams(temperature=1.0, max_tokens=9, seed=0)
    for round_ in range(3):
        queries = [
            make_query(llm, f"{round_} + {i} =", params=params, hygiene=Hygiene(enabled=False))
            for i in range(8)
        ]
        results = solve_many(llm, queries, "majority@16", concurrency=8)
        assert len(results) == 8
    llm.engine.check_integrity()
