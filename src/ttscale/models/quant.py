"""Weight-only quantized matmuls on CPU: a `GroupQuantized` weight in a kernel's layout.

Two of torch's own CPU kernels, chosen per weight by what it holds:
- int4 (`aten._weight_int4pack_mm_for_cpu`): 4-bit codes with a scale and a zero per group
  of 32 or 64 values, `w = (q - 8) * scale + zero`. GGUF Q4_0, Q4_1 and Q4_K map onto it with
  the file's own codes (Q4_1's `d * q + m` is scale d, zero m + 8d); only the scales and zeros
  are rounded, to bf16, the kernel's format (relative error <= 2^-9 of each).
- int8 (`aten._weight_int8pack_mm`): int8 codes with one scale per row. Q8_0, Q5_*, Q6_K and
  the 16-value groups of Q2_K/Q3_K cannot be re-expressed exactly with per-row scales, so
  they are requantized (round to nearest, absmax / 127 per row): the error is at most half
  a row step, measured on the embedded model's Q8_0 head in tests/test_quant.py.

Both kernels have a vectorized path only for bf16 activations (fp32 ones run a scalar loop,
30-50x slower, measured with torch 2.13), so activations are cast to bf16 around the matmul
whatever the model's dtype; norms, attention and residuals keep it. Each output row is
computed alone (batch-invariant), GEMV-style: cost grows with the rows. Measured on a busy
2-core EPYC (1 thread, 30 layers of a 3072x576 weight, beyond cache), us per matmul:
rows 1: int4 70, oneDNN bf16 121, fp32 212; rows 4: 99 / 130 / 234; rows 16: 360 / 224 /
400; rows 64: 1380 / 575 / 1110. So they win at decode and short verification steps and
lose to oneDNN from ~8-16 rows on: steps of more than GEMV_ROWS rows (prefill, parallel
sampling) run on a bf16 oneDNN copy of the dequantized weight instead (2 bytes per weight
more; still half of fp32). Engine-level, same busy machine, 1 thread, embedded model, tok/s
at n = 1 / 16 / 64 samples: fp32 33 / 273 / 383, bf16 46 / 367 / 540, GGUF-native under
fp32 activations elsewhere 59 / 348 / 481 (codes only, before the bf16 copy: 35 / 187 / 108
on a busier minute).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ttscale.errors import ModelLoadError
from ttscale.loader import load_checkpoint
from ttscale.loader.checkpoint import DEQUANTIZE_CHUNK, Checkpoint, GroupQuantized

QUANTIZE_MODES = ("int8", "int4")
# Steps with more rows than this run on a bf16 copy of the weight through oneDNN's GEMM (see
# the timings above: the kernels' cost grows per row, oneDNN's barely until ~16).
GEMV_ROWS = 8
INT4_GROUP = 32  # group size of quantize="int4" (as GGUF's Q4_1)
_INT4_GROUPS = (32, 64)  # group sizes the int4 path takes as they are
_INT4_ROWS = 16  # the int4 kernel's N granularity
_INT4_PACK_ROWS = 64  # rows the int4 packing interleaves together (its BLOCK_N)
_COMPUTE_DTYPE = torch.bfloat16  # the kernels' vectorized activation type


# Opaque ops for the compiled graph (models/compiled.py): inductor's own lowerings of these
# kernels assume a frozen constant oneDNN weight, or read the int4 group size back with a
# tensor `.item()` per call. Registered with torch.library's low-level API: the
# `custom_op` wrapper costs tens of microseconds per call, at ~120 matmuls a step too much.
_LIB = torch.library.Library("ttscale", "FRAGMENT")
_LIB.define("onednn_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor")
_LIB.define("int4_mm(Tensor x, Tensor packed, int group_size, Tensor scales_zeros) -> Tensor")


def _onednn_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _int4_mm(
    x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_zeros: torch.Tensor
) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_zeros)


_LIB.impl("onednn_linear", _onednn_linear, "CompositeExplicitAutograd")
_LIB.impl("int4_mm", _int4_mm, "CompositeExplicitAutograd")


@torch.library.register_fake("ttscale::onednn_linear", lib=_LIB)
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int):
    return x.new_empty(x.shape[0], out_features)


@torch.library.register_fake("ttscale::int4_mm", lib=_LIB)
def _(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_zeros: torch.Tensor):
    return x.new_empty(x.shape[0], packed.shape[0])  # (T, N rounded up to 16)


def onednn_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """x (T, K) @ a oneDNN-packed weight -> (T, out_features)."""
    if torch.compiler.is_compiling():
        return torch.ops.ttscale.onednn_linear(x, packed, bias, out_features)
    return _onednn_linear(x, packed, bias, out_features)


class _WithDense:
    """Many-row steps (prefill, parallel sampling) on a bf16 oneDNN copy of the dequantized
    weight (the file's values rounded to bf16): the quantized kernels are GEMV-style and
    lose from ~8 rows on (at 64 rows 2.4x slower than oneDNN bf16). Costs 2 bytes per weight
    beside the codes; `dense=False` keeps the codes only."""

    dense: torch.Tensor | None = None
    out_features: int

    def _keep_dense(self, weight: GroupQuantized, dense: bool) -> None:
        if dense and torch.backends.mkldnn.is_available():
            w = weight.dequantize(_COMPUTE_DTYPE)
            self.dense = torch.ops.mkldnn._reorder_linear_weight(w, None)

    def _dense_mm(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.dense is None or x.shape[0] <= GEMV_ROWS:
            return None
        return onednn_linear(x.to(_COMPUTE_DTYPE), self.dense, None, self.out_features).to(x.dtype)


class Int4Weight(_WithDense):
    """A (N, K) weight in the int4 kernel's packed layout plus (K / g, N, 2) scales/zeros."""

    def __init__(self, weight: GroupQuantized, dense: bool = True) -> None:
        self.out_features, self.group_size = weight.shape[0], weight.group_size
        self._keep_dense(weight, dense)
        # (c - zp) * s + off == (c - 8) * s + zero  =>  zero = off + (8 - zp) * s
        zeros = weight.scales * (8 - weight.zero_point)
        if weight.offsets is not None:
            zeros = zeros + weight.offsets
        codes, scales = weight.codes, weight.scales
        pad = -self.out_features % _INT4_ROWS
        if pad:  # the kernel takes N in multiples of 16 (a vocabulary may not be): zero rows
            codes = torch.cat([codes, codes.new_zeros(pad, codes.shape[1])])
            scales, zeros = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (scales, zeros))
        self.packed = _int4_pack(codes)
        self.scales_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(_COMPUTE_DTYPE)
        self.scales_zeros = self.scales_zeros.contiguous()  # (K / g, N, 2)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, K) -> (T, N) in x's dtype."""
        if (out := self._dense_mm(x)) is not None:
            return out
        mm = torch.ops.ttscale.int4_mm if torch.compiler.is_compiling() else _int4_mm
        out = mm(x.to(_COMPUTE_DTYPE), self.packed, self.group_size, self.scales_zeros)
        if out.shape[1] != self.out_features:
            out = out[:, : self.out_features]
        return out.to(x.dtype, memory_format=torch.contiguous_format)


def _int4_pack(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 codes -> (N, K / 2) uint8 in the int4 kernel's interleaving. The kernel
    takes int32 codes (4 bytes a value) and packs rows in blocks of _INT4_PACK_ROWS, so a
    large weight is packed in slices of whole blocks (tests/test_load_memory.py checks that this
    equals packing it at once)."""
    step = max(_INT4_PACK_ROWS, DEQUANTIZE_CHUNK // max(codes.shape[1], 1))
    step -= step % _INT4_PACK_ROWS
    packed: torch.Tensor | None = None
    for start in range(0, codes.shape[0], step):
        part = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes[start : start + step].int(), 2
        )
        if packed is None:
            packed = part.new_empty(codes.shape[0], *part.shape[1:])
        packed[start : start + len(part)] = part
    assert packed is not None
    return packed


class Int8Weight(_WithDense):
    """A (N, K) weight as int8 codes with one scale per row (symmetric, absmax / 127)."""

    def __init__(self, weight: GroupQuantized, dense: bool = True) -> None:
        self._keep_dense(weight, dense)
        n, k = weight.shape
        # Requantized in slices of rows (each row is independent): a vocabulary-sized head
        # would otherwise hold several float32 copies of itself at once while loading.
        self.codes = torch.empty(n, k, dtype=torch.int8)
        scales = torch.empty(n, dtype=torch.float32)
        step = max(1, DEQUANTIZE_CHUNK // max(k, 1))
        for start in range(0, n, step):
            rows = slice(start, start + step)
            w = weight.rows(rows).dequantize(torch.float32)
            s = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
            self.codes[rows] = torch.round(w.div_(s[:, None])).clamp_(-127, 127)
            scales[rows] = s
        self.scales = scales.to(_COMPUTE_DTYPE)
        self.out_features = n

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        if (out := self._dense_mm(x)) is not None:
            return out
        out = torch.ops.aten._weight_int8pack_mm(x.to(_COMPUTE_DTYPE), self.codes, self.scales)
        return out.to(x.dtype)


QuantizedWeight = Int4Weight | Int8Weight


def quantized_decoder(model: torch.nn.Module) -> bool:
    """Whether every matmul of the model's decoder layers computes on quantized codes (the
    default GGUF's): their kernels take bf16 activations, which is what `kv_dtype` and the
    bf16 large steps (llama.py, `LlamaForCausalLM._bf16_rows`) rest on. The LM head is not
    asked: it casts what it is given."""
    layers = getattr(model, "layers", None)
    if layers is None:
        return False
    # A ModuleList, or a plain list (a layer-skip draft's subset of its target's layers).
    linears = [m for layer in layers for m in layer.modules() if hasattr(m, "qweight")]
    return bool(linears) and all(m.qweight is not None for m in linears)


def kv_dtype(model: torch.nn.Module) -> torch.dtype:
    """The float dtype `kv_cache_dtype="auto"` stores: the weights' dtype, but bf16 for a
    model with quantized matmuls, whose kernels compute in bf16 anyway (llama.cpp keeps its
    KV in f16 likewise). Half the KV bytes of fp32 at no measurable cost: on the embedded
    model (fp32 activations), majority@16 on 100 arithmetic problems scored 34.0% with bf16
    KV and 31.0% with fp32 KV (5 / 8 problems only fp32 / only bf16 got right, McNemar
    p = 0.58; docs/BENCHMARKS.md, "Session 6")."""
    weights = next(model.parameters()).dtype
    return torch.bfloat16 if weights == torch.float32 and quantized_decoder(model) else weights


def kernel_for(weight: GroupQuantized) -> str:
    """ "int4" when the codes fit the int4 kernel as they are, else "int8" (requantized)."""
    fits = weight.bits <= 4 and weight.group_size in _INT4_GROUPS
    return "int4" if fits and weight.shape[1] % weight.group_size == 0 else "int8"


def pack_quantized(weight: GroupQuantized) -> QuantizedWeight:
    return Int4Weight(weight) if kernel_for(weight) == "int4" else Int8Weight(weight)


# --- making and joining GroupQuantized weights ---------------------------------------------------


def quantize_weight(w: torch.Tensor, mode: str) -> GroupQuantized:
    """A float (N, K) weight -> "int4" (asymmetric, groups of 32, like GGUF's Q4_1) or "int8"
    (symmetric, one scale per row: the int8 kernel's own form, so packing it is exact)."""
    w = w.detach().float()
    n, k = w.shape
    if mode == "int4":
        if k % INT4_GROUP:
            raise ModelLoadError(f"int4 needs rows of a multiple of {INT4_GROUP} values, not {k}")
        groups = w.view(n, k // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        scales = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
        codes = torch.round((groups - low.unsqueeze(-1)) / scales.unsqueeze(-1)).clamp_(0, 15)
        return GroupQuantized(
            codes.to(torch.uint8).view(n, k), scales, low, 0, INT4_GROUP, 4, "int4"
        )
    if mode == "int8":
        scales = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        codes = torch.round(w / scales[:, None]).clamp_(-127, 127) + 128
        return GroupQuantized(codes.to(torch.uint8), scales[:, None], None, 128, k, 8, "int8")
    raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, not {mode!r}")


def is_matmul_weight(name: str) -> bool:
    """HF names of the weights a Linear multiplies by (the head only when untied)."""
    return name.endswith("_proj.weight") or name == "lm_head.weight"


def quantize_tensors(
    tensors: dict[str, torch.Tensor | GroupQuantized], mode: str, source: str
) -> dict[str, torch.Tensor | GroupQuantized]:
    """`quantize="int8" | "int4"` for a float checkpoint: every 2-D matmul weight quantized.
    A checkpoint that is already quantized is refused (requantizing loses accuracy twice)."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, not {mode!r}")
    held = sorted({t.source for t in tensors.values() if isinstance(t, GroupQuantized)})
    if held:
        raise ModelLoadError(
            f"{source} is already quantized ({', '.join(held)}); quantize={mode!r} would "
            "quantize it twice: use quantize='native' (its own) or 'none'"
        )
    return {
        name: quantize_weight(t, mode) if is_matmul_weight(name) and t.dim() == 2 else t
        for name, t in tensors.items()
    }


def cat_rows(parts: list[torch.Tensor | GroupQuantized]) -> torch.Tensor | GroupQuantized:
    """Stacks weights along rows (fused q/k/v, gate/up). Quantized parts in one format stay
    as they are; mixed formats (a Q4_K_M file's Q6_K v beside Q4_K q/k) are put in a common
    one (finest group, widest codes); a float part makes the whole float."""
    if not any(isinstance(p, GroupQuantized) for p in parts):
        return torch.cat(parts, dim=0)  # type: ignore[arg-type]
    if not all(isinstance(p, GroupQuantized) for p in parts):
        dtype = next(p.dtype for p in parts if isinstance(p, torch.Tensor))
        return torch.cat([_dense(p, dtype) for p in parts], dim=0)
    quantized: list[GroupQuantized] = parts  # type: ignore[assignment]
    first = quantized[0]
    same = all(
        (p.group_size, p.zero_point, p.bits, p.offsets is None)
        == (first.group_size, first.zero_point, first.bits, first.offsets is None)
        for p in quantized
    )
    if not same:
        group = math.gcd(*(p.group_size for p in quantized))
        quantized = [_regroup(p, group) for p in quantized]
        first = quantized[0]
    offsets = None if first.offsets is None else torch.cat([p.offsets for p in quantized])  # type: ignore[misc]
    sources = dict.fromkeys(p.source for p in quantized)
    return GroupQuantized(
        codes=torch.cat([p.codes for p in quantized]),
        scales=torch.cat([p.scales for p in quantized]),
        offsets=offsets,
        zero_point=first.zero_point,
        group_size=first.group_size,
        bits=first.bits,
        source="+".join(sources),
    )


def _dense(part: torch.Tensor | GroupQuantized, dtype: torch.dtype) -> torch.Tensor:
    return part.dequantize(dtype) if isinstance(part, GroupQuantized) else part.to(dtype)


def _regroup(weight: GroupQuantized, group: int) -> GroupQuantized:
    """The same values with zero point 0 (folded into offsets), groups of `group` and 8-bit
    codes: the common format of a mixed fused weight (it goes to the int8 path anyway)."""
    repeat = weight.group_size // group
    scales = weight.scales.repeat_interleave(repeat, dim=1)
    offsets = -weight.zero_point * scales
    if weight.offsets is not None:
        offsets = offsets + weight.offsets.repeat_interleave(repeat, dim=1)
    return GroupQuantized(weight.codes, scales, offsets, 0, group, 8, weight.source)


# --- what LLM(quantize=...) loads ------------------------------------------------------------

QUANTIZE_OPTIONS = ("auto", "none", "native", *QUANTIZE_MODES)


def load_for_compute(
    model: str | Path | None, dtype: torch.dtype, quantize: str, device: str
) -> Checkpoint:
    """The checkpoint as the model will compute with it:
    - "none": every weight dequantized to `dtype` (the parity tests' setting);
    - "native": a GGUF's matmul weights in its own quantization; refused if the file has none
      or holds a type the kernels cannot take;
    - "auto": "native" where the file is quantized (a type the kernels cannot take is
      dequantized, said in one log line), else "none"; on a non-CPU device always "none";
    - "int8" / "int4": a float checkpoint's matmul weights quantized at load (refused for one
      that is already quantized).
    """
    if quantize not in QUANTIZE_OPTIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_OPTIONS)}, not {quantize!r}")
    if torch.device(device).type != "cpu":
        if quantize not in ("auto", "none"):
            raise ValueError(f"quantize={quantize!r} computes on CPU only, not on {device}")
        quantize = "none"
    checkpoint = load_checkpoint(
        model,
        dtype,
        keep_quantized=quantize in ("auto", *QUANTIZE_MODES),
        require_quantized=quantize == "native",
    )
    if quantize in QUANTIZE_MODES:
        checkpoint.tensors = quantize_tensors(checkpoint.tensors, quantize, checkpoint.source)
    elif quantize == "native" and not any(
        isinstance(t, GroupQuantized) for t in checkpoint.tensors.values()
    ):
        raise ModelLoadError(
            f"{checkpoint.source} holds no quantized weights; quantize='native' needs a quantized "
            "GGUF (use quantize='int8' or 'int4' to quantize a float model)"
        )
    return checkpoint
