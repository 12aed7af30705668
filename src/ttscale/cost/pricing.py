"""What one engine step costs, in FLOPs and in bytes moved.

The cost model follows the Kinetics view of test-time scaling (Sadhukhan et al., 2025,
"Kinetics: Rethinking Test-Time Scaling Laws"): with many samples and long generations the
price of a run is set less by parameter count than by attention and KV-cache reads, so every
step is priced in compute (FLOPs) *and* memory traffic (bytes), and the two are combined as

    eFLOPs = FLOPs + I * bytes,    I = peak_flops / mem_bandwidth  (FLOPs per byte)

i.e. memory traffic is charged at the rate the hardware could have computed while waiting for
it. Unlike Kinetics we keep the weight-read term: Kinetics drops it because at their batch
sizes it is amortised away, but at small batch (one request, a handful of samples) reading the
weights once per step is the largest single cost.

Symbols as in shapes.py (T new tokens, L layers, H/Hkv heads, d head_dim, D, F, V).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ttscale.cost.shapes import ModelShape, StepShape

# Logits leave the model in fp32 whatever the weight dtype (samplers need the precision).
LOGIT_BYTES = 4
# Block top-k keeps each block's mean key in fp32 (kvcache/pool.py).
BLOCK_MEAN_BYTES = 4


@dataclass(frozen=True)
class StepCost:
    """FLOPs and bytes of one step (or, summed with +, of many)."""

    flops: float = 0.0
    bytes_weights: float = 0.0  # weights streamed from memory
    bytes_kv_read: float = 0.0  # KV cache read by attention
    bytes_kv_write: float = 0.0  # KV of the new tokens written to the cache
    bytes_activations: float = 0.0  # logits written (other activations: see step_cost)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"invalid step cost {f.name}={value!r}: must be finite and >= 0")

    @property
    def bytes(self) -> float:
        """All memory traffic: weights + KV read + KV written + activations."""
        return (
            self.bytes_weights + self.bytes_kv_read + self.bytes_kv_write + self.bytes_activations
        )

    @property
    def intensity(self) -> float:
        """Arithmetic intensity of the work, FLOPs per byte (inf when nothing is moved)."""
        return self.flops / self.bytes if self.bytes else math.inf

    def efflops(self, intensity: float) -> float:
        """Kinetics' effective FLOPs: FLOPs + I * bytes, with I the hardware's peak_flops /
        mem_bandwidth (the FLOPs it could do in the time one byte moves)."""
        return self.flops + intensity * self.bytes

    def __add__(self, other: StepCost) -> StepCost:
        if not isinstance(other, StepCost):
            return NotImplemented
        return StepCost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __radd__(self, other: object) -> StepCost:
        # Lets sum(costs) start from the integer 0.
        if other == 0:
            return self
        return NotImplemented

    def scaled(self, factor: float) -> StepCost:
        """The cost of `factor` identical steps."""
        return StepCost(*(getattr(self, f.name) * factor for f in fields(self)))

    def to_dict(self) -> dict[str, float]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["bytes"] = self.bytes
        return d


def step_cost(
    shape: ModelShape,
    step: StepShape,
    weight_bytes_per_param: float = 4,
    kv_bytes: float = 4,
) -> StepCost:
    """Price one engine step.

    FLOPs (a multiply-add is 2 FLOPs):
        linear     2 * P_nonlm * T             every new token through every block matmul
        lm_head    2 * D * V * num_logits      only rows that are sampled
        attention  4 * L * H * d * A           A = step.attended_pairs_read; per (query,
                                               key) pair and head: 2*d for q.k plus 2*d for
                                               p*v. Counts the causal half only (what
                                               flash-style kernels do), less the pairs block
                                               top-k skipped (Kinetics Eq. 8: a sparse row
                                               attends to ~budget keys, not its context);
                                               softmax, norms, RoPE, SiLU are O(T*D) and
                                               ignored.
        block search 2 * L * Hkv * d * Bs      Bs = step.kv_blocks_scored: each scored block's
                                               mean key against the group's mean query
                                               (Kinetics Eq. 9: ~context / block_size per row).
    Bytes:
        weights    (P_nonlm + D*V if num_logits else 0) * weight_bytes_per_param
                   every matmul weight read once per step at its stored precision, whatever
                   the batch: the term that dominates at small batch (Kinetics drops it).
                   The embedding rows gathered (T*D) are negligible and not counted, nor are
                   norms and biases.
        KV read    kv_tokens_read * 2*L*Hkv*d * kv_bytes   (kv_bytes: per value, scales of a
                   quantized format included)  +  Bs * L*Hkv*d * 4   (fp32 block mean keys)
        KV write   T * 2*L*Hkv*d * kv_bytes    the new tokens' K and V
        logits     num_logits * V * 4          written in fp32
                   Hidden states between layers are not counted: at decode they are
                   T*D-sized and stay in cache; at prefill the step is compute-bound anyway.
    """
    if weight_bytes_per_param <= 0 or kv_bytes <= 0:
        raise ValueError("weight_bytes_per_param and kv_bytes must be > 0")
    tokens = step.num_tokens
    if tokens == 0:
        return StepCost()  # nothing scheduled: no weights streamed either
    num_logits = step.num_logits
    assert num_logits is not None and step.kv_tokens_read is not None  # set in __post_init__
    lm = shape.lm_head_params
    flops = (
        2 * shape.linear_params_nonlm * tokens
        + 2 * lm * num_logits
        + 4 * shape.layers * shape.heads * shape.head_dim * step.attended_pairs_read
        + 2 * shape.layers * shape.kv_heads * shape.head_dim * step.kv_blocks_scored
    )
    weights_read = shape.linear_params_nonlm + (lm if num_logits else 0)
    kv_token = shape.kv_bytes_per_token(kv_bytes)
    return StepCost(
        flops=float(flops),
        bytes_weights=float(weights_read * weight_bytes_per_param),
        bytes_kv_read=float(
            step.kv_tokens_read * kv_token
            + step.kv_blocks_scored * shape.layers * shape.kv_dim * BLOCK_MEAN_BYTES
        ),
        bytes_kv_write=float(tokens * kv_token),
        bytes_activations=float(num_logits * shape.vocab * LOGIT_BYTES),
    )
