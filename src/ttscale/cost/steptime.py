"""Predicted wall time of one engine step on this machine: the cost model's terms, each
priced at the rate this engine measurably achieves.

The roofline (hardware.py) is a lower bound: it assumes every byte streams at the machine's
peak bandwidth and every FLOP runs at its peak GEMM rate. A real engine step on a CPU misses
that bound in ways that depend on the kind of work, not only on its FLOPs and bytes:
  * matmuls with few rows are far from both peaks (a 4-row GEMM is neither a streaming read
    nor a full-width GEMM), so their time is read off a table measured on the model's own
    weights at 1 ... 2048 rows and interpolated;
  * every step pays for dozens of small eager ops per layer (norms, RoPE, SiLU, residuals,
    the KV store) whose time is dispatch, not FLOPs: a fixed cost per layer plus a cost per
    hidden-state element;
  * KV gathered per sequence costs more per byte than a fork group's prefix, which is read
    once and hit by the whole group in one matmul (cascade attention).

So a step's predicted time is

    t = L * t_layer_linear(T) + t_lm_head(num_logits) + sum_k c_k * x_k

with the two tables measured directly, and the per-unit costs c_k of the overhead features
x_k (below, `FEATURES`) fitted by non-negative least squares on a set of calibration steps
(ttscale.calibration.steps) that differs from the benchmark's grid of validation steps. The
calibration depends on the machine, the thread count, the model's shape and the dtype; it is
stored next to the hardware profiles. The roofline stays the denominator of "% of hardware
limit"; this model answers "how long will this take here".
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import nnls

from ttscale.cost.hardware import (
    STEP_PROFILE_MARK,
    local_profile_name,
    profile_dir,
    read_profile,
    write_profile,
)
from ttscale.cost.shapes import ModelShape, StepShape

PROFILE_FORMAT = 1

# The overhead features, each a count that a step's shape determines, with the unit its
# fitted coefficient is priced in (seconds per unit).
FEATURES: dict[str, str] = {
    "step": "per step (host-side batch preparation)",
    "layer": "per layer per step (fixed cost of each layer's small ops)",
    "hidden_element": "per layer per hidden-state element (norms, RoPE, SiLU, residuals)",
    "sequence": "per scheduled sequence (host-side bookkeeping)",
    "kv_gathered_byte": "per byte of KV gathered per sequence",
    "kv_shared_byte": "per byte of fork-group prefix KV, read once per group",
    "group_layer": "per fork group per layer (the prefix pass and softmax merge)",
    "decode_attention_flop": "per attention FLOP of one-token rows",
    "prefill_attention_flop": "per attention FLOP of multi-token chunks",
}


def overhead_features(shape: ModelShape, step: StepShape, kv_bytes: float) -> np.ndarray:
    """The counts x_k of `FEATURES` for one step, in that order."""
    layers, tokens = shape.layers, step.num_tokens
    assert step.kv_tokens_read is not None  # set in StepShape.__post_init__
    kv_token = shape.kv_bytes_per_token(kv_bytes)
    per_pair = 4 * layers * shape.heads * shape.head_dim  # FLOPs per (query, key) pair
    # Pairs block top-k skipped belong to one-token rows (prefill stays dense). Its block
    # search and per-head gathers have no feature of their own yet: they are priced as
    # gathered KV bytes and decode attention FLOPs.
    decode_pairs = sum(c for q, c in zip(step.query_lens, step.context_lens, strict=True) if q == 1)
    decode_pairs -= step.kv_tokens_skipped
    return np.array(
        [
            1.0,
            layers,
            layers * tokens * shape.hidden,
            len(step.query_lens),
            (step.kv_tokens_read - step.kv_tokens_shared) * kv_token,
            step.kv_tokens_shared * kv_token,
            layers * step.shared_groups,
            per_pair * decode_pairs,
            per_pair * (step.attended_pairs - decode_pairs),
        ],
        dtype=np.float64,
    )


@dataclass(frozen=True)
class RowTable:
    """Measured seconds of a matmul at a grid of row counts; linear in between, and
    proportional to the rows beyond the last point (a GEMM that large is compute-bound)."""

    rows: tuple[int, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.rows or len(self.rows) != len(self.seconds):
            raise ValueError("a row table needs as many times as row counts, at least one")
        if list(self.rows) != sorted(set(self.rows)) or self.rows[0] < 1:
            raise ValueError(f"row counts must be increasing and >= 1: {self.rows}")
        if not all(math.isfinite(s) and s > 0 for s in self.seconds):
            raise ValueError(f"times must be finite and > 0: {self.seconds}")

    def to_dict(self) -> dict[str, list]:
        return {"rows": list(self.rows), "seconds": list(self.seconds)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RowTable:
        return cls(tuple(int(r) for r in data["rows"]), tuple(float(s) for s in data["seconds"]))

    def __call__(self, rows: int) -> float:
        if rows <= 0:
            return 0.0
        r, s = self.rows, self.seconds
        if rows <= r[0]:
            return s[0]  # fewer rows than measured: the weights are still read once
        if rows >= r[-1]:
            return s[-1] * rows / r[-1]
        i = bisect.bisect_left(r, rows)
        if r[i] == rows:
            return s[i]
        frac = (rows - r[i - 1]) / (r[i] - r[i - 1])
        return s[i - 1] + frac * (s[i] - s[i - 1])


@dataclass(frozen=True)
class StepTimeModel:
    """Predicts the model time of an engine step (`ModelRunner.run`, sampling excluded) for
    one model shape, dtype and thread count on one machine."""

    shape: ModelShape
    dtype: str  # "fp32" | "bf16"
    kv_bytes: float  # bytes per KV value
    threads: int
    layer_linear: RowTable  # one decoder block's matmuls (mean over the blocks)
    lm_head: RowTable
    coefficients: dict[str, float]  # seconds per unit of each FEATURES entry
    machine: str = ""
    source: str = ""  # when and how it was calibrated, and the fit's error on its own steps
    fit_median_error: float | None = None  # on the calibration steps

    def __post_init__(self) -> None:
        missing = set(FEATURES) - set(self.coefficients)
        if missing:
            raise ValueError(f"step-time model lacks coefficients for {sorted(missing)}")
        bad = {k: v for k, v in self.coefficients.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise ValueError(f"step-time coefficients must be finite and >= 0: {bad}")

    def linear_time(self, step: StepShape) -> float:
        """Seconds in the matmuls: every block at T rows, the lm_head at num_logits rows."""
        assert step.num_logits is not None
        return self.shape.layers * self.layer_linear(step.num_tokens) + self.lm_head(
            step.num_logits
        )

    def overhead_terms(self, step: StepShape) -> dict[str, float]:
        """Seconds of each overhead feature for `step`."""
        x = overhead_features(self.shape, step, self.kv_bytes)
        return {k: float(v) * self.coefficients[k] for k, v in zip(FEATURES, x, strict=True)}

    def predict(self, step: StepShape) -> float:
        """Predicted seconds of one step (0 for an empty one)."""
        if step.num_tokens == 0:
            return 0.0
        return self.linear_time(step) + sum(self.overhead_terms(step).values())

    def matches(self, shape: ModelShape, dtype: str, threads: int | None = None) -> bool:
        """Whether this calibration applies to `shape` in `dtype` (and `threads`, if given).
        The shape's name is not compared: the same dimensions run the same kernels."""
        mine = {k: v for k, v in self.shape.to_dict().items() if k != "name"}
        theirs = {k: v for k, v in shape.to_dict().items() if k != "name"}
        return (
            mine == theirs and self.dtype == dtype and (threads is None or threads == self.threads)
        )

    # ----------------------------------------------------------------------------- storage
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "shape": self.shape.to_dict(),
            "dtype": self.dtype,
            "kv_bytes": self.kv_bytes,
            "threads": self.threads,
            "layer_linear": self.layer_linear.to_dict(),
            "lm_head": self.lm_head.to_dict(),
            "coefficients": dict(self.coefficients),
            "machine": self.machine,
            "source": self.source,
            "fit_median_error": self.fit_median_error,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepTimeModel:
        try:
            if data.get("format") != PROFILE_FORMAT:
                raise ValueError(f"unsupported step-time profile format {data.get('format')!r}")
            return cls(
                shape=ModelShape(**data["shape"]),
                dtype=str(data["dtype"]),
                kv_bytes=float(data["kv_bytes"]),
                threads=int(data["threads"]),
                layer_linear=RowTable.from_dict(data["layer_linear"]),
                lm_head=RowTable.from_dict(data["lm_head"]),
                coefficients={k: float(v) for k, v in data["coefficients"].items()},
                machine=str(data.get("machine", "")),
                source=str(data.get("source", "")),
                fit_median_error=data.get("fit_median_error"),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"invalid step-time profile: missing or bad field {e}") from None

    def file_name(self) -> str:
        """`<machine>.steps.<model>.<dtype>.t<threads>.json`, unique per calibration key."""
        model = re.sub(r"[^A-Za-z0-9._-]+", "_", self.shape.name or "model")
        machine = self.machine or "machine"
        return f"{machine}{STEP_PROFILE_MARK}{model}.{self.dtype}.t{self.threads}.json"

    def save(self, directory: str | Path | None = None) -> Path:
        return write_profile(profile_dir(directory) / self.file_name(), self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> StepTimeModel:
        return cls.from_dict(read_profile(path, "step-time profile"))


def find_step_model(
    shape: ModelShape,
    dtype: str,
    threads: int | None = None,
    machine: str | None = None,
    directory: str | Path | None = None,
) -> StepTimeModel | None:
    """The saved calibration of `machine` (default: this one) that matches `shape`, `dtype`
    and `threads`, or None."""
    machine = machine or local_profile_name()
    d = profile_dir(directory)
    for path in sorted(d.glob(f"{machine}{STEP_PROFILE_MARK}*.json")) if d.is_dir() else []:
        try:
            model = StepTimeModel.load(path)
        except ValueError:
            continue  # another format or a damaged file: not ours to use
        if model.matches(shape, dtype, threads):
            return model
    return None


# ---------------------------------------------------------------------------------- fit
@dataclass
class CalibrationStep:
    """One measured step: its shape and the seconds it took (median of its repetitions)."""

    step: StepShape
    seconds: float
    label: str = ""


@dataclass
class FitResult:
    coefficients: dict[str, float]
    relative_errors: list[float] = field(default_factory=list)  # (measured - fit) / measured

    @property
    def median_abs_error(self) -> float:
        return float(np.median(np.abs(self.relative_errors))) if self.relative_errors else math.nan


def fit_overheads(
    shape: ModelShape,
    kv_bytes: float,
    steps: list[CalibrationStep],
    linear_time: Any,
) -> FitResult:
    """Non-negative least squares for the overhead coefficients, on the time each step spent
    outside its matmuls (`linear_time(step)` seconds, from the measured tables).

    The residuals are weighted by 1 / measured time, so the fit minimizes *relative* error:
    a 1 ms step matters as much as a 1 s prefill. Columns are scaled to unit norm first; the
    features span ten orders of magnitude (1 step vs 1e9 bytes).
    """
    if not steps:
        raise ValueError("no calibration steps to fit")
    x = np.stack([overhead_features(shape, s.step, kv_bytes) for s in steps])
    measured = np.array([s.seconds for s in steps])
    residual = measured - np.array([linear_time(s.step) for s in steps])
    weights = 1.0 / measured
    a = x * weights[:, None]
    b = residual * weights
    norms = np.linalg.norm(a, axis=0)
    norms[norms == 0] = 1.0  # a feature no calibration step exercised gets coefficient 0
    coef, _ = nnls(a / norms, b)
    coef = coef / norms
    fitted = x @ coef + (measured - residual)
    errors = ((measured - fitted) / measured).tolist()
    return FitResult(dict(zip(FEATURES, coef.tolist(), strict=True)), errors)
