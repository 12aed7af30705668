"""What-if mode: price a test-time-scaling run without running the model.

The run simulated is parallel sampling: N samples of one prompt of P tokens, G tokens each.

  prefill   one step. With prefix sharing the prompt is computed once and the N samples fork
            from it (one logits row, from which each sample draws its first token); without,
            the N copies are computed side by side (N logits rows).
  decode    G - 1 steps of batch N (the first generated token comes from the prefill logits,
            each decode step feeds the previous token and samples the next). At decode step
            j = 1 .. G-1 each sample attends to P + j tokens.
            KV read at step j:
              prefix read once (sharing, and an attention path that reads a shared block
              once for the group):  S + N * (P - S + j)
              otherwise:            N * (P + j)
            with S the shared prefix tokens (P, or the whole blocks of it when block_size is
            given: the prompt's last partial block is copied on write by each sample).

`run_steps` lists these steps as `StepShape`s; `estimate` sums `step_cost` over them in closed
form (roofline time vectorised over steps), so G = 32k is instant. Every phase is reported in
FLOPs and bytes, held against the hardware roofline, and combined into Kinetics' eFLOPs
(Sadhukhan et al., 2025; see pricing.py).

Search strategies (beam, DVTS, tree, adaptive) are approximated as N samples sharing the
prompt: a real search re-forks branches from each other as it goes (more sharing, less KV),
prunes and restarts branches, and calls a verifier; none of that is modelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ttscale.cost.hardware import (
    DTYPE_BYTES,
    Bound,
    Hardware,
    normalize_dtype,
    roofline_time,
)
from ttscale.cost.pricing import BLOCK_MEAN_BYTES, LOGIT_BYTES, StepCost, step_cost
from ttscale.cost.shapes import ModelShape, StepShape
from ttscale.cost.steptime import StepTimeModel
from ttscale.strategy_spec import StrategySpec, parse_strategy_spec

# The engine's default KV block size, which block top-k reads in (CacheConfig.block_size).
SPARSE_BLOCK = 16

# --------------------------------------------------------------------------- strategies

# canonical name -> (approximate, note); specs are parsed by ttscale.strategy_spec.
_PRICING: dict[str, tuple[bool, str]] = {
    "greedy": (False, "one greedy sample"),
    "sample": (False, "one sample"),
    "majority": (False, "N samples, majority vote on the answers"),
    "weighted": (False, "N samples, reward-weighted vote (reward model not priced)"),
    "bon": (False, "best of N samples (reward model not priced)"),
    "beam": (
        True,
        "beam search, N beams of width M: approximated as N samples sharing the prompt",
    ),
    "dvts": (
        True,
        "diverse verifier tree search, N branches in subtrees of M: approximated as N samples "
        "sharing the prompt",
    ),
    "tree": (True, "tree search, N active branches: approximated as N samples"),
    "adaptive": (True, "adaptive sampling up to N: priced at its maximum, N samples"),
}


@dataclass(frozen=True)
class StrategyCostProfile:
    """A strategy reduced to what the cost model prices: how many samples run at once, and
    whether pricing it as N samples sharing the prompt is only an approximation."""

    spec: StrategySpec

    @property
    def kind(self) -> str:
        return self.spec.name

    @property
    def num_samples(self) -> int:
        """N: parallel samples / active branches."""
        return self.spec.n

    @property
    def width(self) -> int | None:
        """M of beam@N/M, dvts@N/M."""
        return self.spec.m

    @property
    def approximate(self) -> bool:
        return _PRICING[self.kind][0]

    @property
    def note(self) -> str:
        return _PRICING[self.kind][1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.canonical,
            "kind": self.kind,
            "num_samples": self.num_samples,
            "width": self.width,
            "approximate": self.approximate,
            "note": self.note,
        }


def strategy_cost_profile(spec: str) -> StrategyCostProfile:
    """The cost profile of a strategy spec (see ttscale.strategy_spec: case-insensitive, with
    aliases such as `sample@8` and `best-of@8`); a bad spec raises StrategySpecError."""
    return StrategyCostProfile(parse_strategy_spec(spec))


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class RunSpec:
    """The shape of a parallel-sampling run (validated; see the module docstring)."""

    prompt_len: int
    gen_len: int
    num_samples: int
    share_prefix: bool = True
    # Whether attention reads a shared prefix block once for all samples (None: as
    # share_prefix). Sharing memory but gathering per sequence gives read_prefix_once=False.
    read_prefix_once: bool | None = None
    block_size: int | None = None  # None: sharing at token granularity
    # Block top-k sparse decode (attention/sparse.py): each sample's decode row reads at most
    # `kv_budget` tokens (whole blocks of `block_size`, default 16) on `sparse_layers` of
    # `num_layers` layers, once its context exceeds the budget. None: dense.
    kv_budget: int | None = None
    num_layers: int | None = None
    sparse_layers: int | None = None

    def __post_init__(self) -> None:
        if self.kv_budget is not None:
            if self.num_layers is None or self.sparse_layers is None:
                raise ValueError("invalid run: kv_budget needs num_layers and sparse_layers")
            if not 0 <= self.sparse_layers <= self.num_layers:
                raise ValueError("invalid run: sparse_layers must be in [0, num_layers]")
            if isinstance(self.kv_budget, bool) or not isinstance(self.kv_budget, int):
                raise ValueError(f"invalid run: kv_budget={self.kv_budget!r} must be an integer")
            if self.kv_budget < 2 * (self.block_size or SPARSE_BLOCK):
                raise ValueError(
                    f"invalid run: kv_budget={self.kv_budget} must hold at least the sink and "
                    "the current block"
                )
        for f in ("prompt_len", "gen_len", "num_samples"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid run: {f}={value!r} must be an integer >= 1")
        if self.block_size is not None and (
            isinstance(self.block_size, bool)
            or not isinstance(self.block_size, int)
            or self.block_size < 1
        ):
            raise ValueError(f"invalid run: block_size={self.block_size!r} must be >= 1")
        if self.read_prefix_once is None:
            object.__setattr__(self, "read_prefix_once", self.share_prefix)
        if self.read_prefix_once and not self.share_prefix:
            raise ValueError("invalid run: read_prefix_once needs share_prefix")

    @property
    def decode_steps(self) -> int:
        return self.gen_len - 1

    def _shareable_tokens(self) -> int:
        """Prompt tokens whose KV blocks stay shared once the samples start writing: all of
        them at token granularity (or before any decode step); with paging only the whole
        blocks, as the first write into the prompt's partial last block copies it."""
        if self.block_size is None or self.decode_steps == 0:
            return self.prompt_len
        return self.prompt_len // self.block_size * self.block_size

    @property
    def shared_tokens(self) -> int:
        """S: prompt tokens whose KV the samples share (0 without sharing)."""
        return self._shareable_tokens() if self.share_prefix else 0

    def _slots(self, tokens: int) -> int:
        """KV slots that `tokens` tokens occupy: rounded up to whole blocks when paged."""
        b = self.block_size
        return tokens if b is None else -(-tokens // b) * b

    def peak_kv_tokens(self, shared: bool) -> int:
        """KV slots held at the end of the run, with or without prefix sharing (every sample
        at P + G - 1 tokens: the last sampled token is never fed back, so its KV is never
        written)."""
        end = self.prompt_len + self.decode_steps
        if not shared:
            return self.num_samples * self._slots(end)
        s = self._shareable_tokens()
        return self._slots(s) + self.num_samples * self._slots(end - s)


def sparse_reads(run: RunSpec, context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sample and sparse layer at each context: (tokens read, blocks scored), as the
    engine counts them. A row whose context fits the budget reads densely and scores
    nothing; past it, it reads its budget in whole blocks (the current block's unwritten
    tail is not read) and scores every block of its context (Kinetics Eq. 9's search)."""
    assert run.kv_budget is not None
    b = run.block_size or SPARSE_BLOCK
    blocks = -(-context // b)
    keep = np.minimum(run.kv_budget // b, blocks)
    sparse = context > run.kv_budget
    read = np.where(sparse, keep * b - (blocks * b - context), context)
    return read, np.where(sparse, blocks, 0)


def prefill_step(run: RunSpec) -> StepShape:
    """The prefill: the prompt once (sharing) or N times (no sharing)."""
    p = run.prompt_len
    copies = 1 if run.share_prefix else run.num_samples
    return StepShape((p,) * copies, (p,) * copies, num_logits=copies)


def decode_step(run: RunSpec, j: int) -> StepShape:
    """Decode step j (1-based): each of the N samples feeds one token at context P + j."""
    if not 1 <= j <= run.decode_steps:
        raise ValueError(f"decode step {j} outside 1..{run.decode_steps}")
    n, c = run.num_samples, run.prompt_len + j
    if run.kv_budget is not None and c > run.kv_budget:
        return _sparse_decode_step(run, c)
    if run.read_prefix_once and n > 1 and run.shared_tokens:
        s = run.shared_tokens
        return StepShape(
            (1,) * n,
            (c,) * n,
            kv_tokens_read=s + n * (c - s),
            num_logits=n,
            kv_tokens_shared=s,
            shared_groups=1,
        )
    return StepShape((1,) * n, (c,) * n, kv_tokens_read=n * c, num_logits=n)


def _sparse_decode_step(run: RunSpec, c: int) -> StepShape:
    """A decode step past the budget: dense layers read as dense (prefix once), sparse
    layers read each row's budget; per-layer counts are means over layers."""
    n = run.num_samples
    assert run.num_layers is not None and run.sparse_layers is not None
    f = run.sparse_layers / run.num_layers
    read, scored = (int(x[0]) for x in sparse_reads(run, np.array([c])))
    s = run.shared_tokens if run.read_prefix_once and n > 1 else 0
    dense_read = s + n * (c - s)
    return StepShape(
        (1,) * n,
        (c,) * n,
        kv_tokens_read=round((1 - f) * dense_read + f * n * read),
        num_logits=n,
        kv_tokens_shared=round((1 - f) * s),
        shared_groups=1 if s else 0,
        kv_blocks_scored=round(f * n * scored),
        kv_tokens_skipped=round(f * n * (c - read)),
    )


def run_steps(run: RunSpec) -> list[StepShape]:
    """Every step of the run, in order (what `estimate` sums in closed form)."""
    return [prefill_step(run), *(decode_step(run, j) for j in range(1, run.decode_steps + 1))]


# --------------------------------------------------------------------------- estimate


@dataclass(frozen=True)
class PhaseEstimate:
    """One phase of the run held against the roofline."""

    name: str
    steps: int
    tokens: int  # new tokens computed
    cost: StepCost
    compute_time: float  # sum over steps of FLOPs / peak
    memory_time: float  # sum over steps of bytes / bandwidth
    time: float  # sum over steps of max(compute, memory): the roofline lower bound
    bound: Bound  # which of the two summed terms is larger
    efflops: float  # FLOPs + I * bytes
    # Wall time this engine is predicted to take on the calibrated machine (steptime.py);
    # None without a step-time calibration for the model.
    predicted_time: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "steps": self.steps,
            "tokens": self.tokens,
            **self.cost.to_dict(),
            "compute_time_s": self.compute_time,
            "memory_time_s": self.memory_time,
            "time_s": self.time,
            "bound": self.bound,
            "efflops": self.efflops,
            "predicted_time_s": self.predicted_time,
        }


@dataclass(frozen=True)
class Estimate:
    """The priced run: per phase, totals, and KV memory with and without prefix sharing."""

    model: str
    hardware: str
    dtype: str
    run: RunSpec
    weight_bytes_per_param: float
    kv_bytes: float
    prefill: PhaseEstimate
    decode: PhaseEstimate
    weight_bytes: float  # stored weights (all parameters)
    peak_kv_bytes_shared: float  # KV held at the end with prefix sharing
    peak_kv_bytes_unshared: float  # ... and with every sample holding its own copy
    memory_bytes: float  # the hardware's memory
    strategy: StrategyCostProfile | None = field(default=None)

    @property
    def total(self) -> StepCost:
        return self.prefill.cost + self.decode.cost

    @property
    def time(self) -> float:
        return self.prefill.time + self.decode.time

    @property
    def efflops(self) -> float:
        return self.prefill.efflops + self.decode.efflops

    @property
    def predicted_time(self) -> float | None:
        """Predicted wall time on the calibrated machine (None without a calibration)."""
        if self.prefill.predicted_time is None or self.decode.predicted_time is None:
            return None
        return self.prefill.predicted_time + self.decode.predicted_time

    @property
    def peak_kv_bytes(self) -> float:
        """KV held at the end under the run's own sharing setting."""
        return self.peak_kv_bytes_shared if self.run.share_prefix else self.peak_kv_bytes_unshared

    @property
    def fits_memory(self) -> bool:
        return self.weight_bytes + self.peak_kv_bytes <= self.memory_bytes

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens (N * G) per second of roofline time."""
        return self.run.num_samples * self.run.gen_len / self.time if self.time else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "hardware": self.hardware,
            "dtype": self.dtype,
            "strategy": self.strategy.to_dict() if self.strategy is not None else None,
            "prompt_len": self.run.prompt_len,
            "gen_len": self.run.gen_len,
            "num_samples": self.run.num_samples,
            "share_prefix": self.run.share_prefix,
            "read_prefix_once": self.run.read_prefix_once,
            "block_size": self.run.block_size,
            "kv_budget": self.run.kv_budget,
            "sparse_layers": self.run.sparse_layers,
            "weight_bytes_per_param": self.weight_bytes_per_param,
            "kv_bytes": self.kv_bytes,
            "phases": {"prefill": self.prefill.to_dict(), "decode": self.decode.to_dict()},
            "total": {
                **self.total.to_dict(),
                "time_s": self.time,
                "efflops": self.efflops,
                "tokens_per_second": self.tokens_per_second,
                "predicted_time_s": self.predicted_time,
            },
            "weight_bytes": self.weight_bytes,
            "peak_kv_bytes": self.peak_kv_bytes,
            "peak_kv_bytes_shared": self.peak_kv_bytes_shared,
            "peak_kv_bytes_unshared": self.peak_kv_bytes_unshared,
            "memory_bytes": self.memory_bytes,
            "fits_memory": self.fits_memory,
        }


def _phase(
    name: str,
    steps: int,
    tokens: int,
    cost: StepCost,
    step_flops: np.ndarray,
    step_bytes: np.ndarray,
    hw: Hardware,
    dtype: str,
    predicted_time: float | None,
) -> PhaseEstimate:
    """Roofline per step (a vector over the phase's steps), summed."""
    peak, bw = hw.peak_flops(dtype), hw.mem_bandwidth
    t_compute = step_flops / peak
    t_memory = step_bytes / bw
    ct, mt = float(t_compute.sum()), float(t_memory.sum())
    return PhaseEstimate(
        name=name,
        steps=steps,
        tokens=tokens,
        cost=cost,
        compute_time=ct,
        memory_time=mt,
        time=float(np.maximum(t_compute, t_memory).sum()),
        bound="compute" if ct >= mt else "memory",
        efflops=cost.efflops(hw.intensity(dtype)),
        predicted_time=predicted_time,
    )


def estimate(
    shape: ModelShape,
    prompt_len: int,
    gen_len: int,
    num_samples: int,
    hw: Hardware,
    share_prefix: bool = True,
    dtype: str = "bf16",
    *,
    read_prefix_once: bool | None = None,
    block_size: int | None = None,
    weight_bytes_per_param: float | None = None,
    kv_bytes: float | None = None,
    strategy: StrategyCostProfile | None = None,
    step_model: StepTimeModel | None = None,
    kv_budget: int | None = None,
    sparse_dense_layers: int = 1,
) -> Estimate:
    """Price N parallel samples of one prompt (see the module docstring for the steps).

    dtype sets the compute rate and, unless overridden, the bytes per weight and per KV
    element (e.g. weight_bytes_per_param=0.5625 for 4.5-bit quantised weights).
    With a `step_model` calibrated for this shape, each phase also carries the wall time the
    engine is predicted to take on that machine. `kv_budget`: block top-k sparse decode on
    all but `sparse_dense_layers` layers (see `RunSpec`); `kv_bytes` then prices a
    quantized KV format (kvcache.quant.kv_bytes_per_value).
    """
    if step_model is not None and not step_model.matches(shape, normalize_dtype(dtype)):
        raise ValueError(
            f"the step-time calibration is for {step_model.shape.name} in {step_model.dtype}, "
            f"not {shape.name} in {normalize_dtype(dtype)}"
        )
    dtype = normalize_dtype(dtype)
    wb = float(DTYPE_BYTES[dtype] if weight_bytes_per_param is None else weight_bytes_per_param)
    kb = float(DTYPE_BYTES[dtype] if kv_bytes is None else kv_bytes)
    sparse_layers = max(0, shape.layers - sparse_dense_layers)
    run = RunSpec(
        prompt_len,
        gen_len,
        num_samples,
        share_prefix,
        read_prefix_once,
        block_size,
        kv_budget,
        shape.layers if kv_budget is not None else None,
        sparse_layers if kv_budget is not None else None,
    )
    p, n, d_steps = run.prompt_len, run.num_samples, run.decode_steps

    # Prefill: a single step, priced directly.
    pre = step_cost(shape, prefill_step(run), wb, kb)
    prefill = _phase(
        "prefill",
        1,
        p * (1 if share_prefix else n),
        pre,
        np.array([pre.flops]),
        np.array([pre.bytes]),
        hw,
        dtype,
        None if step_model is None else step_model.predict(prefill_step(run)),
    )

    # Decode, closed form over j = 1..D (D = G - 1), per step j:
    #   FLOPs      2*P_nonlm*N + 2*D_h*V*N + 4*L*H*d*N*(P + j)
    #   weights    (P_nonlm + D_h*V) * wb              (every step samples, so lm_head is read)
    #   KV read    (S + N*(P - S + j)) * kv_tok        prefix read once
    #              N*(P + j) * kv_tok                  otherwise
    #   KV write   N * kv_tok;  logits  N * V * 4
    # Sums use sum_j j = D*(D+1)/2; exact in Python integers before the final float.
    kv_tok = shape.kv_bytes_per_token(kb)
    attn = 4 * shape.layers * shape.heads * shape.head_dim
    per_token_linear = 2 * shape.linear_params_nonlm + 2 * shape.lm_head_params
    sum_j = d_steps * (d_steps + 1) // 2
    s = run.shared_tokens
    if run.read_prefix_once:
        kv_read_tokens = d_steps * s + n * (d_steps * (p - s) + sum_j)
    else:
        kv_read_tokens = n * (d_steps * p + sum_j)
    decode_cost = StepCost(
        flops=float(per_token_linear * n * d_steps + attn * n * (d_steps * p + sum_j)),
        bytes_weights=float(shape.linear_params_per_token * d_steps) * wb,
        bytes_kv_read=kv_read_tokens * kv_tok,
        bytes_kv_write=n * d_steps * kv_tok,
        bytes_activations=float(n * d_steps * shape.vocab * LOGIT_BYTES),
    )
    # Per-step vectors for the roofline (time is a sum of per-step maxima).
    j = np.arange(1, d_steps + 1, dtype=np.float64)
    step_flops = per_token_linear * n + attn * n * (p + j)
    read = (s + n * (p - s + j)) if run.read_prefix_once else n * (p + j)
    step_bytes = (
        shape.linear_params_per_token * wb
        + read * kv_tok
        + n * kv_tok
        + n * shape.vocab * LOGIT_BYTES
    )
    if run.kv_budget is not None:
        decode_cost, step_flops, step_bytes = _sparse_decode(shape, run, wb, kv_tok)
    decode_predicted = None
    if step_model is not None and run.kv_budget is not None:
        # Not affine in j once the budget binds: sum the steps.
        decode_predicted = sum(
            step_model.predict(decode_step(run, jj)) for jj in range(1, d_steps + 1)
        )
    elif step_model is not None:
        # A decode step's predicted time is affine in j (fixed matmul rows, KV reads and
        # attention pairs linear in the context), so the sum over j = 1..D is D times the
        # mean of its ends.
        ends = (decode_step(run, 1), decode_step(run, d_steps)) if d_steps else ()
        decode_predicted = d_steps * sum(map(step_model.predict, ends)) / 2 if ends else 0.0
    decode = _phase(
        "decode",
        d_steps,
        n * d_steps,
        decode_cost,
        step_flops,
        step_bytes,
        hw,
        dtype,
        decode_predicted,
    )

    return Estimate(
        model=shape.name,
        hardware=hw.name,
        dtype=dtype,
        run=run,
        weight_bytes_per_param=wb,
        kv_bytes=kb,
        prefill=prefill,
        decode=decode,
        weight_bytes=shape.weight_params * wb,
        peak_kv_bytes_shared=run.peak_kv_tokens(True) * kv_tok,
        peak_kv_bytes_unshared=run.peak_kv_tokens(False) * kv_tok,
        memory_bytes=hw.memory_bytes,
        strategy=strategy,
    )


def _sparse_decode(
    shape: ModelShape, run: RunSpec, wb: float, kv_tok: float
) -> tuple[StepCost, np.ndarray, np.ndarray]:
    """Decode under block top-k, per step j as `decode_step` counts it (vectorised over j):
    dense layers read the context (prefix once), sparse layers the budget once the context
    exceeds it, plus the block search (Eq. 9): each scored block's fp32 mean key read and
    dotted with the group's mean query."""
    assert run.num_layers is not None and run.sparse_layers is not None
    n, p, d_steps = run.num_samples, run.prompt_len, run.decode_steps
    f = run.sparse_layers / run.num_layers
    j = np.arange(1, d_steps + 1, dtype=np.float64)
    c = p + j
    read, scored = sparse_reads(run, c)
    s = run.shared_tokens if run.read_prefix_once and n > 1 else 0
    dense_read = s + n * (c - s)
    sparse = c > run.kv_budget  # type: ignore[operator]
    kv_read = np.where(sparse, np.round((1 - f) * dense_read + f * n * read), dense_read)
    pairs = n * c - np.where(sparse, np.round(f * n * (c - read)), 0)
    blocks = np.where(sparse, np.round(f * n * scored), 0)
    attn = 4 * shape.layers * shape.heads * shape.head_dim
    search = 2 * shape.layers * shape.kv_heads * shape.head_dim
    per_token_linear = 2 * shape.linear_params_nonlm + 2 * shape.lm_head_params
    block_bytes = shape.layers * shape.kv_dim * BLOCK_MEAN_BYTES
    step_flops = per_token_linear * n + attn * pairs + search * blocks
    kv_bytes_read = kv_read * kv_tok + blocks * block_bytes
    step_bytes = (
        shape.linear_params_per_token * wb
        + kv_bytes_read
        + n * kv_tok
        + n * shape.vocab * LOGIT_BYTES
    )
    cost = StepCost(
        flops=float(step_flops.sum()),
        bytes_weights=float(shape.linear_params_per_token * d_steps) * wb,
        bytes_kv_read=float(kv_bytes_read.sum()),
        bytes_kv_write=n * d_steps * kv_tok,
        bytes_activations=float(n * d_steps * shape.vocab * LOGIT_BYTES),
    )
    return cost, step_flops, step_bytes


def estimate_by_steps(
    shape: ModelShape,
    run: RunSpec,
    hw: Hardware,
    dtype: str = "bf16",
    weight_bytes_per_param: float | None = None,
    kv_bytes: float | None = None,
) -> tuple[StepCost, StepCost, float]:
    """Reference implementation: (prefill cost, decode cost, roofline time) by pricing every
    step of `run_steps` with `step_cost`. O(G) Python; for tests and engine comparisons."""
    dtype = normalize_dtype(dtype)
    wb = float(DTYPE_BYTES[dtype] if weight_bytes_per_param is None else weight_bytes_per_param)
    kb = float(DTYPE_BYTES[dtype] if kv_bytes is None else kv_bytes)
    costs = [step_cost(shape, st, wb, kb) for st in run_steps(run)]
    time = sum(roofline_time(c, hw, dtype) for c in costs)
    return costs[0], sum(costs[1:], StepCost()), time


__all__ = [
    "Estimate",
    "PhaseEstimate",
    "RunSpec",
    "StrategyCostProfile",
    "decode_step",
    "estimate",
    "estimate_by_steps",
    "prefill_step",
    "run_steps",
    "strategy_cost_profile",
]
