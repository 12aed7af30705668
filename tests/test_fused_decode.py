"""The fused decode step (models/fused.py, csrc/fused_decode.cpp): the same tokens and, within
a stated tolerance, the same log-probabilities as the eager forward on the same quantized
weights; steps it cannot take run eager; a failed build falls back to eager."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tests.conftest import make_tiny_model, tiny_llm
from ttscale.models import fused
from ttscale.sampling.params import SamplingParams

# Both paths run the same int4 kernels on the same bf16 matmul inputs and round where the
# other rounds; they differ in the order of fp32 sums (RMSNorm's, attention's dot products
# and softmax). Most steps come out bit-identical; where a sum's last bit flips the bf16
# rounding of a matmul input, the tiny model's wide (std 0.3) weights move a logprob by up
# to ~0.02 (measured max 0.019 over these prompts, fp32 activations).
LOGPROB_TOLERANCE = {torch.float32: 5e-2, torch.bfloat16: 0.15}

_PROMPTS = [list(range(10, 80)), [5, 6, 7, 8, 9, 10, 11, 12] * 9]

pytestmark = pytest.mark.skipif(
    fused.load_extension() is None, reason="the C++ extension does not build here"
)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    """Bias on q/k/v (the one bias the fused step takes)."""
    path = tmp_path_factory.mktemp("qwen2")
    make_tiny_model(path, "qwen2")
    return path


def _outputs(llm, params: SamplingParams, prompts=_PROMPTS):
    return [c for o in llm.generate(prompts, params, use_tqdm=False) for c in o.outputs]


def _common_prefix(a: list[int], b: list[int]) -> int:
    pairs = enumerate(zip(a, b, strict=False))
    return next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))


def _compare(path: Path, dtype: str = "float32", quantize: str = "int4", **options) -> None:
    ours = tiny_llm(path, quantize=quantize, dtype=dtype, **options)
    ref = tiny_llm(path, quantize=quantize, dtype=dtype, fused=False, **options)
    assert ours.engine.executor.fused is not None, ours.engine.executor.fused_off
    assert ref.engine.executor.fused is None
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
    a, b = _outputs(ours, params), _outputs(ref, params)
    # fp32: the same greedy tokens. bf16: each side rounds intermediates its own way (torch's
    # flash kernel rounds the softmax weights to bf16 before the PV product; the fused loop
    # keeps them fp32), so a near-tie of the tiny model may go either way: the same tokens
    # up to one (measured: the first 7 or more of 24), and close logprobs until then.
    same = [_common_prefix(x.token_ids, y.token_ids) for x, y in zip(a, b, strict=True)]
    if dtype == "float32":
        assert [c.token_ids for c in a] == [c.token_ids for c in b]
    else:
        assert min(same) >= 4, same
    diff = max(
        abs(x - y)
        for ca, cb, n in zip(a, b, same, strict=True)
        for x, y in zip(ca.logprobs[:n], cb.logprobs[:n], strict=True)
    )
    assert diff < LOGPROB_TOLERANCE[ours.engine.model.norm.weight.dtype]
    # n = 5 forks of each prompt: 10-row steps (over GEMV_ROWS: the matmuls' oneDNN copies)
    # over shared prefix blocks, copy-on-write. Greedy: a seeded sample at T > 0 may flip
    # where the two differ by a rounding.
    params = SamplingParams(n=5, temperature=0, max_tokens=12, ignore_eos=True)
    x, y = _outputs(ours, params), _outputs(ref, params)
    same = [_common_prefix(p.token_ids, q.token_ids) for p, q in zip(x, y, strict=True)]
    assert min(same) == 12 if dtype == "float32" else min(same) >= 4, same
    ours.engine.check_integrity()


def test_fused_matches_eager(model_dir: Path) -> None:
    _compare(model_dir)


def test_fused_matches_eager_bf16_pool(model_dir: Path) -> None:
    _compare(model_dir, kv_cache_dtype="bf16")


def test_fused_matches_eager_int8_pool(model_dir: Path) -> None:
    _compare(model_dir, kv_cache_dtype="int8")


def test_fused_matches_eager_block_topk(model_dir: Path) -> None:
    """Block top-k with a budget well below the prompts (70-72 tokens): decode rows read
    the sink, an 8-token window, the current block and 4 chosen blocks of 4 tokens."""
    _compare(model_dir, sparse_attention="block_topk", kv_budget=32, sparse_window=8)


def test_fused_matches_eager_block_topk_int8(model_dir: Path) -> None:
    _compare(
        model_dir,
        kv_cache_dtype="int8",
        sparse_attention="block_topk",
        kv_budget=32,
        sparse_window=8,
    )


def test_fused_matches_eager_bf16_activations(model_dir: Path) -> None:
    _compare(model_dir, dtype="bfloat16")


def test_fused_matches_eager_bf16_model(model_dir: Path) -> None:
    """A float model in bf16: its oneDNN-packed weights run fused too."""
    _compare(model_dir, dtype="bfloat16", quantize="none")


def test_fused_matches_eager_with_qkv_bias(qwen2_dir: Path) -> None:
    _compare(qwen2_dir)


class _Oracle:
    """Drafts the next tokens of a known continuation: accepted, so chunks of several
    tokens of one sequence are verified in one step."""

    def __init__(self, text: list[int]) -> None:
        self.text = text

    def propose(self, seq_id: int, token_ids) -> list[int]:
        n = len(token_ids)
        return self.text[n : n + 3] if self.text[:n] == list(token_ids) else []


def test_fused_verification_chunks(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Speculative steps verify several tokens of one sequence (causal within the chunk):
    greedy output is the non-speculative one, and the chunks ran fused."""
    prompt = list(range(10, 80))
    ref = tiny_llm(model_dir, quantize="int4", fused=False)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    expected = _outputs(ref, params, [prompt])[0]
    ours = tiny_llm(model_dir, quantize="int4", proposer=_Oracle(prompt + expected.token_ids))
    chunks: list[int] = []
    call = fused.FusedDecode.__call__

    def counted(self, ids, positions, meta):
        chunks.extend(meta.query_lens)
        return call(self, ids, positions, meta)

    monkeypatch.setattr(fused.FusedDecode, "__call__", counted)
    got = _outputs(ours, params, [prompt])[0]
    assert got.token_ids == expected.token_ids
    assert max(abs(a - b) for a, b in zip(got.logprobs, expected.logprobs, strict=True)) < 5e-2
    assert max(chunks) == 4  # one sampled token and three drafts per verifying step


def test_steps_it_cannot_take_run_eager(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp32 weights or a kivi pool: no fused step (said why). Quantized weights: prefill (over
    MAX_ROWS tokens) runs eager, decode runs fused."""
    plain = tiny_llm(model_dir)
    assert plain.engine.executor.fused is None
    assert "fp32 matmul weights" in plain.engine.executor.fused_off
    make_tiny_model(tmp_path, num_attention_heads=2, num_key_value_heads=1)  # head_dim 32
    kivi = tiny_llm(tmp_path, quantize="int4", kv_cache_dtype="kivi4")
    assert kivi.engine.executor.fused is None
    assert "KiviKVCache" in kivi.engine.executor.fused_off
    llm = tiny_llm(model_dir, quantize="int4")
    calls: list[int] = []
    call = fused.FusedDecode.__call__

    def counted(self, ids, positions, meta):
        calls.append(ids.shape[0])
        return call(self, ids, positions, meta)

    monkeypatch.setattr(fused.FusedDecode, "__call__", counted)
    _outputs(llm, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert calls == [2, 2, 2, 2]  # the 4 decode steps of both prompts; never the prefill


def test_build_failure_falls_back_to_eager(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import torch.utils.cpp_extension as cpp

    def broken(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp, "load", broken)
    monkeypatch.setattr(fused, "load_extension", fused.load_extension.__wrapped__)
    with caplog.at_level(logging.WARNING, logger="ttscale.models.fused"):
        llm = tiny_llm(model_dir, quantize="int4")
    assert llm.engine.executor.fused is None
    assert "did not build" in llm.engine.executor.fused_off
    assert [r.getMessage() for r in caplog.records] == [
        "fused decode step unavailable (RuntimeError: Ninja is required to load C++ "
        "extensions); running eager"
    ]
    out = _outputs(llm, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert all(len(c.token_ids) == 4 for c in out)


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_matches_softmax(pool_dtype: torch.dtype) -> None:
    """The fused step's attention alone against softmax(q k^T) v in float64: partial and
    whole blocks, one key, contexts longer than a block, rows sharing blocks, 3 query heads
    per KV head. Its online softmax and polynomial exp agree to float rounding (measured
    max 7e-7)."""
    ext = fused.load_extension()
    gen = torch.Generator().manual_seed(0)
    bs, kvh, d, h, blocks = 16, 3, 64, 9, 80
    k = torch.randn(blocks * bs, kvh, d, generator=gen).to(pool_dtype)
    v = torch.randn(blocks * bs, kvh, d, generator=gen).to(pool_dtype)
    ctx = torch.tensor([1, 15, 16, 17, 700])
    tables = torch.randperm(blocks, generator=gen)[:48].repeat(len(ctx), 1)
    q = 2 * torch.randn(len(ctx), h, d, generator=gen)
    out = ext.paged_attention(q, k, v, tables, ctx, bs, d**-0.5)
    for t, n in enumerate(ctx.tolist()):
        pos = torch.arange(n)
        slots = tables[t][pos // bs] * bs + pos % bs
        keys, values = k[slots].double(), v[slots].double()  # (n, kvh, d)
        for head in range(h):
            kv = head // (h // kvh)
            p = torch.softmax(q[t, head].double() @ keys[:, kv].T * d**-0.5, -1)
            torch.testing.assert_close(out[t, head].double(), p @ values[:, kv], atol=5e-6, rtol=0)


def test_fused_step_reports_distinct_kv_reads(model_dir: Path) -> None:
    """The cost model gets what came from memory: a block three forks share is read once
    (the rows of a KV head run back to back), each row's partial last block is its own."""
    llm = tiny_llm(model_dir, quantize="int4")
    engine = llm.engine
    engine.add_request("r", list(range(10, 80)), SamplingParams(n=3, max_tokens=3, seed=0))
    shapes = []
    while engine.has_unfinished:
        engine.step()
        shapes.append(engine.last_step)
    decode = [s for s in shapes if s.query_lens == (1, 1, 1)]
    first = decode[0]  # contexts 71: 17 full prompt blocks of 4 shared, 3 tokens each after
    assert first.context_lens == (71, 71, 71)
    assert first.kv_tokens_shared == 17 * 4
    assert first.kv_tokens_read == 17 * 4 + 3 * 3
