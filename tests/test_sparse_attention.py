"""Block top-k sparse decode attention (attention/sparse.py): the fast path against the
masked-dense reference (same selection), what is always read, the engine options per engine
and per request, and the refusals.

Tolerance: fast vs reference 1e-5 max abs (fp32, unit-scale data: both attend over the same
chosen keys, only summation order differs; the issue asks 1e-4).
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_llm
from ttscale.attention.metadata import AttentionMetadata
from ttscale.attention.paged import PagedAttention
from ttscale.attention.reference import ReferencePagedAttention
from ttscale.attention.sparse import BlockTopK, select_blocks, sparse_rows
from ttscale.attention.spec import AttentionLayerSpec
from ttscale.errors import SamplingParamsError
from ttscale.kvcache import CacheConfig, Int8KVCache, KVCache
from ttscale.sampling.params import SamplingParams

BS, KVH, H, D = 4, 2, 6, 8
WINDOW = 4  # one block


def _step(cache_cls, tables, ctx, qlens, budgets, fused=True, seed=0):
    """Runs layer 0 dense and layer 1 block top-k through both backends on equal pools."""
    torch.manual_seed(seed)
    k_all, v_all = torch.randn(2, 64 * BS, KVH, D), torch.randn(2, 64 * BS, KVH, D)
    slots = []
    for table, c, q in zip(tables, ctx, qlens, strict=True):
        slots += [table[p // BS] * BS + p % BS for p in range(c - q, c)]
    meta = AttentionMetadata(torch.tensor(slots), qlens, ctx, tables, BS, kv_budgets=budgets)
    T = sum(qlens)
    specs = [
        AttentionLayerSpec(0, D**-0.5),
        AttentionLayerSpec(1, D**-0.5, sparsity=BlockTopK(WINDOW)),
    ]
    inputs = [(torch.randn(T, H, D), torch.randn(T, KVH, D), torch.randn(T, KVH, D)) for _ in specs]
    outs, backends = [], []
    for cls in (ReferencePagedAttention, PagedAttention):
        cache = cache_cls(2, 64, BS, KVH, D, track_block_keys=True)
        every = torch.arange(64 * BS)
        for layer in range(2):
            cache.store(layer, every, k_all[layer], v_all[layer])
        kwargs = {"fused": fused} if cls is PagedAttention else {}
        attn = cls(cache, meta, specs, **kwargs)
        outs.append([attn(spec, *x) for spec, x in zip(specs, inputs, strict=True)])
        backends.append(attn)
    return outs, backends


@pytest.mark.parametrize("cache_cls", [KVCache, Int8KVCache], ids=["fp32", "int8"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "matmul"])
def test_fast_block_topk_matches_masked_reference(cache_cls, fused):
    tables = [
        [0, 1, 2, 3, 4, 5, 6, 10],  # forks of one prefix: sparse, budgets 12 and 16
        [0, 1, 2, 3, 4, 5, 6, 11, 12],
        [0, 1, 2, 3, 4, 5, 6, 13],  # same prefix, dense (no budget)
        [20, 21, 22],  # context 9 <= budget 12: dense
        [30, 31, 32, 33, 34, 35, 36, 37, 38, 39],  # long single, budget 16
        [40, 41, 42],  # prefill chunk: always dense
    ]
    ctx = [30, 35, 29, 9, 38, 10]
    qlens = [1, 1, 1, 1, 1, 4]
    budgets = [12, 16, None, 12, 16, 12]
    (ref, fast), (_, attn) = _step(cache_cls, tables, ctx, qlens, budgets, fused)
    assert attn.sparse is not None and attn.sparse.rows == [0, 1, 4]
    for r, f in zip(ref, fast, strict=True):
        assert torch.isfinite(f).all()
        assert (r - f).abs().max() < 1e-5
    # Reads: layer 0 dense; layer 1 reads 12 + 16 + 16 tokens (whole blocks, less the
    # current block's unwritten tail) for the sparse rows instead of 30 + 35 + 38.
    dense = attn.layouts[None, False][1].kv_tokens_read
    sparse_layer = attn.layouts[None, True][1].kv_tokens_read
    assert attn.sparse.tokens_read == (12 - 2) + (16 - 1) + (16 - 2)
    assert attn.kv_tokens_read == 10 + round((dense + sparse_layer + 39) / 2)


def test_sink_window_and_current_block_are_always_read():
    # 10 blocks of context 38 (current block holds 2 tokens); budget 5 blocks: block 0,
    # the window block 8, current block 9, and the two best of blocks 1..7.
    key_means = torch.zeros(64, KVH, D)
    key_means[3] = 10.0  # block 3 aligned with the query: must win
    key_means[5, :, 0] = 5.0
    rows = sparse_rows([0], [list(range(10))], [38], [20], BS, WINDOW, 63, torch.device("cpu"))
    q = torch.ones(1, H, D)
    idx, chosen = select_blocks(q, key_means, rows)
    for head in range(KVH):
        picked = set(idx[0, head][chosen[0, head]].tolist())
        assert picked == {0, 8, 9, 3, 5}
    assert rows.tokens_read == 20 - 2


def test_budget_below_sink_window_and_current_block_is_refused():
    with pytest.raises(ValueError, match=r"kv_budget=32 is smaller .* = 96"):
        CacheConfig(sparse_attention="block_topk", kv_budget=32)
    with pytest.raises(ValueError, match="sparse_attention must be one of dense, block_topk"):
        CacheConfig(sparse_attention="quest")
    with pytest.raises(SamplingParamsError, match="sparse_attention"):
        SamplingParams(sparse_attention="topk")
    with pytest.raises(SamplingParamsError, match="kv_budget"):
        SamplingParams(kv_budget=0)


PROMPT = list(range(5, 40))


def _greedy(llm, max_tokens=48, n=1, **params):
    sp = SamplingParams(n=n, temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **params)
    out = llm.generate([PROMPT], sp, use_tqdm=False)[0]
    llm.engine.check_integrity()
    return [o.token_ids for o in out.outputs]


def test_budget_at_least_context_is_exactly_dense(model_dir):
    dense = tiny_llm(model_dir)
    sparse = tiny_llm(model_dir, sparse_attention="block_topk", kv_budget=96)
    assert _greedy(sparse, 48) == _greedy(dense, 48)  # context <= 83 < 96: never sparse


def test_engine_block_topk_forks_per_request_and_refusals(model_dir):
    """Small budget on the tiny model: n=3 forks run sparse (fewer KV reads than dense),
    the reference backend chooses the same tokens, a request may go dense, and settings the
    engine cannot run are refused at add_request."""
    opts = dict(sparse_attention="block_topk", kv_budget=24, sparse_window=8)
    fast = tiny_llm(model_dir, **opts)
    ref = tiny_llm(model_dir, attention="reference", **opts)
    dense = tiny_llm(model_dir)
    tokens = _greedy(fast, 40, n=3)
    assert tokens == _greedy(ref, 40, n=3)
    _greedy(dense, 40, n=3)
    sparse_step, dense_step = fast.engine.last_step, dense.engine.last_step
    assert sparse_step is not None and dense_step is not None
    assert sparse_step.context_lens == dense_step.context_lens == (74, 74, 74)
    assert sparse_step.kv_tokens_read < dense_step.kv_tokens_read
    assert sparse_step.kv_blocks_scored > 0
    assert _greedy(fast, 40, sparse_attention="dense") == _greedy(dense, 40)
    # A larger per-request budget than the context: dense tokens again.
    assert _greedy(fast, 40, kv_budget=128) == _greedy(dense, 40)
    with pytest.raises(ValueError, match="kv_budget=8 is smaller"):
        fast.generate([PROMPT], SamplingParams(kv_budget=8), use_tqdm=False)
    with pytest.raises(ValueError, match="needs an engine started with"):
        dense.generate([PROMPT], SamplingParams(sparse_attention="block_topk"), use_tqdm=False)


def test_server_requests_choose_attention_or_get_a_400(model_dir):
    """The OpenAI-compatible body's `sparse_attention` / `kv_budget` extras reach the
    request's SamplingParams; settings the engine cannot run are a 400 naming the field."""
    pytest.importorskip("fastapi")
    from ttscale.server.admission import Pool
    from ttscale.server.config import ServerConfig
    from ttscale.server.errors import APIError
    from ttscale.server.protocol import CompletionRequest
    from ttscale.server.validation import completion_job

    llm = tiny_llm(model_dir, sparse_attention="block_topk", kv_budget=24, sparse_window=8)
    stats = llm.engine.kv_stats()
    pool = Pool(stats["num_blocks"], stats["block_size"])

    def job(**extra):
        body = CompletionRequest(prompt=PROMPT, max_tokens=4, **extra)
        return completion_job(body, llm, ServerConfig(), pool)

    assert job(sparse_attention="dense").params.sparse_attention == "dense"
    assert job(kv_budget=64).params.kv_budget == 64
    for extra, param in (
        ({"sparse_attention": "quest"}, "sparse_attention"),
        ({"kv_budget": 8}, "kv_budget"),
    ):
        with pytest.raises(APIError) as e:
            job(**extra)
        assert e.value.status == 400 and e.value.param == param, e.value
