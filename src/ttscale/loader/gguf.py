"""Loading a GGUF file (llama.cpp's format) as an HF config, HF-named float tensors and a tokenizer.

The model code only knows Hugging Face checkpoints, so everything GGUF-specific is undone here:
llama.cpp's metadata keys become a `config.json`-style dict, its tensor names become HF parameter
names, its quantized blocks are dequantized, and the Q/K row permutation it applies to llama
weights is reversed.
"""

from __future__ import annotations

import logging
import math
import mmap
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf.quants
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from transformers import PreTrainedTokenizerFast
from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

from ttscale.errors import ModelLoadError
from ttscale.loader.checkpoint import Checkpoint, GroupQuantized
from ttscale.threads import one_torch_thread
from ttscale.tokenizer import Tokenizer

Q = GGMLQuantizationType
logger = logging.getLogger(__name__)

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",  # Mistral GGUFs are written as llama too
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)")

# Llama 3.x GGUFs carry their RoPE scaling as a tensor of per-frequency divisors, not metadata.
_ROPE_FREQS = "rope_freqs.weight"


def load_gguf(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    keep_quantized: bool = False,
    require_quantized: bool = False,
) -> Checkpoint:
    """Reads a llama/qwen2/qwen3 GGUF into HF-named `dtype` tensors, an HF config and a tokenizer.

    With `keep_quantized`, matmul weights stored in a block type stay quantized
    (`GroupQuantized`, read by `quantized_codes`), so the model can compute in the file's own
    quantization; a type without a codes reader is dequantized instead, said in one log line,
    or refused with `require_quantized`. Float tensors and the norms are always `dtype`.
    A tied embedding (no output.weight) stays quantized too: the model dequantizes the rows
    its lookup needs and its head computes with the codes.

    Raises ModelLoadError if the file is missing, not a GGUF, truncated, or uses an architecture,
    tensor or quantization type ttscale does not support. Everything is validated before the
    (comparatively slow) dequantization starts.
    """
    path = Path(path)
    file = _read_gguf(path)
    arch = _architecture(file.metadata, path)
    config = _config(file, path, arch)
    plan = [
        (t, _hf_name(t.name, arch, path)) for t in file.tensors.values() if t.name != _ROPE_FREQS
    ]
    _check_quant_types(file.tensors.values(), path)
    tokenizer = _tokenizer(file.metadata, path)

    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    keep = keep_quantized or require_quantized
    tensors: dict[str, torch.Tensor | GroupQuantized] = {}
    not_kept: dict[str, str] = {}  # type name -> first tensor stored in it
    with one_torch_thread():
        for info, hf_name in plan:
            # convert_hf_to_gguf.py permutes only the llama arch's q/k rows (weights and biases).
            n_head = heads.get(info.name.split(".")[-2]) if arch == "llama" else None
            if keep and info.qtype not in _FLOAT_TYPES and _is_matmul_weight(hf_name, config):
                if can_keep_quantized(info.qtype):
                    tensors[hf_name] = _read_codes(file, info, n_head)
                    continue
                not_kept.setdefault(info.qtype.name, info.name)
            tensors[hf_name] = _read_tensor(file, info, n_head, dtype)
    if not_kept:
        what = ", ".join(f"{name} (e.g. {tensor})" for name, tensor in not_kept.items())
        if require_quantized:
            raise ModelLoadError(
                f"{path} stores weights as {what}, which ttscale cannot compute quantized; "
                "load it with quantize='auto' (dequantizes those) or 'none'"
            )
        logger.info("%s: %s cannot be computed quantized; dequantized to %s", path, what, dtype)
    return Checkpoint(config=config, tensors=tensors, tokenizer=tokenizer, source=str(path))


def _is_matmul_weight(hf_name: str, config: dict[str, Any]) -> bool:
    """Weights a Linear multiplies by: the projections, the head, a tied embedding."""
    if hf_name == "model.embed_tokens.weight":
        return config["tie_word_embeddings"]
    return hf_name.endswith("_proj.weight") or hf_name == "lm_head.weight"


def read_gguf_config(path: str | Path) -> dict[str, Any]:
    """The HF config dict of a GGUF file from its header alone, as `load_gguf` builds it.

    Fast (milliseconds): the file is memory-mapped, no tensor is dequantized (except Llama 3's
    small rope_freqs vector) and the tokenizer is not built. Raises ModelLoadError like
    `load_gguf`.
    """
    path = Path(path)
    file = _read_gguf(path)
    return _config(file, path, _architecture(file.metadata, path))


# --- file layout -------------------------------------------------------------------------------
# A small reader of our own rather than gguf.GGUFReader: that one turns every vocabulary and merge
# string into numpy objects up front (2+ s for this 49k-token model, more for 150k vocabularies),
# while the tokenizer reads those itself. Spec: ggml/docs/gguf.md (versions 2 and 3).


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # HF order: GGUF lists dims fastest-first
    offset: int  # from the start of the file
    nbytes: int


@dataclass(frozen=True)
class _GGUFFile:
    # String arrays (vocabulary, merges) are left out: their value is their length.
    metadata: dict[str, Any]
    tensors: dict[str, _TensorInfo]
    buffer: mmap.mmap


# GGUF metadata value type id -> struct format of the fixed-size ones.
_SCALAR_FORMATS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


def _read_gguf(path: Path) -> _GGUFFile:
    try:
        with path.open("rb") as f:
            if (magic := f.read(4)) != b"GGUF":
                raise ModelLoadError(
                    f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')"
                )
            # Copy-on-write: torch can view it without a read-only warning; nothing is written back.
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such model file") from None
    except IsADirectoryError:
        raise ModelLoadError(f"{path} is a directory, not a .gguf file") from None
    except OSError as exc:
        raise ModelLoadError(f"{path} cannot be read: {exc.strerror or exc}") from None
    try:
        metadata, tensors, end = _parse_header(buffer)
    except (struct.error, ValueError) as exc:
        raise ModelLoadError(f"{path} has a truncated or corrupt GGUF header ({exc})") from None
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelLoadError(f"{path} has an invalid general.alignment {alignment!r}")
    data_start = (end + alignment - 1) // alignment * alignment
    infos = {}
    for name, dims, type_id, offset in tensors:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise ModelLoadError(
                f"{path} stores tensor {name} as unknown ggml type {type_id}"
            ) from None
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        if dims[0] % block_size:
            raise ModelLoadError(
                f"{path}: tensor {name} has rows of {dims[0]} values, not a whole number of "
                f"{qtype.name} blocks of {block_size}"
            )
        info = _TensorInfo(
            name=name,
            qtype=qtype,
            shape=tuple(reversed(dims)),
            offset=data_start + offset,
            nbytes=math.prod(dims) // block_size * type_size,
        )
        if info.offset + info.nbytes > len(buffer):
            raise ModelLoadError(
                f"{path} is truncated: tensor {name} ends at byte {info.offset + info.nbytes} "
                f"but the file has {len(buffer)} bytes"
            )
        infos[name] = info
    return _GGUFFile(metadata, infos, buffer)


def _parse_header(buf: mmap.mmap) -> tuple[dict[str, Any], list[tuple], int]:
    """(metadata, [(name, dims, ggml type id, data offset)], end of the tensor table)."""
    pos = 4

    def unpack(fmt: str) -> tuple:
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    def string() -> str:
        nonlocal pos
        (length,) = unpack("Q")
        if pos + length > len(buf):
            raise ValueError("a string runs past the end of the file")
        pos += length
        return buf[pos - length : pos].decode("utf-8")

    def value(type_id: int) -> Any:
        nonlocal pos
        if type_id in _SCALAR_FORMATS:
            return unpack(_SCALAR_FORMATS[type_id])[0]
        if type_id == _STRING:
            return string()
        if type_id != _ARRAY:
            raise ValueError(f"unknown metadata value type {type_id}")
        item_type, count = unpack("IQ")
        if item_type in _SCALAR_FORMATS:
            return list(unpack(f"{count}{_SCALAR_FORMATS[item_type]}"))
        if item_type != _STRING:
            raise ValueError(f"unsupported metadata array of type {item_type}")
        for _ in range(count):  # only lengths matter here; a plain loop is cheap enough
            pos += 8 + _U64.unpack_from(buf, pos)[0]
        if pos > len(buf):
            raise ValueError("a string array runs past the end of the file")
        return count

    (version,) = unpack("I")
    if version not in (2, 3):
        # Also what a big-endian file looks like (its version reads as 0x03000000).
        raise ValueError(f"GGUF version {version} is not supported (only 2 and 3)")
    tensor_count, kv_count = unpack("QQ")
    metadata = {}
    for _ in range(kv_count):
        key = string()
        metadata[key] = value(unpack("I")[0])
    tensors = []
    for _ in range(tensor_count):
        name = string()
        (n_dims,) = unpack("I")
        dims = unpack(f"{n_dims}Q")
        type_id, offset = unpack("IQ")
        tensors.append((name, dims, type_id, offset))
    return metadata, tensors, pos


def _read_tensor(
    file: _GGUFFile, info: _TensorInfo, n_head: int | None, dtype: torch.dtype
) -> torch.Tensor:
    mapped = torch.frombuffer(file.buffer, dtype=torch.uint8, count=info.nbytes, offset=info.offset)
    raw = mapped
    if n_head is not None:
        # Rows are whole blocks, so the permutation is undone on the (smaller) quantized bytes.
        raw = _unpermute_rows(raw.reshape(info.shape[0], -1), n_head)
    values = dequantize(raw, info.qtype, info.shape, dtype)
    if values.untyped_storage().data_ptr() == mapped.untyped_storage().data_ptr():
        # A float tensor already in `dtype` is a view of the file's mapping: copied, or the
        # model would keep the whole mapping alive, and every page of it is resident once
        # loading has read all tensors (the embedded model's 94 MiB, for 140 KiB of norms).
        values = values.clone()
    return values


def _read_codes(file: _GGUFFile, info: _TensorInfo, n_head: int | None) -> GroupQuantized:
    raw = torch.frombuffer(file.buffer, dtype=torch.uint8, count=info.nbytes, offset=info.offset)
    if n_head is not None:
        raw = _unpermute_rows(raw.reshape(info.shape[0], -1), n_head)
    return quantized_codes(raw.contiguous(), info.qtype, info.shape)


def _unpermute_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf.py's `w.reshape(n_head, 2, d // n_head // 2, *rest)
    .swapaxes(1, 2)`: each head's rows go back from interleaved to rotate-half order."""
    out = rows.reshape(n_head, rows.shape[0] // n_head // 2, 2, *rows.shape[1:]).transpose(1, 2)
    return out.reshape(rows.shape)


# --- metadata ----------------------------------------------------------------------------------


def _architecture(metadata: dict[str, Any], path: Path) -> str:
    arch = metadata.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(
            f"{path} holds a {arch!r} model; ttscale supports GGUF architectures "
            f"{', '.join(sorted(_ARCHITECTURES))}"
        )
    return arch


def _config(file: _GGUFFile, path: Path, arch: str) -> dict[str, Any]:
    metadata, infos = file.metadata, file.tensors

    def meta(suffix: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{suffix}", default)
        if value is None:
            raise ModelLoadError(f"{path} lacks the metadata key {arch}.{suffix}")
        if isinstance(value, list):  # per-layer values: none of the supported models has them
            raise ModelLoadError(f"{path} has per-layer {arch}.{suffix}, which is unsupported")
        return value

    if "token_embd.weight" not in infos:
        raise ModelLoadError(f"{path} has no token_embd.weight tensor")
    hidden = int(meta("embedding_length"))
    n_head = int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", hidden // n_head))
    rope_theta = _float32(meta("rope.freq_base", 10000.0))
    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        # The embedding's row count, not metadata, is what the weights actually hold.
        "vocab_size": infos["token_embd.weight"].shape[0],
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(meta("attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _float32(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "max_position_embeddings": int(meta("context_length")),
        # llama.cpp writes output.weight only when it differs from the embedding.
        "tie_word_embeddings": "output.weight" not in infos,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "attention_bias": "blk.0.attn_q.bias" in infos,
    }
    rope_scaling = _rope_scaling(metadata, arch)
    if _ROPE_FREQS in infos:
        factors = _read_tensor(file, infos[_ROPE_FREQS], None, torch.float32)
        rope_scaling = _llama3_rope_scaling(factors, rope_theta, head_dim, path)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _float32(value: float) -> float:
    # GGUF stores floats as float32: print them back as the short decimal of the HF config.json
    # (1e-05, not 9.999999747378752e-06); both round to the same float32.
    return float(str(np.float32(value)))


def _rope_scaling(metadata: dict[str, Any], arch: str) -> dict[str, Any] | None:
    rope_type = metadata.get(f"{arch}.rope.scaling.type")
    if rope_type in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": rope_type}
    if (factor := metadata.get(f"{arch}.rope.scaling.factor")) is not None:
        scaling["factor"] = _float32(factor)
    if (original := metadata.get(f"{arch}.rope.scaling.original_context_length")) is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _llama3_rope_scaling(
    factors: torch.Tensor, rope_theta: float, head_dim: int, path: Path
) -> dict[str, Any] | None:
    """Recovers HF's `rope_scaling` from the divisors convert_hf_to_gguf.py derived from it.

    Only `factor` differs between Llama 3.1/3.2/3.3; the other parameters are checked by
    recomputing every divisor rather than assumed.
    """
    if bool((factors == 1).all()):
        return None
    scaling = {
        "rope_type": "llama3",
        "factor": float(factors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    expected = _llama3_factors(scaling, rope_theta, head_dim)
    if expected.shape != factors.shape or not torch.allclose(expected, factors, rtol=1e-5):
        raise ModelLoadError(
            f"{path} has a rope_freqs tensor that matches no llama3 RoPE scaling ttscale knows"
        )
    return scaling


def _llama3_factors(scaling: dict[str, Any], rope_theta: float, head_dim: int) -> torch.Tensor:
    """The per-frequency divisors as convert_hf_to_gguf.py computes them."""
    freqs = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    context = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < context / high:
            out.append(1.0)
        elif wavelen > context / low:
            out.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _hf_name(gguf_name: str, arch: str, path: Path) -> str:
    stem, _, kind = gguf_name.rpartition(".")
    if kind in ("weight", "bias"):
        if stem in _TOP_LEVEL_NAMES:
            return f"{_TOP_LEVEL_NAMES[stem]}.{kind}"
        match = _LAYER_TENSOR.fullmatch(stem)
        if match and match[2] in _LAYER_NAMES:
            return f"model.layers.{match[1]}.{_LAYER_NAMES[match[2]]}.{kind}"
    raise ModelLoadError(f"{path} has a tensor {gguf_name!r} that a {arch} model does not have")


def _check_quant_types(infos: Iterable[_TensorInfo], path: Path) -> None:
    first_of_type = {}
    for info in infos:
        first_of_type.setdefault(info.qtype, info.name)
    for qtype, name in first_of_type.items():
        if not can_dequantize(qtype):
            raise ModelLoadError(
                f"{path} stores tensor {name} as {qtype.name}, a type ttscale cannot dequantize"
            )


def _tokenizer(metadata: dict[str, Any], path: Path) -> Tokenizer:
    if "tokenizer.ggml.tokens" not in metadata:
        raise ModelLoadError(f"{path} has no embedded tokenizer (no tokenizer.ggml.tokens)")
    try:
        # transformers' own GGUF tokenizer pipeline, so ids and templates match
        # AutoTokenizer.from_pretrained(..., gguf_file=...) exactly.
        architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(path))
        backend, extra_kwargs = convert_gguf_tokenizer(architecture, tokenizer_dict)
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra_kwargs)
    except (ValueError, KeyError, IndexError) as exc:
        raise ModelLoadError(f"{path}: cannot build its tokenizer: {exc}") from None
    # Chat models end a turn with EOT/EOM (Llama 3's <|eot_id|>), not only with EOS.
    eos_ids = [
        metadata[key]
        for key in (f"tokenizer.ggml.{k}_token_id" for k in ("eos", "eot", "eom"))
        if key in metadata
    ]
    return Tokenizer(hf, eos_ids)


# --- dequantization ----------------------------------------------------------------------------


_FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


def can_dequantize(qtype: GGMLQuantizationType) -> bool:
    """Whether `dequantize` handles this type: natively, or through gguf-py's numpy code."""
    if qtype in _FLOAT_TYPES or qtype in _BLOCK_DEQUANTIZERS:
        return True
    try:
        gguf.quants.dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def dequantize(
    raw: torch.Tensor,
    qtype: GGMLQuantizationType,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A tensor's raw bytes (contiguous uint8) -> values of HF `shape` in `dtype`.

    Block types are computed in float32 exactly as `gguf.quants.dequantize` does (same operations
    in the same order, so bit-identical), then cast once.
    """
    if qtype in _FLOAT_TYPES:
        return raw.reshape(-1).view(_FLOAT_TYPES[qtype]).reshape(shape).to(dtype)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    fast = _BLOCK_DEQUANTIZERS.get(qtype)
    if fast is not None:
        values = fast(raw.reshape(-1, type_size))
    else:  # rare types (IQ*, TQ*, ...): gguf-py's numpy code is slow but right
        rows = raw.reshape(-1, shape[-1] // block_size * type_size).numpy()
        values = torch.from_numpy(gguf.quants.dequantize(rows, qtype))
    return values.reshape(shape).to(dtype)


# Block dequantizers: `blocks` is (n, type_size) uint8, the result (n, ...) float32 holding
# block_size values per block. Layouts follow ggml-common.h; each mirrors gguf/quants.py.


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 scale at byte `offset` of each block, as an (n, 1) float32 column."""
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).float()


def _unpack(packed: torch.Tensor, shifts: range | tuple[int, ...], mask: int) -> torch.Tensor:
    """Bit fields of each byte, stacked on a new second-to-last dim (one slice per shift)."""
    return torch.stack([(packed >> s) & mask for s in shifts], dim=-2)


def _dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, 2:].view(torch.int8).float().mul_(_f16(blocks, 0))


def _dequant_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _unpack(blocks[:, 2:], (0, 4), 0x0F).reshape(len(blocks), 32).float()
    return q.sub_(8).mul_(_f16(blocks, 0))


def _dequant_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    q = _unpack(blocks[:, 4:], (0, 4), 0x0F).reshape(len(blocks), 32).float()
    return q.mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _q5_values(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    # qh is a little-endian uint32 whose bit j is the 5th bit of value j.
    high = ((qh.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(len(qs), 32)
    low = _unpack(qs, (0, 4), 0x0F).reshape(len(qs), 32)
    return (low | (high << 4)).float()


def _dequant_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _q5_values(blocks[:, 2:6], blocks[:, 6:])
    return q.sub_(16).mul_(_f16(blocks, 0))


def _dequant_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    q = _q5_values(blocks[:, 4:8], blocks[:, 8:])
    return q.mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's twelve bytes -> eight 6-bit scales and eight 6-bit mins, as float32."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _dequant_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = len(blocks)
    sc, mn = _k_scale_min(blocks[:, 4:16])
    d = (_f16(blocks, 0) * sc).reshape(n, 8, 1)
    dm = (_f16(blocks, 2) * mn).reshape(n, 8, 1)
    q = _unpack(blocks[:, 16:].reshape(n, 4, 32), (0, 4), 0x0F).reshape(n, 8, 32).float()
    return q.mul_(d).sub_(dm)


def _dequant_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = len(blocks)
    sc, mn = _k_scale_min(blocks[:, 4:16])
    d = (_f16(blocks, 0) * sc).reshape(n, 8, 1)
    dm = (_f16(blocks, 2) * mn).reshape(n, 8, 1)
    high = _unpack(blocks[:, 16:48].reshape(n, 1, 32), range(8), 1).reshape(n, 8, 32)
    low = _unpack(blocks[:, 48:].reshape(n, 4, 32), (0, 4), 0x0F).reshape(n, 8, 32)
    return (low | (high << 4)).float().mul_(d).sub_(dm)


def _dequant_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = len(blocks)
    d = (_f16(blocks, 208) * blocks[:, 192:208].view(torch.int8).float()).reshape(n, 16, 1)
    low = _unpack(blocks[:, :128].reshape(n, 2, 64), (0, 4), 0x0F).reshape(n, 8, 32)
    high = _unpack(blocks[:, 128:192].reshape(n, 2, 32), (0, 2, 4, 6), 0x03).reshape(n, 8, 32)
    q = (low | (high << 4)).float().sub_(32).reshape(n, 16, 16)
    return q.mul_(d)


def _dequant_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = len(blocks)
    scales = blocks[:, :16]
    dl = (_f16(blocks, 80) * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (_f16(blocks, 82) * (scales >> 4).float()).reshape(n, 16, 1)
    q = _unpack(blocks[:, 16:80].reshape(n, 2, 32), (0, 2, 4, 6), 0x03).reshape(n, 16, 16)
    return q.float().mul_(dl).sub_(ml)


def _dequant_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = len(blocks)
    low_scales = _unpack(blocks[:, 96:104], (0, 4), 0x0F).reshape(n, 16)
    high_scales = _unpack(blocks[:, 104:108], (0, 2, 4, 6), 0x03).reshape(n, 16)
    scales = (low_scales | (high_scales << 4)).float().sub_(32)
    dl = (_f16(blocks, 108) * scales).reshape(n, 16, 1)
    low = _unpack(blocks[:, 32:96].reshape(n, 2, 32), (0, 2, 4, 6), 0x03).reshape(n, 16, 16)
    # A set hmask bit means no offset; a clear one subtracts 4.
    high = _unpack(blocks[:, :32].reshape(n, 1, 32), range(8), 1).reshape(n, 16, 16)
    q = low.float().sub_(((high ^ 1) << 2).float())
    return q.mul_(dl)


_BLOCK_DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.Q8_0: _dequant_q8_0,
    Q.Q4_0: _dequant_q4_0,
    Q.Q4_1: _dequant_q4_1,
    Q.Q5_0: _dequant_q5_0,
    Q.Q5_1: _dequant_q5_1,
    Q.Q2_K: _dequant_q2_k,
    Q.Q3_K: _dequant_q3_k,
    Q.Q4_K: _dequant_q4_k,
    Q.Q5_K: _dequant_q5_k,
    Q.Q6_K: _dequant_q6_k,
}


# --- quantized codes ---------------------------------------------------------------------------
# The same blocks read as GroupQuantized (codes + per-group scale/offset) instead of values, for
# computing in the file's quantization. Each returns (codes (n, block_size) uint8,
# scales (n, groups) float32, offsets (n, groups) float32 or None); `_CODE_FORMATS` holds each
# type's (zero point, group size, bits). Scales and offsets are computed exactly as the
# dequantizers above compute them, so GroupQuantized.dequantize is bit-identical to them.

_Codes = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def _codes_q8_0(blocks: torch.Tensor) -> _Codes:
    # int8 -> uint8 with zero point 128: (c - 128) is the int8 value exactly.
    codes = (blocks[:, 2:].view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
    return codes, _f16(blocks, 0), None


def _codes_q4_0(blocks: torch.Tensor) -> _Codes:
    return _unpack(blocks[:, 2:], (0, 4), 0x0F).reshape(len(blocks), 32), _f16(blocks, 0), None


def _codes_q4_1(blocks: torch.Tensor) -> _Codes:
    codes = _unpack(blocks[:, 4:], (0, 4), 0x0F).reshape(len(blocks), 32)
    return codes, _f16(blocks, 0), _f16(blocks, 2)


def _codes_q5_0(blocks: torch.Tensor) -> _Codes:
    return _q5_values(blocks[:, 2:6], blocks[:, 6:]).to(torch.uint8), _f16(blocks, 0), None


def _codes_q5_1(blocks: torch.Tensor) -> _Codes:
    codes = _q5_values(blocks[:, 4:8], blocks[:, 8:]).to(torch.uint8)
    return codes, _f16(blocks, 0), _f16(blocks, 2)


def _codes_q4_k(blocks: torch.Tensor) -> _Codes:
    n = len(blocks)
    sc, mn = _k_scale_min(blocks[:, 4:16])
    codes = _unpack(blocks[:, 16:].reshape(n, 4, 32), (0, 4), 0x0F).reshape(n, 256)
    return codes, _f16(blocks, 0) * sc, -(_f16(blocks, 2) * mn)


def _codes_q5_k(blocks: torch.Tensor) -> _Codes:
    n = len(blocks)
    sc, mn = _k_scale_min(blocks[:, 4:16])
    high = _unpack(blocks[:, 16:48].reshape(n, 1, 32), range(8), 1).reshape(n, 256)
    low = _unpack(blocks[:, 48:].reshape(n, 4, 32), (0, 4), 0x0F).reshape(n, 256)
    return low | (high << 4), _f16(blocks, 0) * sc, -(_f16(blocks, 2) * mn)


def _codes_q6_k(blocks: torch.Tensor) -> _Codes:
    n = len(blocks)
    scales = _f16(blocks, 208) * blocks[:, 192:208].view(torch.int8).float()
    low = _unpack(blocks[:, :128].reshape(n, 2, 64), (0, 4), 0x0F).reshape(n, 256)
    high = _unpack(blocks[:, 128:192].reshape(n, 2, 32), (0, 2, 4, 6), 0x03).reshape(n, 256)
    return low | (high << 4), scales, None


def _codes_q2_k(blocks: torch.Tensor) -> _Codes:
    n = len(blocks)
    scales = blocks[:, :16]
    codes = _unpack(blocks[:, 16:80].reshape(n, 2, 32), (0, 2, 4, 6), 0x03).reshape(n, 256)
    dl = _f16(blocks, 80) * (scales & 0x0F).float()
    return codes, dl, -(_f16(blocks, 82) * (scales >> 4).float())


def _codes_q3_k(blocks: torch.Tensor) -> _Codes:
    n = len(blocks)
    low_scales = _unpack(blocks[:, 96:104], (0, 4), 0x0F).reshape(n, 16)
    high_scales = _unpack(blocks[:, 104:108], (0, 2, 4, 6), 0x03).reshape(n, 16)
    scales = (low_scales | (high_scales << 4)).float().sub_(32)
    low = _unpack(blocks[:, 32:96].reshape(n, 2, 32), (0, 2, 4, 6), 0x03).reshape(n, 256)
    high = _unpack(blocks[:, :32].reshape(n, 1, 32), range(8), 1).reshape(n, 256)
    # value = low - 4 * (1 - high) = (low | high << 2) - 4
    return low | (high << 2), _f16(blocks, 108) * scales, None


_BLOCK_CODES: dict[GGMLQuantizationType, Callable[[torch.Tensor], _Codes]] = {
    Q.Q8_0: _codes_q8_0,
    Q.Q4_0: _codes_q4_0,
    Q.Q4_1: _codes_q4_1,
    Q.Q5_0: _codes_q5_0,
    Q.Q5_1: _codes_q5_1,
    Q.Q2_K: _codes_q2_k,
    Q.Q3_K: _codes_q3_k,
    Q.Q4_K: _codes_q4_k,
    Q.Q5_K: _codes_q5_k,
    Q.Q6_K: _codes_q6_k,
}
# type -> (zero point, group size, bits)
_CODE_FORMATS: dict[GGMLQuantizationType, tuple[int, int, int]] = {
    Q.Q8_0: (128, 32, 8),
    Q.Q4_0: (8, 32, 4),
    Q.Q4_1: (0, 32, 4),
    Q.Q5_0: (16, 32, 5),
    Q.Q5_1: (0, 32, 5),
    Q.Q2_K: (0, 16, 2),
    Q.Q3_K: (4, 16, 3),
    Q.Q4_K: (0, 32, 4),
    Q.Q5_K: (0, 32, 5),
    Q.Q6_K: (32, 16, 6),
}


def can_keep_quantized(qtype: GGMLQuantizationType) -> bool:
    """Whether `quantized_codes` reads this type (every type with a fast dequantizer)."""
    return qtype in _BLOCK_CODES


def quantized_codes(
    raw: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, int]
) -> GroupQuantized:
    """A 2-D tensor's raw bytes (contiguous uint8) -> its codes, scales and offsets."""
    type_size = GGML_QUANT_SIZES[qtype][1]
    zero_point, group_size, bits = _CODE_FORMATS[qtype]
    codes, scales, offsets = _BLOCK_CODES[qtype](raw.reshape(-1, type_size))
    rows, groups = shape[0], shape[1] // group_size
    return GroupQuantized(
        codes=codes.reshape(shape).contiguous(),
        scales=scales.reshape(rows, groups).contiguous(),
        offsets=None if offsets is None else offsets.reshape(rows, groups).contiguous(),
        zero_point=zero_point,
        group_size=group_size,
        bits=bits,
        source=qtype.name,
    )
