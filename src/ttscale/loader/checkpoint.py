"""What every loader returns: an HF-style config, HF-named tensors and the tokenizer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ttscale.tokenizer import Tokenizer

# Values per slice when a quantized weight is turned into floats piece by piece (a 4 MiB
# float32 temporary): loading then peaks near the final size, not at a float32 copy more.
DEQUANTIZE_CHUNK = 1 << 20


@dataclass(frozen=True)
class GroupQuantized:
    """A weight matrix kept in its quantized form: integer codes with one affine map per group
    of `group_size` consecutive values of a row (g = k // group_size),
    `w[n, k] = (codes[n, k] - zero_point) * scales[n, g] + offsets[n, g]`.

    Every GGUF block type is this form, with the file's own arithmetic (Q4_0: zero point 8,
    no offsets; Q4_1: scale d, offset m; the K-quants' sub-blocks are the groups), so
    `dequantize` is bit-identical to gguf-py's. `quantize="int4"` makes the same form;
    `models/quant.py` turns it into a kernel's layout.
    """

    codes: torch.Tensor  # (N, K) uint8, each < 2**bits
    scales: torch.Tensor  # (N, K // group_size) float32
    offsets: torch.Tensor | None  # (N, K // group_size) float32; None: no offset (not even +0.0)
    zero_point: int
    group_size: int
    bits: int
    source: str  # what it came from ("Q4_1", "int4"), for messages

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The values in `dtype`, computed in float32. Another dtype is filled in slices of
        rows, so a large weight (a vocabulary's head) never has a whole float32 copy beside
        the result: the same operations per element, so the same values."""
        n, k = self.codes.shape
        if dtype == torch.float32:
            return self._dequantize_rows(slice(None))
        out = torch.empty(n, k, dtype=dtype, device=self.codes.device)
        step = max(1, DEQUANTIZE_CHUNK // max(k, 1))
        for start in range(0, n, step):
            rows = slice(start, start + step)
            out[rows] = self._dequantize_rows(rows)
        return out

    def _dequantize_rows(self, rows: slice) -> torch.Tensor:
        codes = self.codes[rows]
        n, k = codes.shape
        groups = codes.reshape(n, k // self.group_size, self.group_size).float()
        if self.zero_point:
            groups = groups.sub_(self.zero_point)
        w = groups.mul_(self.scales[rows].unsqueeze(-1))
        if self.offsets is not None:
            w = w.add_(self.offsets[rows].unsqueeze(-1))
        return w.view(n, k)

    def rows(self, index: torch.Tensor | slice) -> GroupQuantized:
        """The same weight restricted to some rows (a permutation, a slice)."""
        offsets = None if self.offsets is None else self.offsets[index].contiguous()
        return dataclasses.replace(
            self,
            codes=self.codes[index].contiguous(),
            scales=self.scales[index].contiguous(),
            offsets=offsets,
        )


@dataclass
class Checkpoint:
    config: dict[str, Any]  # the content of a config.json
    # Hugging Face parameter names; GroupQuantized only where the caller asked to keep a
    # GGUF's quantization (load_checkpoint(keep_quantized=True)), and only for matmul weights.
    tensors: dict[str, torch.Tensor | GroupQuantized]
    tokenizer: Tokenizer
    source: str  # path it came from, for messages
