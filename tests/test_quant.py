"""Quantized weights computed quantized: GGUF codes, the int4/int8 kernels, a Q4_1 model against
its dequantized fp32 self, quantize="int8"/"int4" for float models, and bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from tests.test_gguf_loader import _FP16_OFFSETS as GGUF_FP16_OFFSETS
from ttscale.errors import ModelLoadError
from ttscale.loader.checkpoint import GroupQuantized
from ttscale.loader.gguf import can_keep_quantized, dequantize, load_gguf, quantized_codes
from ttscale.models.layers import Linear
from ttscale.models.quant import (
    GEMV_ROWS,
    Int4Weight,
    Int8Weight,
    cat_rows,
    kernel_for,
    pack_quantized,
    quantize_weight,
)
from ttscale.sampling.params import SamplingParams

# Byte offsets of each block's fp16 scales (finite values are written there); IQ4_NL has no
# quantized kernel, so it is left out here.
_FP16_OFFSETS = {q: o for q, o in GGUF_FP16_OFFSETS.items() if q is not Q.IQ4_NL}
_INT4_TYPES = {Q.Q4_0, Q.Q4_1, Q.Q4_K}


def _random_blocks(
    qtype: Q, rows: int, cols: int, seed: int = 0, offsets: tuple[int, ...] | None = None
) -> torch.Tensor:
    """(rows, bytes) raw blocks: random quants, finite small fp16 scales."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed + int(qtype))
    raw = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    for offset in offsets or _FP16_OFFSETS[qtype]:
        scales = rng.uniform(-0.05, 0.05, size=len(raw)).astype(np.float16)
        raw[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(rows, -1).copy())


@pytest.mark.parametrize("qtype", list(_FP16_OFFSETS), ids=lambda q: q.name)
def test_codes_dequantize_bit_identical(qtype: Q) -> None:
    """The codes, scales and offsets read from a block are the file's own numbers: mapped
    back they give exactly the dequantizer's floats (which equal gguf-py's)."""
    raw = _random_blocks(qtype, 8, 512)
    weight = quantized_codes(raw, qtype, (8, 512))
    assert can_keep_quantized(qtype)
    assert weight.codes.dtype == torch.uint8 and int(weight.codes.max()) < 2**weight.bits
    expected = dequantize(raw, qtype, (8, 512))
    assert torch.equal(weight.dequantize().view(torch.int32), expected.view(torch.int32))
    assert kernel_for(weight) == ("int4" if qtype in _INT4_TYPES else "int8")


def test_int4_kernel_zero_point_convention() -> None:
    """torch 2.13's CPU int4 kernel computes w = (q - 8) * scale + zero: one group with codes
    0..15, scale 1 and offset 0 (so zero = 8) must reproduce the codes themselves."""
    codes = torch.arange(32, dtype=torch.uint8).remainder(16).repeat(8, 1)  # (8, 32)
    ones = torch.ones(8, 1)
    weight = GroupQuantized(codes, ones, torch.zeros(8, 1), 0, 32, 4, "test")
    x = torch.eye(32)
    out = Int4Weight(weight).mm(x)  # (32, 8): column n is row n of the weight
    assert torch.equal(out.t(), codes.float())


def _error_bound(x: torch.Tensor, weight: GroupQuantized, w: torch.Tensor) -> torch.Tensor:
    """Per output: bf16 rounding of activations, weights and scales (3 * 2^-8 relative of
    each |x| |w| product), plus, on the int8 path, half a row step per |x| (requantization)."""
    bound = 3 * 2**-8 * (x.abs() @ w.abs().t())
    if kernel_for(weight) == "int8":
        step = w.abs().amax(dim=1) / 127
        bound = bound + x.abs().sum(dim=1, keepdim=True) * step / 2
    return bound + 1e-6


@pytest.mark.parametrize("qtype", list(_FP16_OFFSETS), ids=lambda q: q.name)
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_quantized_linear_matches_dequantized_matmul(qtype: Q, rows: int) -> None:
    """Tolerance: elementwise within `_error_bound` (bf16 arithmetic; int8 requantization).
    33 rows run on the bf16 oneDNN copy, which must meet the same bound."""
    raw = _random_blocks(qtype, 64, 256, seed=rows)
    weight = quantized_codes(raw, qtype, (64, 256))
    w = weight.dequantize()
    bias = torch.randn(64)
    linear = Linear(256, 64, bias=True)
    linear.bias = torch.nn.Parameter(bias, requires_grad=False)
    linear.load_quantized(weight)
    linear.pack()
    x = torch.randn(rows, 256)
    out = linear(x)
    ref = x @ w.t() + bias
    assert out.dtype == torch.float32
    assert ((out - ref).abs() <= _error_bound(x, weight, w)).all()


def test_int8_requantization_error_of_q8_0_is_small() -> None:
    """Q8_0's 32-value scales cannot be per-row scales exactly: the requantized weight stays
    within half a row step of the file's values, plus the bf16 rounding of the row scale
    (2^-9 relative; the kernel takes scales in the activations' dtype). Measured on a matmul:
    relative error < 2% (0.4-0.5% here)."""
    w = torch.randn(64, 512) * torch.linspace(0.2, 2, 512)  # groups with different ranges
    data = gguf.quants.quantize(w.numpy(), Q.Q8_0)
    weight = quantized_codes(torch.from_numpy(data.view(np.uint8).copy()), Q.Q8_0, (64, 512))
    packed = pack_quantized(weight)
    assert isinstance(packed, Int8Weight)
    exact = weight.dequantize()
    requantized = packed.codes.float() * packed.scales.float()[:, None]
    step = exact.abs().amax(dim=1, keepdim=True) / 127
    assert ((requantized - exact).abs() <= step / 2 + (exact.abs() + step) * 2**-8).all()
    x = torch.randn(GEMV_ROWS, 512)  # the int8 kernel's rows (more go to the bf16 copy)
    relative = (packed.mm(x) - x @ exact.t()).norm() / (x @ exact.t()).norm()
    assert relative < 0.02


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_quantize_weight_round_trip(mode: str) -> None:
    w = torch.randn(48, 128)
    weight = quantize_weight(w, mode)
    assert weight.shape == w.shape and weight.source == mode
    step = weight.scales.repeat_interleave(weight.group_size, dim=1)
    assert ((weight.dequantize() - w).abs() <= step / 2 + 1e-6).all()
    assert kernel_for(weight) == mode
    # int8's per-row form is the int8 kernel's own: packing it changes no value.
    if mode == "int8":
        packed = Int8Weight(weight)
        assert torch.allclose(
            packed.codes.float() * packed.scales.float()[:, None],
            weight.dequantize(),
            rtol=2**-8,
        )


def test_cat_rows_keeps_one_format_and_joins_mixed_ones() -> None:
    q4 = quantized_codes(_random_blocks(Q.Q4_K, 8, 256), Q.Q4_K, (8, 256))
    q6 = quantized_codes(_random_blocks(Q.Q6_K, 4, 256), Q.Q6_K, (4, 256))
    same = cat_rows([q4, q4])
    assert isinstance(same, GroupQuantized) and same.source == "Q4_K" and same.bits == 4
    assert torch.equal(same.dequantize(), torch.cat([q4.dequantize()] * 2))
    mixed = cat_rows([q4, q6])
    assert isinstance(mixed, GroupQuantized) and mixed.group_size == 16
    assert torch.allclose(mixed.dequantize(), torch.cat([q4.dequantize(), q6.dequantize()]))
    assert kernel_for(mixed) == "int8"
    dense = cat_rows([q4, torch.ones(2, 256)])
    assert isinstance(dense, torch.Tensor) and dense.shape == (10, 256)


# --- a tiny Q4_1 model against its dequantized fp32 self ---------------------------------------

_VOCAB = [*"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", "ab", "<|end|>"]
_HIDDEN, _FF, _HEADS, _KV_HEADS, _LAYERS = 64, 128, 4, 2, 2


def _write_model(path: Path, types: dict[str, Q], seed: int = 0) -> Path:
    """A random 2-layer llama GGUF; `types` maps tensor-name suffixes to their block type
    (the rest stay F32). Weights are scaled so that logits are spread (few near-ties)."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(_LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(_HIDDEN)
    writer.add_feed_forward_length(_FF)
    writer.add_head_count(_HEADS)
    writer.add_head_count_kv(_KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(_VOCAB)
    writer.add_token_types([1] * (len(_VOCAB) - 1) + [3])
    writer.add_token_merges(["a b"])
    writer.add_eos_token_id(len(_VOCAB) - 1)
    head_dim = _HIDDEN // _HEADS
    shapes = {
        "attn_q": (_HEADS * head_dim, _HIDDEN),
        "attn_k": (_KV_HEADS * head_dim, _HIDDEN),
        "attn_v": (_KV_HEADS * head_dim, _HIDDEN),
        "attn_output": (_HIDDEN, _HEADS * head_dim),
        "ffn_gate": (_FF, _HIDDEN),
        "ffn_up": (_FF, _HIDDEN),
        "ffn_down": (_HIDDEN, _FF),
    }
    tensors = {"token_embd.weight": rng.standard_normal((len(_VOCAB), _HIDDEN)) * 1.5}
    for i in range(_LAYERS):
        tensors[f"blk.{i}.attn_norm.weight"] = 1 + 0.1 * rng.standard_normal(_HIDDEN)
        tensors[f"blk.{i}.ffn_norm.weight"] = 1 + 0.1 * rng.standard_normal(_HIDDEN)
        for name, shape in shapes.items():
            tensors[f"blk.{i}.{name}.weight"] = rng.standard_normal(shape) / np.sqrt(shape[1])
    tensors["output_norm.weight"] = np.ones(_HIDDEN)
    for name, array in tensors.items():
        array = array.astype(np.float32)
        qtype = next((t for suffix, t in types.items() if name.endswith(suffix)), None)
        if qtype is None:
            writer.add_tensor(name, array)
        elif qtype == Q.IQ4_NL:  # gguf-py cannot quantize it: random blocks, finite scales
            rows = _random_blocks(Q.IQ4_NL, *array.shape, offsets=(0,)).numpy()
            writer.add_tensor(name, rows, raw_dtype=qtype)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def q4_1_path(tmp_path_factory) -> Path:
    # Every matmul weight Q4_1 (so the head, tied to the embedding, is int4 too).
    types = {"token_embd.weight": Q.Q4_1}
    types |= {f"{n}.weight": Q.Q4_1 for n in ("q", "k", "v", "output", "gate", "up", "down")}
    return _write_model(tmp_path_factory.mktemp("q4_1") / "model.gguf", types)


def _llm(path, quantize: str, **options):
    from ttscale.llm import LLM

    return LLM(path, quantize=quantize, kv_cache_gb=0.01, block_size=4, **options)


def _full_logits(llm, ids: list[int]) -> torch.Tensor:
    layers = llm.config.num_hidden_layers
    hidden = llm.hidden_states([ids], [layers])[0][:, 0]
    return llm.engine.model.compute_logits(hidden)


_PROMPTS = [[0, 1, 2, 3], [10, 20, 30, 40, 50, 60], [5] * 7, [60, 3, 33, 7, 1]]


def test_q4_1_model_computes_quantized(q4_1_path: Path) -> None:
    llm = _llm(q4_1_path, "native")
    kinds = {type(m.qweight) for m in llm.engine.model.modules() if isinstance(m, Linear)}
    assert kinds == {Int4Weight}  # every matmul, the tied head included
    assert all(m.packed is None for m in llm.engine.model.modules() if isinstance(m, Linear))


def test_q4_1_logits_and_greedy_match_dequantized_fp32(q4_1_path: Path) -> None:
    """Greedy tokens equal over 64 steps; logits within 5% of their standard deviation at
    any position and 0.5% on average (the kernels compute in bf16: measured 3% / 0.3%, as
    close as the bf16 model is to fp32)."""
    quantized, reference = _llm(q4_1_path, "auto"), _llm(q4_1_path, "none")
    assert isinstance(reference.engine.model.lm_head.packed, torch.Tensor)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    for prompt in _PROMPTS:
        ours = quantized.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
        ref = reference.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
        assert ours == ref
        full = prompt + ref[:-1]
        expected = _full_logits(reference, full)
        diff = (_full_logits(quantized, full) - expected).abs()
        assert diff.max() < 0.05 * expected.std() and diff.mean() < 0.005 * expected.std()


def test_auto_falls_back_for_a_type_without_kernel(tmp_path: Path, caplog) -> None:
    """IQ4_NL has no codes reader: auto dequantizes it with one log line; native refuses."""
    types = {"ffn_down.weight": Q.IQ4_NL, "attn_q.weight": Q.Q4_0}
    path = _write_model(tmp_path / "mixed.gguf", types)
    with caplog.at_level(logging.INFO, logger="ttscale.loader.gguf"):
        checkpoint = load_gguf(path, keep_quantized=True)
    lines = [r.getMessage() for r in caplog.records if "cannot be computed quantized" in r.message]
    assert len(lines) == 1 and "IQ4_NL" in lines[0]
    tensors = checkpoint.tensors
    assert isinstance(tensors["model.layers.0.mlp.down_proj.weight"], torch.Tensor)
    assert isinstance(tensors["model.layers.0.self_attn.q_proj.weight"], GroupQuantized)
    llm = _llm(path, "auto")
    assert llm.generate([1, 2], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    with pytest.raises(ModelLoadError, match=r"IQ4_NL .*cannot compute quantized"):
        _llm(path, "native")


def test_bad_quantize_values(q4_1_path: Path, model_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"quantize must be one of auto, none, native, int8"):
        _llm(q4_1_path, "int3")
    with pytest.raises(ModelLoadError, match=r"already quantized \(Q4_1\)"):
        _llm(q4_1_path, "int4")
    with pytest.raises(ModelLoadError, match=r"holds no quantized weights"):
        _llm(model_dir, "native")
    with pytest.raises(ValueError, match=r"computes on CPU only"):
        _llm(q4_1_path, "native", device="meta")


# --- quantize="int8" / "int4" for a float (safetensors) model ----------------------------------


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_float_model_quantized_at_load(model_dir: Path, mode: str) -> None:
    """The tiny HF model quantized at load: every projection runs on its kernel. Tolerance,
    relative to the logits' standard deviation: int8 mean 3% (measured 2%, bf16 alone 1.4%);
    int4 mean 30% (measured 20%: 15 levels per 32 random weights is ~12% weight noise)."""
    quantized, reference = _llm(model_dir, mode), _llm(model_dir, "auto")
    kinds = {type(m.qweight) for m in quantized.engine.model.modules() if isinstance(m, Linear)}
    assert (Int4Weight if mode == "int4" else Int8Weight) in kinds
    ids = [1, 5, 9, 2, 7]
    expected = _full_logits(reference, ids)
    diff = (_full_logits(quantized, ids) - expected).abs()
    assert 0 < diff.mean() < (0.3 if mode == "int4" else 0.03) * expected.std()


def test_cli_quantize_option(q4_1_path: Path) -> None:
    from typer.testing import CliRunner

    from ttscale.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["generate", "ab", "--raw", "--quantize", "int3"])
    assert bad.exit_code == 2 and "is not one of" in bad.output  # refused before loading
    args = ["generate", "ab", "--raw", "-m", str(q4_1_path), "--max-tokens", "3"]
    for mode in ("native", "none"):
        assert runner.invoke(app, [*args, "--quantize", mode]).exit_code == 0
    twice = runner.invoke(app, [*args, "--quantize", "int4"])
    assert twice.exit_code == 2 and "already quantized" in twice.output
