"""Time models that price a plan: the pilot's measured seconds per token, or the analytic
roofline model on some hardware."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ttscale.cost import Hardware, ModelShape
    from ttscale.plan.pilot_run import Pilot


@dataclass(frozen=True)
class TokenTimeModel:
    """Seconds = ``sec_per_token`` x (prompt tokens prefilled + tokens generated).

    ``sec_per_token`` is the pilot's wall time per processed token (amortized over concurrent
    problems), so the model reproduces the pilot's elapsed time. It assumes a throughput
    regime (a token costs about the same whatever strategy produced it), prices prefill like
    decode and ignores that small batches pay more per token; validation shows how far off
    that is.
    """

    sec_per_token: float
    model_share: float = 1.0  # engine model time / wall time in the pilot (the rest: overhead)
    unit: str = "s wall (this machine, measured)"

    def seconds(self, prompt_tokens: float, generated_tokens: float, n_samples: int = 1) -> float:
        del n_samples  # tokens are tokens in a throughput regime
        return self.sec_per_token * (max(prompt_tokens, 0.0) + max(generated_tokens, 0.0))

    @classmethod
    def fit(cls, pilot: Pilot) -> TokenTimeModel:
        tokens = wall = model = 0.0
        for p in pilot.problems:
            tokens += p.computed_prompt_tokens + sum(p.tokens)
            wall += p.wall_time
            model += p.measured_time
            for d in p.direct.values():
                tokens += d.computed_prompt_tokens + d.generated_tokens
                wall += d.wall_time
                model += d.measured_time
        if tokens <= 0 or wall <= 0:
            raise ValueError("the pilot recorded no tokens or no time: nothing to fit costs on")
        return cls(sec_per_token=wall / tokens, model_share=model / wall)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "tokens", **dataclasses.asdict(self)}


@dataclass(frozen=True)
class AnalyticTimeModel:
    """Roofline seconds of :func:`ttscale.cost.estimate` on some hardware: N samples of a
    prompt, prefilled once, decoding ``generated / N`` tokens each (search strategies are
    priced the same way)."""

    shape: ModelShape
    hardware: Hardware
    block_size: int | None = None
    dtype: str = "bf16"

    @property
    def unit(self) -> str:
        return f"s roofline ({self.hardware.name}, {self.dtype}, analytic)"

    def seconds(self, prompt_tokens: float, generated_tokens: float, n_samples: int = 1) -> float:
        from ttscale.cost import estimate

        n = max(1, int(n_samples))
        gen = max(1, round(generated_tokens / n))
        est = estimate(
            self.shape,
            max(1, round(prompt_tokens)) if prompt_tokens > 0 else 1,
            gen,
            n,
            self.hardware,
            dtype=self.dtype,
            block_size=self.block_size,
        )
        # No prompt tokens: a continuation of a cached prompt, decode only.
        return est.time if prompt_tokens > 0 else est.decode.time

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "analytic",
            "model": self.shape.name,
            "hardware": self.hardware.name,
            "dtype": self.dtype,
            "block_size": self.block_size,
            "unit": self.unit,
        }


TimeModel = TokenTimeModel | AnalyticTimeModel


def analytic_time_model(
    shape: dict[str, Any], hardware: str, block_size: int | None, dtype: str = "bf16"
) -> AnalyticTimeModel:
    """The analytic model for a model shape (``ModelShape.to_dict()``) on ``hardware`` (a
    preset or profile)."""
    from ttscale.cost import ModelShape, load_hardware

    return AnalyticTimeModel(ModelShape(**shape), load_hardware(hardware), block_size, dtype)


def pilot_time_model(pilot: Pilot, hardware: str | None = None) -> TimeModel:
    """The pilot's own seconds per token, or the analytic model on ``hardware``."""
    if hardware is None:
        return TokenTimeModel.fit(pilot)
    if pilot.model_shape is None:
        raise ValueError(
            "the pilot did not record the model's shape (it predates ttscale recording it): "
            "rerun the pilot, or plan without --hardware to use its measured seconds per token"
        )
    return analytic_time_model(pilot.model_shape, hardware, pilot.block_size)


def plan_time_model(cost_model: dict[str, Any], shape: dict[str, Any] | None) -> TimeModel:
    """The time model a plan was priced with (its ``cost_model`` dict); ``shape`` is the
    model's, needed by an analytic plan."""
    cm = cost_model
    if cm["kind"] == "tokens":
        return TokenTimeModel(cm["sec_per_token"], cm["model_share"], cm["unit"])
    if shape is None:
        raise ValueError("an analytic plan needs the model's shape")
    return analytic_time_model(shape, cm["hardware"], cm["block_size"], cm["dtype"])


__all__ = [
    "AnalyticTimeModel",
    "TimeModel",
    "TokenTimeModel",
    "analytic_time_model",
    "pilot_time_model",
    "plan_time_model",
]
