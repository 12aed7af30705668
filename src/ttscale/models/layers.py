"""Building blocks shared by the Llama-family decoders: RMSNorm and rotary embeddings."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ttscale.errors import ModelLoadError
from ttscale.loader.checkpoint import GroupQuantized
from ttscale.models.quant import QuantizedWeight, onednn_linear, pack_quantized


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Linear(nn.Module):
    """y = x W^T + b; on CPU, with W pre-packed once for oneDNN's GEMM kernels.

    Why: at the batch sizes of parallel sampling (4-64 rows), MKL's sgemm behind `F.linear`
    is far from memory-bound; oneDNN with a pre-packed ("blocked") weight runs the same
    products several times faster at the same memory (benchmarks/bench_linear.py; figures in
    docs/BENCHMARKS.md, "Why the matmuls go through oneDNN"). It is what torch.compile's CPU
    freezing pass uses.
    Without oneDNN, W is stored transposed and `x @ W_t` is used (faster than `F.linear` for
    one row, same table). On CUDA, cuBLAS needs neither: `F.linear`.

    `weight` keeps the checkpoint's (out, in) shape until `pack()`, so loading and shape
    checks follow the checkpoint's names and layout.

    A quantized weight (`load_quantized`: a GGUF's own blocks, or quantize="int4"/"int8")
    replaces `weight`; `pack()` puts it in an int4 or int8 CPU kernel's layout (models/quant.py):
    decode-sized steps run on the codes, steps of many rows on a bf16 copy (quant.GEMV_ROWS).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.packed: torch.Tensor | None = None  # oneDNN blocked layout (CPU)
        self.quantized: GroupQuantized | None = None  # as loaded, until pack()
        self.qweight: QuantizedWeight | None = None  # in its kernel's layout (CPU)
        # A buffer, so `.to(device)` would move it; not persistent: checkpoints keep HF layout.
        self.register_buffer("weight_t", None, persistent=False)

    def load_quantized(self, weight: GroupQuantized) -> None:
        """Takes a quantized (out, in) weight instead of a float one (CPU only)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ModelLoadError(
                f"quantized weight of shape {tuple(weight.shape)} for a Linear of "
                f"{(self.out_features, self.in_features)}"
            )
        self.quantized = weight
        self.register_parameter("weight", None)

    def pack(self) -> None:
        """Switches to the fast layout for the weight's device (call after moving the model).
        The original is released unless something else, such as a tied embedding, holds it.
        A Linear already packed is left as it is."""
        if self.qweight is not None or self.packed is not None or self.weight_t is not None:
            return
        if self.quantized is not None:
            self.qweight, self.quantized = pack_quantized(self.quantized), None
            self.register_parameter("weight", None)  # a tied head drops its float alias
            return
        weight = self.weight.detach()
        if weight.device.type != "cpu":
            return
        if _onednn_available() and weight.dtype in (torch.float32, torch.bfloat16):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        else:
            self.weight_t = weight.t().contiguous()
        del self.weight
        self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            shape = x.shape
            out = self.qweight.mm(x.reshape(-1, self.in_features))
            out = out if self.bias is None else out + self.bias.to(out.dtype)
            return out.view(*shape[:-1], self.out_features)
        if self.packed is not None:
            shape = x.shape
            out = onednn_linear(
                x.reshape(-1, self.in_features), self.packed, self.bias, self.out_features
            )
            return out.view(*shape[:-1], self.out_features)
        if self.weight_t is not None:
            out = x @ self.weight_t
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.weight, self.bias)


class QuantizedEmbedding(nn.Module):
    """An embedding table kept in its quantized form (a GGUF's own blocks): a lookup
    dequantizes only the rows it reads, with `GroupQuantized.dequantize`'s arithmetic, so
    it returns exactly what `nn.Embedding` over the dequantized table would. For the
    embedded model that is 30 MiB of codes and scales instead of a 108 MiB float32 table."""

    def __init__(self, weight: GroupQuantized, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.dtype = dtype
        self.zero_point, self.group_size = weight.zero_point, weight.group_size
        # Buffers, so `.to(device)` moves them; not persistent: checkpoints keep HF layout.
        self.register_buffer("codes", weight.codes, persistent=False)
        self.register_buffer("scales", weight.scales, persistent=False)
        self.register_buffer("offsets", weight.offsets, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # GroupQuantized.dequantize's operations, in its order, on the rows read only.
        ids = input_ids.reshape(-1)
        groups = self.codes[ids].view(ids.shape[0], -1, self.group_size).float()
        if self.zero_point:
            groups = groups.sub_(self.zero_point)
        rows = groups.mul_(self.scales[ids].unsqueeze(-1))
        if self.offsets is not None:
            rows = rows.add_(self.offsets[ids].unsqueeze(-1))
        return rows.to(self.dtype).view(*input_ids.shape, self.embedding_dim)


class RMSNorm(nn.Module):
    """y = x / rms(x) * w, computed in fp32 like transformers (then cast back)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        # In the input's dtype: a model may run a step in bf16 over fp32 norm weights
        # (llama.py, _bf16_rows); a no-op cast otherwise.
        return self.weight.to(dtype) * x.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies of RoPE (Su et al. 2021), with Llama-3 / linear context scaling.
    Computed on the CPU whatever the default device: under build_model's meta device the
    arithmetic would go through torch._refs, which imports torch._dynamo (~150 MiB)."""
    steps = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu")
    inv_freq = 1.0 / (theta ** (steps.float() / head_dim))
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between
        # (same arithmetic as transformers' _compute_llama3_parameters).
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ModelLoadError(f"rope_scaling type {kind!r} is not supported (supported: llama3, linear)")


class RotaryEmbedding(nn.Module):
    """Applies RoPE to flattened tokens at arbitrary positions (no batch x max_len layout)."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)
        self._cos = self._sin = torch.empty(0)

    def _table(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Grown on demand: a 128k-context model should not pay for 128k rows up front.
        if self._cos.shape[0] < length or self._cos.device != device:
            size = max(length, 2 * self._cos.shape[0], 1024)
            t = torch.arange(size, dtype=torch.float32, device=device)
            freqs = torch.outer(t, self.inv_freq.to(device))
            emb = torch.cat((freqs, freqs), dim=-1)  # (size, head_dim), HF's rotate_half layout
            self._cos, self._sin = emb.cos(), emb.sin()
        return self._cos, self._sin

    def reserve(self, length: int) -> None:
        """Builds the table for positions < `length` now. A compiled forward cannot grow it
        (reading `positions.max()` would break the graph), so it reserves the context."""
        self._table(length, self.inv_freq.device)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,); q: (T, H, D); k: (T, KVH, D)."""
        if torch.compiler.is_compiling():  # reserved up front (models/compiled.py)
            cos_table, sin_table = self._cos, self._sin
        else:
            cos_table, sin_table = self._table(int(positions.max()) + 1, positions.device)
        cos = cos_table[positions].unsqueeze(1).to(q.dtype)  # (T, 1, D)
        sin = sin_table[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
