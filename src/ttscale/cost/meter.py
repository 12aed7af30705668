"""Prices every engine step with the cost model and charges it to the requests in the step.

The step's KV reads are what the attention path really read (a fork group's shared prefix
once, with the cascade path), so the bill of n samples reflects prefix sharing. A step's cost
is split over its requests in proportion to the tokens each computed in it, which charges
shared weight reads to everyone in the batch.
"""

from __future__ import annotations

import torch

from ttscale.cost.hardware import Hardware, efflops, roofline_time
from ttscale.cost.pricing import StepCost, step_cost
from ttscale.cost.shapes import ModelShape, StepShape
from ttscale.cost.usage import RunCost
from ttscale.models.config import ModelConfig


class CostMeter:
    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        hardware: Hardware | None = None,
        kv_bytes: float | None = None,
    ) -> None:
        """`dtype`: the weights'; `kv_bytes`: bytes per K or V value in the KV pool, scales
        of a quantized format included (default: the weights' itemsize)."""
        self.shape = ModelShape.from_model_config(config)
        self.bytes_per_value = dtype.itemsize  # weights, streamed once per step
        self.kv_bytes_per_value = kv_bytes or dtype.itemsize
        self.dtype = {torch.float32: "fp32"}.get(dtype, "bf16")
        self.hardware = hardware
        self.total = RunCost()

    def price(self, step: StepShape, measured: float) -> tuple[StepCost, RunCost]:
        """Prices a step as the executor reports it (`StepResult.shape`)."""
        cost = step_cost(self.shape, step, self.bytes_per_value, self.kv_bytes_per_value)
        run = RunCost(flops=cost.flops, bytes=cost.bytes, measured_time=measured)
        if self.hardware is not None:
            run.efflops = efflops(cost, self.hardware, self.dtype)
            run.roofline_time = roofline_time(cost, self.hardware, self.dtype)
        self.total.add(run)
        return cost, run

    @staticmethod
    def share(run: RunCost, fraction: float) -> RunCost:
        return RunCost(
            flops=run.flops * fraction,
            bytes=run.bytes * fraction,
            efflops=None if run.efflops is None else run.efflops * fraction,
            roofline_time=None if run.roofline_time is None else run.roofline_time * fraction,
            measured_time=run.measured_time * fraction,
        )
