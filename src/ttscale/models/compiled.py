"""The compiled forward: small steps (decode, short verification chunks) through
`torch.compile` (inductor's CPU backend), so the ops between matmuls run fused.

Why: at batch 1 a decoder layer is ~80 small eager ops (RMSNorm's 8, RoPE's ~20, the q/k/v
split, SiLU-mul, residual adds, casts around the quantized kernels), each paying Python and
dispatcher time; over 30 layers that is most of a decode step (benchmarks/profile_engine.py;
figures in docs/BENCHMARKS.md, "A decode step without eager overhead"). Inductor fuses
RMSNorm + residual, RoPE and SiLU-mul into a few C++ loops per layer and calls the matmul
kernels directly, so the host time left is the kernels' own.

How the graph stays whole: the paged attention (data-dependent gathers, per-step layouts,
any backend from attention/registry.py) is one opaque custom op, `ttscale::attend`. The op
takes tensors and the layer index only; it finds the step's `AttentionContext` in a
thread-local slot that `CompiledForward.__call__` fills for the duration of the call (the op
runs inside that call, on its thread; engines on other threads never see it). Nothing
per-engine is a graph constant, so every engine of a model shares one cached graph.
Everything else is traced once per shape family: one graph for one row (single-stream
decode), one with a symbolic row count for 2..GEMV_ROWS rows and one beyond (the quantized
Linear switches kernels there). No padding: on CPU a graph is not replayed, so what buckets
would buy (no recompiles) the symbolic row count gives without computing padding rows.

Compile cost is paid once per machine: inductor's FX-graph and AOT-autograd caches keep the
compiled kernels on disk ($TORCHINDUCTOR_CACHE_DIR, by default /tmp/torchinductor_$USER); a
warm process still traces the model with dynamo, lazily on its first small step, not in
`LLM()`.
A missing C++ compiler (or any failure to compile) falls back to eager with one log line.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ttscale.attention.base import AttentionContext
from ttscale.attention.spec import AttentionLayerSpec
from ttscale.models.quant import GEMV_ROWS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileConfig:
    """`LLM(compile=...)`: whether steps of at most `max_rows` tokens run compiled.
    Steps with hidden-state capture, and larger ones (prefill: matmul-bound, eager overhead
    negligible), always run eager. `LLM(fused=...)`: whether small steps of a quantized model
    run as one C++ call (models/fused.py); where both apply, the fused step wins."""

    enabled: bool = False
    max_rows: int = 64
    fused: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"compile must be True or False, not {self.enabled!r}")
        if not isinstance(self.fused, bool):
            raise ValueError(f"fused must be True or False, not {self.fused!r}")
        if self.max_rows < 1:
            raise ValueError(f"compile max_rows must be >= 1, not {self.max_rows}")


class _Bound(threading.local):
    """(the step's attention context, the model's layer specs) of the compiled call running
    on this thread; None outside one."""

    value: tuple[AttentionContext, Sequence[AttentionLayerSpec]] | None = None


_BOUND = _Bound()


# Registered with torch.library's low-level API (cheaper per call than `custom_op`).
_LIB = torch.library.Library("ttscale", "FRAGMENT")
_LIB.define("attend(Tensor q, Tensor k, Tensor v, int layer) -> Tensor")


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    """The bound context's attention of one layer: stores k/v, returns (T, H, D). Opaque to
    the compiler (it writes the KV cache, which the graph never sees)."""
    assert _BOUND.value is not None, "ttscale::attend outside a compiled forward"
    attn, specs = _BOUND.value
    return attn(specs[layer], q, k, v)


_LIB.impl("attend", _attend, "CompositeExplicitAutograd")


@torch.library.register_fake("ttscale::attend", lib=_LIB)
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int):
    return torch.empty_like(q)


class _OpAttention:
    """What the traced model calls instead of the attention context: the custom op."""

    def __call__(
        self, spec: AttentionLayerSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        return torch.ops.ttscale.attend(q, k, v, spec.layer_idx)


class CompiledForward:
    """`model(input_ids, positions, attn, capture)` with small capture-free steps compiled.

    `max_position`: the largest position a step may hold (the engine's context); the RoPE
    table is built that long up front, so no step grows it inside the graph.
    """

    def __init__(self, model: torch.nn.Module, config: CompileConfig, max_position: int) -> None:
        self.model, self.config = model, config
        self._attn = _OpAttention()
        self._specs = model.attention_specs
        self.failed: str | None = None  # why compiling failed; then every step runs eager
        self._compiled = None
        self._families: set[int] = set()  # shape families compiled so far
        if config.enabled:
            model.rotary.reserve(max_position)
            self._compiled = torch.compile(self._traced, fullgraph=True)

    def _traced(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # The forward without its @inference_mode (the caller holds it): traced, the mode
        # switch is a private torch call that makes AOT autograd refuse to cache the graph.
        forward = type(self.model).forward
        forward = getattr(forward, "__wrapped__", forward)
        return forward(self.model, input_ids, positions, self._attn, None)

    def uses_graph(self, num_tokens: int, capture: object | None) -> bool:
        return (
            self._compiled is not None
            and self.failed is None
            and capture is None
            and num_tokens <= self.config.max_rows
        )

    def _family(self, input_ids: torch.Tensor, positions: torch.Tensor) -> int:
        """Which graph a step of T rows runs: 1 row (static), 2..GEMV_ROWS or more (a
        symbolic row count each; the quantized Linear changes kernels between them)."""
        rows = input_ids.shape[0]
        if rows == 1:
            return 0
        low, high = (2, GEMV_ROWS) if rows <= GEMV_ROWS else (GEMV_ROWS + 1, self.config.max_rows)
        for t in (input_ids, positions):
            torch._dynamo.mark_dynamic(t, 0, min=low, max=max(high, low + 1))
        return 1 if rows <= GEMV_ROWS else 2

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionContext,
        capture: object | None = None,
    ) -> torch.Tensor:
        if not self.uses_graph(input_ids.shape[0], capture):
            return self.model(input_ids, positions, attn, capture)
        family = self._family(input_ids, positions)
        with self._bound(attn):
            try:
                with torch.inference_mode(), self._stance(family):
                    hidden = self._compiled(input_ids, positions)  # type: ignore[misc]
                self._families.add(family)
                return hidden
            except Exception as e:  # no C++ compiler, an inductor bug: eager from now on
                if not _is_compile_error(e):
                    raise
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log.warning("torch.compile failed (%s); running eager", self.failed)
        return self.model(input_ids, positions, attn, capture)

    def _stance(self, family: int):
        """Once a family's graph exists, dynamo checks only the guards that tell the graphs
        apart (the row count), not the ~hundreds on weights that never change: that lookup
        was ~4 ms of a decode step. A family's first call compiles with every guard."""
        if family in self._families:
            return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
        return contextlib.nullcontext()

    @contextmanager
    def _bound(self, attn: AttentionContext) -> Iterator[None]:
        previous, _BOUND.value = _BOUND.value, (attn, self._specs)
        try:
            yield
        finally:
            _BOUND.value = previous


def _is_compile_error(e: Exception) -> bool:
    """Failures of the compiler itself (fall back), not errors the model raises (re-raise)."""
    from torch._dynamo.exc import BackendCompilerFailed, TorchDynamoException

    return isinstance(e, (BackendCompilerFailed, TorchDynamoException, OSError)) or (
        type(e).__module__.startswith("torch._inductor")
    )
