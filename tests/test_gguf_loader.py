"""GGUF loader: dequantizers against gguf-py, the embedded model against transformers' own GGUF
loading, tiny synthetic files for what the embedded model lacks, and bad files."""

from __future__ import annotations

import math
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from ttscale.errors import ModelLoadError
from ttscale.loader.checkpoint import Checkpoint
from ttscale.loader.default_model import DEFAULT_MODEL_NAME, default_model_path
from ttscale.loader.gguf import can_dequantize, dequantize, load_gguf, read_gguf_config


def _bits(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Float32 values as their bit patterns: equality of these is bit-identity (-0.0 != 0.0)."""
    return torch.as_tensor(x).contiguous().view(torch.int32)


# --- dequantizers ------------------------------------------------------------------------------

# Byte offsets of each block's fp16 scales: random bytes there could be inf/nan, so they are
# overwritten with finite halves; every other byte (quants, packed 6-bit scales) stays random.
_FP16_OFFSETS = {
    Q.Q8_0: (0,),
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q5_1: (0, 2),
    Q.Q2_K: (80, 82),
    Q.Q3_K: (108,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
    Q.IQ4_NL: (0,),  # no fast path: checks the gguf-py fallback's reshaping
}


@pytest.mark.parametrize("qtype", list(_FP16_OFFSETS), ids=lambda q: q.name)
def test_dequantize_random_blocks_bit_identical(qtype: Q) -> None:
    rng = np.random.default_rng(int(qtype))
    type_size = GGML_QUANT_SIZES[qtype][1]
    rows, blocks_per_row = 6, 3
    raw = rng.integers(0, 256, size=(rows * blocks_per_row, type_size), dtype=np.uint8)
    for offset in _FP16_OFFSETS[qtype]:
        scales = rng.uniform(-3, 3, size=len(raw)).astype(np.float16)
        raw[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    raw = raw.reshape(rows, blocks_per_row * type_size)

    expected = gguf.quants.dequantize(raw, qtype)
    ours = dequantize(torch.from_numpy(raw.copy()), qtype, expected.shape)
    assert ours.shape == expected.shape
    assert torch.equal(_bits(ours), _bits(expected))


@pytest.mark.parametrize(
    "qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=lambda q: q.name
)
def test_dequantize_quantized_data_bit_identical(qtype: Q) -> None:
    values = np.random.default_rng(7).standard_normal((5, 128)).astype(np.float32)
    data = np.ascontiguousarray(gguf.quants.quantize(values, qtype))

    expected = gguf.quants.dequantize(data, qtype)
    ours = dequantize(torch.from_numpy(data.view(np.uint8).copy()), qtype, values.shape)
    assert torch.equal(_bits(ours), _bits(expected))
    assert torch.equal(dequantize(torch.from_numpy(data.view(np.uint8)), qtype, (5, 128)), ours)


def test_types_without_a_dequantizer_are_reported() -> None:
    assert not can_dequantize(Q.F64)
    assert can_dequantize(Q.Q4_K) and can_dequantize(Q.IQ4_NL)


# --- the embedded default model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def default_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def loaded(default_path: Path) -> tuple[Checkpoint, float]:
    start = time.perf_counter()
    checkpoint = load_gguf(default_path)
    return checkpoint, time.perf_counter() - start


def test_default_model_loads_finite_weights(loaded: tuple[Checkpoint, float], capsys) -> None:
    """Every dequantized tensor of the embedded model is finite (prints the load time: a
    figure for docs, not a timed assertion)."""
    checkpoint, seconds = loaded
    bad = [name for name, t in checkpoint.tensors.items() if not torch.isfinite(t).all()]
    assert checkpoint.tensors and not bad, bad
    with capsys.disabled():
        print(
            f"\nload_gguf({DEFAULT_MODEL_NAME}): {seconds:.2f} s, {len(checkpoint.tensors)} tensors"
        )


def test_default_model_config(loaded: tuple[Checkpoint, float], default_path: Path) -> None:
    checkpoint, _ = loaded
    assert checkpoint.source == str(default_path)
    assert default_path.name.startswith(DEFAULT_MODEL_NAME)
    assert checkpoint.config == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "attention_bias": False,
    }
    assert checkpoint.tokenizer.eos_token_ids == {2}


def test_header_only_config_equals_loaded_config(
    loaded: tuple[Checkpoint, float], default_path: Path
) -> None:
    """The header reader the cost model uses builds exactly the loader's config, without
    dequantizing (so it is much faster than a load)."""
    checkpoint, load_seconds = loaded
    start = time.perf_counter()
    config = read_gguf_config(default_path)
    assert config == checkpoint.config
    assert time.perf_counter() - start < max(0.5, load_seconds / 4)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        read_gguf_config(Path(__file__))


def test_default_model_tensors_equal_transformers(
    loaded: tuple[Checkpoint, float], default_path: Path
) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    checkpoint, _ = loaded
    # transformers maps names through a model instance; a meta one costs no memory.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**checkpoint.config))
    reference = load_gguf_checkpoint(str(default_path), return_tensors=True, model_to_load=model)
    expected = reference["tensors"]

    assert expected.keys() == checkpoint.tensors.keys()
    for name, tensor in expected.items():
        ours = checkpoint.tensors[name]
        assert ours.dtype == tensor.dtype == torch.float32, name
        assert ours.shape == tensor.shape, name
        # Tolerance 0: both dequantize the same blocks with the same float32 operations.
        assert torch.equal(_bits(ours), _bits(tensor)), name


_TEXTS = [
    "Hello world! The quick brown fox.",
    "café naïve Ångström",
    "🙂🚀 emoji",
    "你好世界",
    "def f(x):\n    return x  # two  spaces\n\n\tpass\n",
    "<|im_start|>user\nspecial tokens stay whole<|im_end|>",
]
_CONVERSATIONS = [
    [{"role": "user", "content": _TEXTS[0]}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": _TEXTS[1]},
        {"role": "assistant", "content": _TEXTS[2]},
        {"role": "user", "content": _TEXTS[3]},
    ],
    [
        {"role": "user", "content": _TEXTS[4]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "🙂 again"},
    ],
]


def test_default_model_tokenizer_equals_transformers(
    loaded: tuple[Checkpoint, float], default_path: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = loaded[0].tokenizer
    reference = AutoTokenizer.from_pretrained(str(default_path.parent), gguf_file=default_path.name)

    for text in _TEXTS:
        assert tokenizer.encode(text) == reference.encode(text), text
        assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text
    for messages in _CONVERSATIONS:
        expected = reference.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        assert tokenizer.apply_chat_template(messages) == expected
    assert tokenizer.bos_token_id == reference.bos_token_id
    assert tokenizer.hf.eos_token == reference.eos_token == "<|im_end|>"


# --- synthetic files ---------------------------------------------------------------------------

_HIDDEN, _HEADS, _KV_HEADS = 64, 4, 2


def _write_gguf(
    path: Path,
    arch: str,
    tensors: dict[str, np.ndarray],
    quantized: dict[str, Q] | None = None,
    key_length: int | None = None,
) -> Path:
    """A tiny one-layer GGUF with a four-token byte-level BPE tokenizer.

    `quantized` names the tensors whose array holds blocks of that type rather than floats.
    """
    quantized = quantized or {}
    writer = gguf.GGUFWriter(str(path), arch)
    if key_length is not None:
        writer.add_key_length(key_length)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(_HIDDEN)
    writer.add_feed_forward_length(128)
    writer.add_head_count(_HEADS)
    writer.add_head_count_kv(_KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(500000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "ab", "<|end|>"])
    writer.add_token_types([1, 1, 1, 3])
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(3)
    writer.add_eos_token_id(3)
    tensors = {"token_embd.weight": np.ones((4, _HIDDEN), np.float32), **tensors}
    for name, array in tensors.items():
        writer.add_tensor(name, array, raw_dtype=quantized.get(name))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py's LlamaModel.permute, verbatim.
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _llama3_rope_factors(theta: float, dim: int, factor: float) -> np.ndarray:
    # convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors with Llama 3.2's rope_scaling.
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_freq_wavelen, high_freq_wavelen = 8192 / 1.0, 8192 / 4.0
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def test_llama_qk_permutation_is_undone(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    head_dim = _HIDDEN // _HEADS
    q = rng.standard_normal((_HEADS * head_dim, _HIDDEN)).astype(np.float32)
    k = rng.standard_normal((_KV_HEADS * head_dim, _HIDDEN)).astype(np.float32)
    q_bias = rng.standard_normal(_HEADS * head_dim).astype(np.float32)
    path = _write_gguf(
        tmp_path / "llama.gguf",
        "llama",
        {
            "blk.0.attn_q.weight": _llama_cpp_permute(q, _HEADS),
            "blk.0.attn_q.bias": _llama_cpp_permute(q_bias, _HEADS),
            # Quantized, to check the permutation is undone on whole rows of blocks.
            "blk.0.attn_k.weight": gguf.quants.quantize(_llama_cpp_permute(k, _KV_HEADS), Q.Q8_0),
            "rope_freqs.weight": _llama3_rope_factors(500000.0, head_dim, 32.0),
        },
        quantized={"blk.0.attn_k.weight": Q.Q8_0},
    )
    checkpoint = load_gguf(path)
    tensors = checkpoint.tensors
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(q))
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.bias"], torch.from_numpy(q_bias))
    k_roundtrip = gguf.quants.dequantize(gguf.quants.quantize(k, Q.Q8_0), Q.Q8_0)
    assert torch.equal(
        tensors["model.layers.0.self_attn.k_proj.weight"], torch.from_numpy(k_roundtrip)
    )
    assert "rope_freqs.weight" not in tensors
    assert checkpoint.config["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert checkpoint.config["attention_bias"] is True
    assert checkpoint.tokenizer.encode("ab") == [2]

    as_bf16 = load_gguf(path, dtype=torch.bfloat16).tensors
    assert all(t.dtype == torch.bfloat16 for t in as_bf16.values())
    assert torch.equal(
        as_bf16["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(q).bfloat16()
    )


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_is_not_permuted(tmp_path: Path, arch: str) -> None:
    rng = np.random.default_rng(2)
    head_dim = 32  # != hidden / heads, as in Qwen3: must come from attention.key_length
    written = {
        "blk.0.attn_q.weight": rng.standard_normal((_HEADS * head_dim, _HIDDEN)),
        "blk.0.attn_q.bias": rng.standard_normal(_HEADS * head_dim),
        "blk.0.attn_k.weight": rng.standard_normal((_KV_HEADS * head_dim, _HIDDEN)),
        "blk.0.attn_k.bias": rng.standard_normal(_KV_HEADS * head_dim),
        "blk.0.attn_q_norm.weight": rng.standard_normal(head_dim),
        "blk.0.attn_k_norm.weight": rng.standard_normal(head_dim),
        "output.weight": rng.standard_normal((4, _HIDDEN)),
    }
    written = {name: array.astype(np.float32) for name, array in written.items()}
    checkpoint = load_gguf(_write_gguf(tmp_path / "qwen.gguf", arch, written, key_length=head_dim))
    expected_names = {
        "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
        "blk.0.attn_q.bias": "model.layers.0.self_attn.q_proj.bias",
        "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
        "blk.0.attn_k.bias": "model.layers.0.self_attn.k_proj.bias",
        "blk.0.attn_q_norm.weight": "model.layers.0.self_attn.q_norm.weight",
        "blk.0.attn_k_norm.weight": "model.layers.0.self_attn.k_norm.weight",
        "output.weight": "lm_head.weight",
    }
    for gguf_name, hf_name in expected_names.items():
        assert torch.equal(checkpoint.tensors[hf_name], torch.from_numpy(written[gguf_name]))
    config = checkpoint.config
    assert config["architectures"] == [
        {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
    ]
    assert config["head_dim"] == head_dim
    assert config["attention_bias"] is True
    assert config["tie_word_embeddings"] is False
    assert "rope_scaling" not in config


# --- bad files ---------------------------------------------------------------------------------


def _truncated(tmp_path: Path, size: int | None = None) -> Path:
    data = default_model_path().read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: size or len(data) // 2])
    return path


def _text_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.gguf"
    path.write_text("just some notes, not a model\n")
    return path


def _tiny(
    tmp_path: Path, arch: str = "llama", tensors: dict[str, np.ndarray] | None = None
) -> Path:
    return _write_gguf(tmp_path / "model.gguf", arch, tensors or {})


@pytest.mark.parametrize(
    ("make_path", "message"),
    [
        (lambda tmp: tmp / "missing.gguf", r"missing\.gguf: no such model file"),
        (lambda tmp: tmp, r"is a directory"),
        (_text_file, r"notes\.gguf is not a GGUF file \(it starts with b'just'"),
        (_truncated, r"truncated\.gguf is truncated: tensor \S+ ends at byte \d+ but the file has"),
        (
            lambda tmp: _truncated(tmp, 4096),
            r"truncated\.gguf has a truncated or corrupt GGUF header",
        ),
        (lambda tmp: _tiny(tmp, "gpt2"), r"holds a 'gpt2' model; .* llama, qwen2, qwen3"),
        (
            lambda tmp: _tiny(tmp, tensors={"blk.0.attn_norm.weight": np.ones(_HIDDEN)}),
            r"stores tensor blk\.0\.attn_norm\.weight as F64, a type ttscale cannot dequantize",
        ),
        (
            lambda tmp: _tiny(tmp, tensors={"blk.0.foo.weight": np.ones(4, np.float32)}),
            r"has a tensor 'blk\.0\.foo\.weight' that a llama model does not have",
        ),
    ],
    ids=[
        "missing",
        "directory",
        "text-file",
        "truncated-data",
        "truncated-header",
        "architecture",
        "quant-type",
        "tensor-name",
    ],
)
def test_bad_files_raise_model_load_error(tmp_path: Path, make_path, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_gguf(make_path(tmp_path))
