"""The seam between the engine and whatever runs the model: `Executor.execute(SchedulerOutput)
-> StepResult`. The in-process executor is `ModelRunner`; a multi-process or Ray-backed one
plugs in here, since both sides of the seam are plain data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ttscale.cost.shapes import StepShape
from ttscale.engine.scheduler import SchedulerOutput


@dataclass
class StepResult:
    """What one executed step returns.

    `logits`: fp32 (R, vocab): for each scheduled sequence in order, the logits of the last
    `num_logits` rows of its chunk (R = sum of num_logits).
    `hidden`: (H, len(batch.hidden_layers), hidden_size) for each sequence with
    `return_hidden`, every row of its chunk, in order; None when no sequence asked.
    `shape`: what the step computed and read, for the cost model.
    """

    logits: torch.Tensor
    hidden: torch.Tensor | None
    shape: StepShape


class Executor(Protocol):
    num_blocks: int  # KV blocks the executor's cache holds: the block manager's pool size

    def execute(self, batch: SchedulerOutput) -> StepResult: ...

    def shutdown(self) -> None: ...
