"""What one attention layer is: the facts a backend needs that differ between layers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionLayerSpec:
    """Per-layer attention facts, handed to the backend with every call.

    A model family states them per layer (Mistral: one window for all layers; Gemma-3: local
    and global layers interleaved), so backends never assume one shape for the whole model.
    """

    layer_idx: int
    scale: float
    sliding_window: int | None = None  # None: global; else each query sees this many keys
    soft_cap: float | None = None  # Gemma-2 style logit soft-capping: cap * tanh(s / cap)
    # Room for a per-layer sparse-attention policy (block top-k, ...). None = dense. A backend
    # that does not implement the policy it is given must raise, never silently go dense.
    sparsity: object | None = None

    def __post_init__(self) -> None:
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"layer {self.layer_idx}: sliding_window must be >= 1")
        if self.soft_cap is not None and self.soft_cap <= 0:
            raise ValueError(f"layer {self.layer_idx}: soft_cap must be > 0")
