"""Loading in bounded memory (docs/PERF_RSS.md): conversions in slices give the same numbers as
whole-tensor ones, a quantized embedding looks up exactly what the dequantized table holds,
a streamed build packs the same weights, the GGUF mapping is let go, and the embedded model
loads within a resident-memory budget."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

import ttscale.loader.checkpoint as checkpoint_module
import ttscale.models.quant as quant_module
from tests.test_quant import _random_blocks, _write_model
from ttscale.errors import ModelLoadError
from ttscale.loader import gguf as gguf_module
from ttscale.loader.default_model import default_model_path
from ttscale.loader.gguf import load_gguf, quantized_codes
from ttscale.loader.memory import release_free_memory
from ttscale.models.config import ModelConfig
from ttscale.models.layers import Linear, QuantizedEmbedding
from ttscale.models.quant import Int4Weight, Int8Weight, _int4_pack, load_for_compute
from ttscale.models.registry import build_model

_TYPES = [Q.Q8_0, Q.Q4_1, Q.Q4_K, Q.Q6_K]


@pytest.mark.parametrize("qtype", _TYPES, ids=lambda q: q.name)
def test_dequantize_in_slices_is_exact(qtype: Q, monkeypatch: pytest.MonkeyPatch) -> None:
    weight = quantized_codes(_random_blocks(qtype, 40, 512), qtype, (40, 512))
    whole = weight.dequantize(torch.float32)
    monkeypatch.setattr(checkpoint_module, "DEQUANTIZE_CHUNK", 3 * 512)  # 3 rows a slice
    assert torch.equal(weight.dequantize(torch.float32), whole)
    assert torch.equal(weight.dequantize(torch.bfloat16), whole.to(torch.bfloat16))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q6_K], ids=lambda q: q.name)
def test_int8_requantization_in_slices_is_exact(qtype: Q, monkeypatch: pytest.MonkeyPatch) -> None:
    weight = quantized_codes(_random_blocks(qtype, 40, 512), qtype, (40, 512))
    w = weight.dequantize()
    scales = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    codes = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    monkeypatch.setattr(quant_module, "DEQUANTIZE_CHUNK", 3 * 512)
    monkeypatch.setattr(checkpoint_module, "DEQUANTIZE_CHUNK", 3 * 512)
    packed = Int8Weight(weight, dense=False)
    assert torch.equal(packed.codes, codes)
    assert torch.equal(packed.scales, scales.to(torch.bfloat16))


@pytest.mark.parametrize("rows", [208, 1040])
def test_int4_packing_in_slices_equals_packing_at_once(
    rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU int4 packing interleaves rows in blocks of 64: packed in slices of whole blocks
    (and a last partial one), the bytes equal one call's. Guards the layout across torch
    versions."""
    codes = torch.randint(0, 16, (rows, 256), dtype=torch.uint8)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 2)
    monkeypatch.setattr(quant_module, "DEQUANTIZE_CHUNK", 64 * 256)  # 64 rows a slice
    assert torch.equal(_int4_pack(codes), whole)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1], ids=lambda q: q.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantized_embedding_looks_up_the_dequantized_rows(qtype: Q, dtype: torch.dtype) -> None:
    weight = quantized_codes(_random_blocks(qtype, 50, 64), qtype, (50, 64))
    ids = torch.tensor([[3, 0, 49], [7, 7, 12]])
    table = weight.dequantize().to(dtype)
    out = QuantizedEmbedding(weight, dtype)(ids)
    assert out.dtype == dtype and out.shape == (2, 3, 64)
    assert torch.equal(out, torch.nn.functional.embedding(ids, table))


@pytest.mark.parametrize("embedding", [Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_streamed_build_packs_the_same_weights(embedding: Q, tmp_path: Path) -> None:
    types = {"token_embd.weight": embedding}
    types |= {f"{n}.weight": Q.Q4_1 for n in ("q", "k", "v", "output", "gate", "up", "down")}
    path = _write_model(tmp_path / "model.gguf", types)
    models = []
    for consume in (False, True):
        checkpoint = load_for_compute(path, torch.float32, "auto", "cpu")
        config = ModelConfig.from_hf(checkpoint.config)
        models.append(build_model(config, checkpoint.tensors, consume=consume))
        assert (not checkpoint.tensors) == consume  # consumed: the dict is emptied
    kept, streamed = models
    assert isinstance(streamed.embed_tokens, QuantizedEmbedding)
    ids = torch.arange(config.vocab_size)
    assert torch.equal(streamed.embed_tokens(ids), kept.embed_tokens(ids))
    linears = [
        (a, b)
        for a, b in zip(kept.modules(), streamed.modules(), strict=True)
        if isinstance(a, Linear)
    ]
    assert len(linears) == 4 * config.num_hidden_layers + 1
    for a, b in linears:
        assert type(a.qweight) is type(b.qweight)
        if isinstance(a.qweight, Int4Weight):
            assert torch.equal(a.qweight.packed, b.qweight.packed)
            assert torch.equal(a.qweight.scales_zeros, b.qweight.scales_zeros)
        else:
            assert isinstance(a.qweight, Int8Weight)
            assert torch.equal(a.qweight.codes, b.qweight.codes)
            assert torch.equal(a.qweight.scales, b.qweight.scales)
        x = torch.randn(3, a.in_features)
        assert torch.equal(a(x), b(x))


def test_loaded_tensors_let_the_file_mapping_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """F32 tensors (the norms) are copied out of the mapping: once loaded, nothing views it
    (closing it would raise BufferError otherwise), so it is unmapped with the reader."""
    path = _write_model(tmp_path / "model.gguf", {"attn_q.weight": Q.Q4_1})
    files = []
    read = gguf_module._read_gguf
    monkeypatch.setattr(gguf_module, "_read_gguf", lambda p: files.append(read(p)) or files[-1])
    checkpoint = load_gguf(path, keep_quantized=True)
    assert checkpoint.tensors["model.norm.weight"].dtype == torch.float32
    files[-1].buffer.close()
    assert torch.all(checkpoint.tensors["model.norm.weight"] == 1)
    release_free_memory()  # a no-op where there is no glibc; never raises


_RSS_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    def rss():
        return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
    from ttscale import LLM, SamplingParams
    base = rss()
    llm = LLM(num_threads=1, kv_cache_gb=0.25)
    loaded = rss()
    llm.generate("Hi", SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(base, loaded, peak, "torch._dynamo" in sys.modules)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")
def test_embedded_model_loads_within_a_memory_budget() -> None:
    """Resident memory a fresh process adds by loading the embedded model (after imports),
    MiB: measured 430 after load and ~550 at peak (docs/PERF_RSS.md; before the streamed
    load 890 and ~1215). The bounds leave room for other allocators and torch versions.
    Building the model must not import torch._dynamo (~150 MiB) either. The KV pool is sized
    explicitly (0.25 GB): the test is about loading."""
    try:
        default_model_path()
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    result = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    base, loaded, peak, dynamo = result.stdout.split()
    assert dynamo == "False"
    assert int(loaded) - int(base) < 600
    # The peak is not asserted: alone this test measures ~550 MiB over the imports, but late
    # in the full suite the same child process peaked at ~1.9-2.0 GiB, with the KV pool sized
    # at 0.25 GB, in two runs (session 5, unexplained; its held memory stayed in bounds).
    print(f"peak {int(peak) - int(base)} MiB over the imports")


def test_streamed_build_of_a_reward_model(tmp_path: Path) -> None:
    """A reward model (its decoder streams like a causal LM; a kept lm_head is dropped)
    computes the same scores built either way."""
    from tests.test_reward_models import make_qwen_remote
    from ttscale.loader import load_checkpoint
    from ttscale.models.reward import RewardModelConfig

    make_qwen_remote(tmp_path, "Qwen2ForProcessRewardModel", lm_head=True)
    models = []
    for consume in (False, True):
        checkpoint = load_checkpoint(tmp_path)
        config = RewardModelConfig.from_hf(checkpoint.config)
        models.append(build_model(config, checkpoint.tensors, consume=consume))
        assert (not checkpoint.tensors) == consume
    hidden = torch.randn(5, config.hidden_size)
    assert torch.equal(models[0].score_logits(hidden), models[1].score_logits(hidden))
    for a, b in zip(models[0].modules(), models[1].modules(), strict=True):
        if isinstance(a, Linear) and a.packed is not None:
            x = torch.randn(2, a.in_features)
            assert torch.equal(a(x), b(x))
