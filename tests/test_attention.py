"""Fast paged attention (batched decode + shared-prefix cascade) against the eager reference,
with the fused CPU flash kernel and with the batched-matmul path (used off CPU).

Tolerance: 1e-5 max abs on unit-scale random data (fp32; only summation order differs).
"""

from __future__ import annotations

import pytest
import torch

from ttscale.attention.metadata import AttentionMetadata
from ttscale.attention.paged import PagedAttention
from ttscale.attention.reference import ReferencePagedAttention
from ttscale.attention.spec import AttentionLayerSpec
from ttscale.kvcache import KVCache

BS, KVH, H, D = 4, 2, 6, 8


@pytest.fixture(params=[True, False], ids=["fused", "matmul"], autouse=True)
def decode_path(request, monkeypatch):
    """Every test runs on both decode paths of PagedAttention."""
    init = PagedAttention.__init__

    def init_with_path(self, *args, **kwargs):
        init(self, *args, **kwargs, fused=request.param)

    monkeypatch.setattr(PagedAttention, "__init__", init_with_path)
    return request.param


def run_both(tables, context_lens, query_lens, window=None, seed=0, soft_cap=None):
    torch.manual_seed(seed)
    cache = KVCache(1, 64, BS, KVH, D)
    cache.k.normal_()
    cache.v.normal_()
    T = sum(query_lens)
    slots = []
    for table, ctx, q in zip(tables, context_lens, query_lens, strict=True):
        slots += [table[p // BS] * BS + p % BS for p in range(ctx - q, ctx)]
    meta = AttentionMetadata(torch.tensor(slots), query_lens, context_lens, tables, BS)
    q, k, v = torch.randn(T, H, D), torch.randn(T, KVH, D), torch.randn(T, KVH, D)
    outs = []
    for cls in (ReferencePagedAttention, PagedAttention):
        c = KVCache(1, 64, BS, KVH, D)
        c.k.copy_(cache.k)
        c.v.copy_(cache.v)
        spec = AttentionLayerSpec(0, D**-0.5, sliding_window=window, soft_cap=soft_cap)
        attn = cls(c, meta, [spec])
        outs.append(attn(spec, q, k, v))
    return outs, attn


def test_forked_group_with_shared_prefix(decode_path):
    # Four samples share blocks 0-2 (12 tokens) and own one or two private blocks each.
    tables = [[0, 1, 2, 10], [0, 1, 2, 11], [0, 1, 2, 12, 13], [0, 1, 2, 14]]
    (ref, fast), attn = run_both(tables, [14, 15, 18, 13], [1, 1, 1, 1])
    assert attn.fused == decode_path and len(attn.layouts[None, False][1].groups) == 1
    assert (ref - fast).abs().max() < 1e-5


def test_mixed_step_groups_singles_and_prefill():
    tables = [
        [0, 1, 2, 10],  # group A
        [0, 1, 2, 11],  # group A
        [0, 1, 20],  # group A, but shares only 2 blocks: the group prefix shrinks to 2
        [3, 4, 5, 21],  # group B
        [3, 4, 5, 22],  # group B
        [30, 31],  # alone
        [40, 41, 42],  # prefill chunk of 5 tokens at positions 4..8
    ]
    ctx = [15, 14, 10, 13, 16, 6, 9]
    qlen = [1, 1, 1, 1, 1, 1, 5]
    (ref, fast), attn = run_both(tables, ctx, qlen)
    assert (ref - fast).abs().max() < 1e-5
    assert len(attn.layouts[None, False][1].groups) == 2
    # KV read: group A prefix 8 once, B 12 once, suffixes, the single, the chunk's context.
    assert attn.kv_tokens_read == 8 + (7 + 6 + 2) + 12 + (1 + 4) + 6 + 9


def test_partial_shared_block_is_not_treated_as_prefix():
    # Samples right after a fork: the partial block 3 is still shared before copy-on-write
    # would split it; the current tokens sit in private blocks.
    tables = [[0, 1, 2, 7], [0, 1, 2, 8]]
    ref, fast = run_both(tables, [13, 13], [1, 1])[0]
    assert (ref - fast).abs().max() < 1e-5


@pytest.mark.parametrize("window", [3, 6])
def test_sliding_window(window):
    tables = [[0, 1, 2, 10], [0, 1, 2, 11], [5, 6, 7]]
    ref, fast = run_both(tables, [15, 14, 12], [1, 1, 4], window=window)[0]
    assert (ref - fast).abs().max() < 1e-5


def test_window_covering_the_prefix_keeps_sharing_it():
    """Under a sliding window, rows whose window covers their whole context still read the
    group's shared prefix once; a row the window has moved past reads privately."""
    tables = [[0, 1, 2, 10], [0, 1, 2, 11], [0, 1, 2, 12, 13]]
    (ref, fast), attn = run_both(tables, [14, 15, 18], [1, 1, 1], window=16)
    assert (ref - fast).abs().max() < 1e-5
    ((rows, _),) = attn.layouts[16, False][1].groups
    assert rows.tolist() == [0, 1]  # the 18-token row is past the window: private
    assert attn.kv_tokens_shared == 12


def test_soft_capped_layers_match_the_reference():
    tables = [[0, 1, 2, 10], [0, 1, 2, 11], [5, 6, 7]]
    ref, fast = run_both(tables, [15, 14, 12], [1, 1, 4], soft_cap=0.5)[0]
    assert (ref - fast).abs().max() < 1e-5


def test_layers_with_different_windows_in_one_step():
    """Local and global layers (Gemma-3 style) in one step: one decode layout per window."""
    torch.manual_seed(3)
    tables, ctx = [[0, 1, 2, 10], [0, 1, 2, 11]], [14, 15]
    slots = torch.tensor(
        [t[(n - 1) // BS] * BS + (n - 1) % BS for t, n in zip(tables, ctx, strict=True)]
    )
    meta = AttentionMetadata(slots, [1, 1], ctx, tables, BS)
    specs = [AttentionLayerSpec(0, D**-0.5, sliding_window=4), AttentionLayerSpec(1, D**-0.5)]
    caches = [KVCache(2, 64, BS, KVH, D) for _ in range(2)]
    caches[0].k.normal_(), caches[0].v.normal_()
    caches[1].k.copy_(caches[0].k), caches[1].v.copy_(caches[0].v)
    ref_ctx = ReferencePagedAttention(caches[0], meta, specs)
    fast_ctx = PagedAttention(caches[1], meta, specs)
    assert set(fast_ctx.layouts) == {(4, False), (None, False)}
    for spec in specs:
        q, k, v = torch.randn(2, H, D), torch.randn(2, KVH, D), torch.randn(2, KVH, D)
        assert (ref_ctx(spec, q, k, v) - fast_ctx(spec, q, k, v)).abs().max() < 1e-5


def test_padding_never_reads_uninitialized_slots():
    """The pool is allocated uninitialized: padding must only touch the zeroed null block."""
    torch.manual_seed(5)
    tables, ctx = [[0, 1, 2, 10], [0, 1, 2, 11], [20]], [14, 15, 3]
    caches = []
    for _ in range(2):
        c = KVCache(1, 64, BS, KVH, D)
        c.k[:, : c.null_slot] = float("nan")  # garbage everywhere but the null block
        c.v[:, : c.null_slot] = float("nan")
        caches.append(c)
    for table, n in zip(tables, ctx, strict=True):  # real data in the slots in use
        slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(n)])
        k, v = torch.randn(n, KVH, D), torch.randn(n, KVH, D)
        for c in caches:
            c.k[0, slots], c.v[0, slots] = k, v
    last = [(t, n - 1) for t, n in zip(tables, ctx, strict=True)]
    new_slots = torch.tensor([t[p // BS] * BS + p % BS for t, p in last])
    meta = AttentionMetadata(new_slots, [1, 1, 1], ctx, tables, BS)
    q, k, v = torch.randn(3, H, D), torch.randn(3, KVH, D), torch.randn(3, KVH, D)
    spec = AttentionLayerSpec(0, D**-0.5)
    ref = ReferencePagedAttention(caches[0], meta, [spec])(spec, q, k, v)
    fast = PagedAttention(caches[1], meta, [spec])(spec, q, k, v)
    assert torch.isfinite(fast).all()
    assert (ref - fast).abs().max() < 1e-5


def test_long_contexts_take_the_flash_path(decode_path, monkeypatch):
    """Passes over >= FLASH_MIN_KEYS keys: the fused path runs the flash kernel for both the
    shared prefix and the private suffixes (and still matches the reference); the matmul path
    never calls it."""
    from ttscale.attention import paged

    calls = []
    real = paged._CPU_FLASH

    def counting(*args, **kwargs):
        calls.append(args[1].shape[-2])  # keys in the pass
        return real(*args, **kwargs)

    monkeypatch.setattr(paged, "_CPU_FLASH", counting)
    shared = list(range(13))  # 52 shared keys
    tables = [[*shared, 20, 21], [*shared, 22, 23], [*shared, 24, 25], list(range(30, 46))]
    (ref, fast), attn = run_both(tables, [57, 58, 56, 60], [1, 1, 1, 1])
    assert (ref - fast).abs().max() < 1e-5
    assert len(attn.layouts[None, False][1].groups) == 1
    if decode_path:
        assert (
            attn.layouts[None, False][1].suffix_width >= PagedAttention.FLASH_MIN_KEYS
        )  # the single's 60 keys
        assert sorted(calls) == [52, 60]  # the group's prefix, then the padded suffixes
    else:
        assert calls == []
