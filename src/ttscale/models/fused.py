"""Small steps' decoder layers in one C++ call (csrc/fused_decode.cpp).

Why: at batch 1 the eager forward is ~80 small ops per layer between four matmuls; their
Python and dispatcher time was 60% of a decode step of the embedded model (9.97 ms forward
of which 2.9 ms int4 matmuls; benchmarks/profile_engine.py). `torch.compile` removed little
of it on this machine (1.07x quiet, docs/BENCHMARKS.md) and costs a minute of tracing per
process. The extension runs every layer in C++: the same int4 / int8 weight-only kernels,
the small ops fused into loops, and paged attention read straight from the block pool
(no gathered copy of the context). Python runs once per step: the embedding, this call,
the final norm.

What it takes (`fused_unsupported` says why not, and the engine then runs eager):
- a Llama-family model on CPU whose decoder matmuls are quantized (models/quant.py: the
  GGUF's own Q4 codes, or quantize="int4"/"int8") or bf16 (dtype="bfloat16"); no q/k norm,
  no soft cap, no window;
- an fp32, bf16 or int8 KV pool (kivi pools run eager), dense or block top-k (the selection
  of attention/sparse.py, the pool's block mean keys kept up on every write);
- per step: at most MAX_ROWS tokens (decode rows, verification chunks, small prefills; rows
  over quant.GEMV_ROWS use the matmuls' oneDNN bf16 copies) and no hidden-state capture.
Each row visits its own context in place (no cascade pass); the rows of one KV head run
back to back, so a prefix forks share comes from memory once and from cache after
(`FusedDecode.kv_reads` reports it so to the cost model).

The extension is compiled on first use with the machine's C++ compiler
(torch.utils.cpp_extension, -O3 -march=native, ninja from the pip package; ~30 s once,
cached in $TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions, keyed by source and CPU
flags).
`make setup` builds it. A build failure logs one line and the engine runs eager.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ttscale.attention.metadata import AttentionMetadata
from ttscale.attention.sparse import BlockTopK, kept_tokens, sparse_row_indices
from ttscale.attention.spec import AttentionLayerSpec
from ttscale.kvcache.pool import KVCache
from ttscale.kvcache.quant import Int8KVCache
from ttscale.models.layers import Linear
from ttscale.models.quant import GEMV_ROWS, Int4Weight, Int8Weight

log = logging.getLogger(__name__)

# The most tokens a fused step takes. Beyond, steps are prefill chunks: matmul-bound, where
# the eager forward's per-op overhead is small against the matmuls.
MAX_ROWS = 64

SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "fused_decode.cpp"


def _cpu_tag() -> str:
    """A short hash of this CPU's instruction-set flags: -march=native code built on one CPU
    may not run on another, so each gets its own build."""
    flags = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags += line
                break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _put_ninja_on_path() -> None:
    """torch builds with the `ninja` on PATH; the pip package's binary lives in the venv's
    bin, which a caller such as `make` need not have on PATH."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return  # load() then says ninja is missing, and the engine runs eager
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def load_extension() -> ModuleType | None:
    """The compiled extension, built on first call; None (with one log line) if it cannot
    be built here (no compiler, no ninja, an unsupported platform)."""
    try:
        from torch.utils.cpp_extension import load

        _put_ninja_on_path()
        return load(
            name=f"ttscale_fused_decode_{_cpu_tag()}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # any build failure means: run eager
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        name = type(e).__name__
        log.warning("fused decode step unavailable (%s: %s); running eager", name, first)
        return None


def fused_unsupported(model: torch.nn.Module, cache: KVCache) -> str | None:
    """Why `model` over `cache` cannot run fused steps; None if it can."""
    from ttscale.models.llama import LlamaForCausalLM

    if not isinstance(model, LlamaForCausalLM):
        return f"{type(model).__name__} is not a Llama-family decoder"
    if cache.device.type != "cpu":
        return f"device {cache.device} (the extension is CPU code)"
    if cache.quantized and not isinstance(cache, Int8KVCache):
        return f"KV pool {type(cache).__name__} (the fused loops read float and int8 pools)"
    if not cache.quantized and cache.k.dtype not in (torch.float32, torch.bfloat16):
        return f"KV pool dtype {cache.k.dtype}"
    c = model.config
    if c.head_dim % 16 or c.head_dim > 128 or c.num_attention_heads > 8 * c.num_key_value_heads:
        return "head_dim not a multiple of 16 up to 128, or over 8 query heads per KV head"
    if cache.block_size > 64:
        return f"block_size {cache.block_size} > 64"
    dtype = model.norm.weight.dtype
    if dtype not in (torch.float32, torch.bfloat16):
        return f"model dtype {dtype}"
    for spec in model.attention_specs:
        if spec.sliding_window is not None or spec.soft_cap is not None:
            return f"layer {spec.layer_idx} has a window or a soft cap"
        if spec.sparsity is not None and not isinstance(spec.sparsity, BlockTopK):
            return f"layer {spec.layer_idx}'s sparsity {spec.sparsity!r}"
    for i, layer in enumerate(model.layers):
        if layer.self_attn.q_norm is not None:
            return "per-head q/k norms (Qwen3)"
        for linear in _linears(layer):
            if _kind(linear) is None:
                return (
                    f"layer {i} has fp32 matmul weights (fused steps take quantized or bf16 "
                    "ones: a quantized model, or dtype='bfloat16')"
                )
            if linear.bias is not None and linear is not layer.self_attn.qkv_proj:
                return f"layer {i} has a bias outside q/k/v"
    return None


def _kind(linear: Linear) -> int | None:
    """The extension's kernel for a Linear: 0 int4, 1 int8 (each with its oneDNN bf16 copy
    for steps over GEMV_ROWS rows, when kept), 2 a bf16 weight packed for oneDNN; None: none
    fits (an fp32 weight: the loops hand the matmuls bf16 activations)."""
    if isinstance(linear.qweight, Int4Weight):
        return 0
    if isinstance(linear.qweight, Int8Weight):
        return 1
    if linear.packed is not None and linear.packed.dtype == torch.bfloat16:
        return 2
    return None


def _dense(linear: Linear) -> torch.Tensor | None:
    """The oneDNN-packed bf16 weight of a Linear, if it has one."""
    if linear.qweight is not None:
        return linear.qweight.dense
    return linear.packed


def _linears(layer: Any) -> list[Linear]:
    return [
        layer.self_attn.qkv_proj,
        layer.self_attn.o_proj,
        layer.mlp.gate_up_proj,
        layer.mlp.down_proj,
    ]


def make_fused(
    model: torch.nn.Module, cache: KVCache, specs: Sequence[AttentionLayerSpec], enabled: bool
) -> tuple[FusedDecode | None, str | None]:
    """The engine's fused step for `model` over `cache`, or None and why not."""
    if not enabled:
        return None, "fused=False"
    reason = fused_unsupported(model, cache)
    if reason is not None:
        return None, reason
    ext = load_extension()
    if ext is None:
        return None, "the extension did not build (see the log)"
    return FusedDecode(model, cache, ext, specs), None


class FusedDecode:
    """The decoder stack of `model` as one C++ object over `cache`'s pools; `accepts` says
    whether a step can run here, `__call__` runs it (embedding and final norm in Python).
    `specs`: the engine's layer specs (block top-k on the layers it sparsifies)."""

    def __init__(
        self,
        model: torch.nn.Module,
        cache: KVCache,
        ext: ModuleType,
        specs: Sequence[AttentionLayerSpec],
    ) -> None:
        self.model, self.cache = model, cache
        c = model.config
        self.stack = ext.DecodeStack(
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.hidden_size,
            c.intermediate_size,
            float(c.rms_norm_eps),
            float(specs[0].scale),
            GEMV_ROWS,
        )
        dtype = model.norm.weight.dtype
        linears = [linear for layer in model.layers for linear in _linears(layer)]
        # Steps over GEMV_ROWS rows need every matmul's oneDNN copy (quantize keeps one
        # unless memory was asked for: quant._WithDense).
        self.max_rows = MAX_ROWS if all(_dense(x) is not None for x in linears) else GEMV_ROWS
        sparse = [isinstance(spec.sparsity, BlockTopK) for spec in specs]
        self.sparse_layers = sum(sparse)
        window = next((s.sparsity.window for s in specs if isinstance(s.sparsity, BlockTopK)), 0)
        self.window_blocks = -(-window // cache.block_size)
        for layer, layer_sparse in zip(model.layers, sparse, strict=True):
            operands = [self._operands(ext, linear, dtype) for linear in _linears(layer)]
            self.stack.add_layer(
                layer.input_layernorm.weight.detach().to(dtype),
                layer.post_attention_layernorm.weight.detach().to(dtype),
                operands,
                layer_sparse,
            )

    @staticmethod
    def _operands(ext: ModuleType, linear: Linear, dtype: torch.dtype) -> Any:
        w, kind, dense = linear.qweight, _kind(linear), _dense(linear)
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        if isinstance(w, Int4Weight):
            return ext.make_linear(kind, w.packed, w.scales_zeros, w.group_size, bias, dense)
        if isinstance(w, Int8Weight):
            return ext.make_linear(kind, w.codes, w.scales, 0, bias, dense)
        empty = torch.empty(0)
        return ext.make_linear(kind, empty, empty, 0, bias, dense)

    def accepts(self, meta: AttentionMetadata, capture: object | None) -> bool:
        """Steps of at most `max_rows` tokens without hidden-state capture."""
        return capture is None and len(meta.slot_mapping) <= self.max_rows

    def _budgets(self, meta: AttentionMetadata) -> list[int] | None:
        """Per sequence, its block top-k budget where it reads sparsely this step
        (`sparse.sparse_row_indices`, the rule every backend uses), else 0; None: none does."""
        if meta.kv_budgets is None or not self.sparse_layers:
            return None
        rows = sparse_row_indices(meta.query_lens, meta.context_lens, meta.kv_budgets)
        if not rows:
            return None
        budgets = [0] * len(meta.query_lens)
        for i in rows:
            budgets[i] = meta.kv_budgets[i]  # type: ignore[assignment]
        return budgets

    def kv_reads(self, meta: AttentionMetadata) -> dict[str, int]:
        """What the step's attention read from memory, per layer (mean over layers), for the
        cost model. Each row visits its whole context in place, but the rows of one KV head
        run back to back, so a block several rows share (a fork group's prefix) comes from
        memory once and from cache after: `kv_tokens_read` counts distinct blocks (a row's
        partial last block is its own), `kv_tokens_shared` the full blocks more than one
        sequence reads. Less what block top-k skipped, and the block mean keys it scored
        (attention/base.py's accounting of both)."""
        bs = meta.block_size
        readers: Counter[int] = Counter()
        partial = 0
        for table, context in zip(meta.block_tables, meta.context_lens, strict=True):
            full = context // bs
            readers.update(table[:full])
            partial += context - full * bs
        shared = sum(1 for n in readers.values() if n > 1) * bs
        skipped = scored = 0.0
        budgets = self._budgets(meta)
        if budgets is not None:
            share = self.sparse_layers / len(self.model.layers)
            for c, b in zip(meta.context_lens, budgets, strict=True):
                if b:
                    skipped += (c - kept_tokens(c, b, bs)) * share
                    scored += -(-c // bs) * share
        read = max(0, len(readers) * bs + partial - round(skipped))
        return {
            "kv_tokens_read": read,
            "kv_tokens_shared": min(shared, read),
            "shared_groups": 0,  # no separate prefix pass to pay for
            "kv_blocks_scored": round(scored),
            "kv_tokens_skipped": round(skipped),
        }

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids, positions: (T,) -> hidden states (T, hidden) after the final norm; the
        layers' K/V are written into the cache at `meta.slot_mapping` as the eager path does."""
        model, cache = self.model, self.cache
        tables: list[list[int]] = []
        budgets: list[int] = []
        per_seq = self._budgets(meta)
        for i, (table, q_len) in enumerate(zip(meta.block_tables, meta.query_lens, strict=True)):
            tables += [table] * q_len
            budgets += [per_seq[i] if per_seq is not None else 0] * q_len
        width = max(len(t) for t in tables)
        table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
        cos, sin = model.rotary._table(int(positions.max()) + 1, positions.device)
        quantized = isinstance(cache, Int8KVCache)
        with torch.inference_mode():
            x = model.embed_tokens(input_ids).contiguous()
            x = self.stack.forward(
                x,
                table_t,
                positions + 1,
                meta.slot_mapping,
                cos.index_select(0, positions),
                sin.index_select(0, positions),
                cache.k,
                cache.v,
                cache.k_scale if quantized else None,
                cache.v_scale if quantized else None,
                cache.key_means,
                torch.tensor(budgets) if per_seq is not None else None,
                self.window_blocks,
                meta.block_size,
            )
            return model.norm(x)
