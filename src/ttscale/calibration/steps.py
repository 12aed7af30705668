"""Calibrate the step-time model (ttscale.cost.steptime) by running the engine's own model.

Two measurements, on an idle engine:
  1. Row tables: the seconds of one decoder block's matmuls, and of the lm_head, at 1 ... 2048
     rows, timed on the model's own packed weights. Up to 128 rows every block runs in turn,
     so the weights stream from memory as in a real step (one block's weights would sit in
     cache and flatter the small-row times); from 256 rows a GEMM is compute-bound and two
     blocks suffice.
  2. Calibration steps: synthetic batches run through the engine's executor (decode with
     independent sequences, decode of fork groups that share a prefix, prefill chunks with
     and without past context), each timed as the median of a few repetitions. Their block
     tables point at pool blocks filled with random KV, so no prefill is needed to set up a
     decode at context 1536. The overhead coefficients are fitted on these steps.

The calibration grid deliberately avoids the batch sizes and contexts of the validation
benchmark (benchmarks/bench_cost_model.py: 1/4/16/64 sequences at 128/512/1024/2048), so the
benchmark's error is measured on steps the fit never saw; its contexts reach 2560 so that the
validation interpolates rather than extrapolates.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ttscale.cost.hardware import local_profile_name
from ttscale.cost.shapes import StepShape
from ttscale.cost.steptime import (
    FEATURES,
    CalibrationStep,
    FitResult,
    RowTable,
    StepTimeModel,
    fit_overheads,
)
from ttscale.engine.scheduler import ScheduledSeq, SchedulerOutput
from ttscale.kvcache import KVCache
from ttscale.models.layers import Linear

if TYPE_CHECKING:
    from ttscale.engine.llm_engine import LLMEngine

TABLE_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
LM_HEAD_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Rows from which a GEMM is compute-bound, so timing two blocks (weights in cache) is honest.
STREAMING_ROWS_LIMIT = 128

# (sequences, context) of decode steps; (new tokens, past context) of prefill chunks.
DECODE_INDEPENDENT = ((1, 64), (1, 1536), (1, 2560), (2, 384), (2, 1536), (8, 64), (8, 768),
                      (8, 1536), (8, 2560), (12, 1200), (32, 64), (32, 384), (96, 64))  # fmt: skip
DECODE_SHARED = ((2, 64), (2, 768), (2, 2560), (8, 64), (8, 768), (8, 1536), (8, 2560),
                 (32, 64), (32, 768), (32, 2560), (96, 64), (96, 1536), (96, 2560))  # fmt: skip
PREFILL = ((32, 0), (192, 0), (768, 0), (1536, 0), (256, 768), (64, 1536), (256, 2304))


@dataclass(frozen=True)
class SyntheticStep:
    label: str
    seqs: list[ScheduledSeq]


@dataclass
class EngineCalibration:
    model: StepTimeModel
    steps: list[CalibrationStep]  # what was measured
    fit: FitResult  # the fit's error on those steps


def _median_times(fns: list[Callable[[], object]], reps: int) -> list[float]:
    """Median seconds of each of `fns`, timed round-robin: a disturbance that lasts a while
    (another process running for a second) then hits one repetition of many measurements,
    which the median ignores, instead of every repetition of one."""
    for fn in fns:
        fn()  # warm-up: the first call of a shape allocates and selects kernels
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


@torch.inference_mode()
def measure_row_tables(model: torch.nn.Module, reps: int = 5) -> tuple[RowTable, RowTable]:
    """(one block's matmuls, lm_head) seconds at TABLE_ROWS and LM_HEAD_ROWS rows, the median
    of `reps` round-robin repetitions."""
    blocks = [[m for m in layer.modules() if isinstance(m, Linear)] for layer in model.layers]
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(0)

    def block_run(rows: int) -> tuple[Callable[[], None], int]:
        """Runs the blocks' matmuls on `rows` rows; and how many blocks that is."""
        used = blocks if rows <= STREAMING_ROWS_LIMIT else blocks[: min(2, len(blocks))]
        widths = {m.in_features for m in blocks[0]}
        x = {w: torch.randn(rows, w, generator=gen, device=device, dtype=dtype) for w in widths}

        def run() -> None:
            for block in used:
                for m in block:
                    m(x[m.in_features])

        return run, len(used)

    def head_run(rows: int) -> Callable[[], object]:
        h = torch.randn(rows, model.config.hidden_size, generator=gen, device=device, dtype=dtype)
        return lambda: model.compute_logits(h)

    runs, counts = zip(*(block_run(r) for r in TABLE_ROWS), strict=True)
    layer_seconds = [t / n for t, n in zip(_median_times(list(runs), reps), counts, strict=True)]
    head_seconds = _median_times([head_run(r) for r in LM_HEAD_ROWS], reps)
    return RowTable(TABLE_ROWS, tuple(layer_seconds)), RowTable(LM_HEAD_ROWS, tuple(head_seconds))


def synthetic_steps(
    block_size: int, num_blocks: int, max_context: int, vocab_size: int
) -> list[SyntheticStep]:
    """The calibration batches that fit a pool of `num_blocks` blocks and the model's context.

    Block ids are handed out from 0 upwards; blocks are reused between steps (their KV is
    random either way). Decode sequences read a context of C tokens and write token C;
    fork-group members share every full block before their last `block_size // 2 + 1` tokens.
    """
    steps: list[SyntheticStep] = []
    token = min(1000, vocab_size - 1)  # any id: the step's cost does not depend on it

    def blocks_for(tokens: int) -> int:
        return -(-tokens // block_size)

    for b, c in DECODE_INDEPENDENT:
        if c > max_context or b * blocks_for(c) > num_blocks:
            continue
        n = blocks_for(c)
        seqs = [ScheduledSeq(i, [token], c - 1, list(range(i * n, (i + 1) * n))) for i in range(b)]
        steps.append(SyntheticStep(f"decode B={b} C={c} independent", seqs))
    for b, c in DECODE_SHARED:
        suffix = block_size // 2 + 1
        prefix_blocks = (c - suffix) // block_size
        if c > max_context or prefix_blocks < 2:
            continue
        tail = blocks_for(c) - prefix_blocks
        if prefix_blocks + b * tail > num_blocks:
            continue
        shared = list(range(prefix_blocks))
        seqs = []
        for i in range(b):
            first = prefix_blocks + i * tail
            seqs.append(ScheduledSeq(i, [token], c - 1, shared + list(range(first, first + tail))))
        steps.append(SyntheticStep(f"decode B={b} C={c} shared", seqs))
    for t, past in PREFILL:
        c = past + t
        if c > max_context or blocks_for(c) > num_blocks:
            continue
        seqs = [ScheduledSeq(0, [token] * t, past, list(range(blocks_for(c))))]
        steps.append(SyntheticStep(f"prefill T={t} past={past}", seqs))
    return steps


@torch.inference_mode()
def calibrate_engine(
    engine: LLMEngine,
    reps: int = 3,
    log: Callable[[str], None] | None = None,
    model_name: str = "",
) -> EngineCalibration:
    """Calibrate the step-time model on an idle `LLMEngine` (no requests in flight);
    `model_name` names it (default: the architecture).

    Synthetic batches go straight to `engine.executor` (the scheduler never sees them).
    Scribbles random KV over the pool, so the prefix cache is dropped before and after; that
    needs an executor whose pool lives in this process (`kv_cache`, as `ModelRunner`'s).
    """
    if engine.requests or engine.has_unfinished:
        raise RuntimeError("calibrate the step-time model on an idle engine (requests in flight)")
    executor = engine.executor
    kv_cache = getattr(executor, "kv_cache", None)
    if not isinstance(kv_cache, KVCache):
        raise RuntimeError(
            f"step-time calibration times the in-process executor; {type(executor).__name__} "
            "has no local KV pool"
        )
    model = engine.model
    block_size = engine.block_size
    meter = engine.cost_meter
    say = log or (lambda _msg: None)
    t_start = time.perf_counter()
    engine.reset_prefix_cache()
    try:
        say("row tables: matmuls at 1..2048 rows")
        layer_linear, lm_head = measure_row_tables(model, max(reps, 5))
        steps = synthetic_steps(
            block_size,
            executor.num_blocks,
            getattr(model.config, "max_position_embeddings", None) or 1 << 30,
            model.config.vocab_size,
        )
        if len(steps) < 6:
            raise RuntimeError(
                f"only {len(steps)} calibration steps fit this KV pool ({executor.num_blocks} "
                "blocks) and context: give the engine a larger kv_cache_gb"
            )
        _fill_random_kv(kv_cache, steps, block_size)
        shapes: dict[int, StepShape] = {}

        def step_run(i: int, batch: SchedulerOutput) -> Callable[[], None]:
            def run() -> None:
                shapes[i] = executor.execute(batch).shape

            return run

        say(f"{len(steps)} calibration steps x {reps} reps")
        runs = [step_run(i, SchedulerOutput(seqs=s.seqs)) for i, s in enumerate(steps)]
        seconds = _median_times(runs, reps)
        measured = [
            CalibrationStep(shapes[i], t, s.label)
            for i, (s, t) in enumerate(zip(steps, seconds, strict=True))
        ]
        for c in measured:
            say(f"{c.label}: {c.seconds * 1e3:.1f} ms")
    finally:
        engine.reset_prefix_cache()

    # The matmul tables alone first; the fit then prices what the steps spent beyond them.
    tables_only = StepTimeModel(
        shape=dataclasses.replace(meter.shape, name=model_name or meter.shape.name),
        dtype=meter.dtype,
        kv_bytes=meter.kv_bytes_per_value,
        threads=torch.get_num_threads(),
        layer_linear=layer_linear,
        lm_head=lm_head,
        coefficients=dict.fromkeys(FEATURES, 0.0),
        machine=local_profile_name(),
    )
    fit = fit_overheads(meter.shape, meter.kv_bytes_per_value, measured, tables_only.linear_time)
    date = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    model_fit = dataclasses.replace(
        tables_only,
        coefficients=fit.coefficients,
        source=(
            f"calibrated by ttscale on {date}: {len(measured)} synthetic steps x {reps} reps, "
            f"{time.perf_counter() - t_start:.0f} s; fit median |error| "
            f"{fit.median_abs_error:.1%} on its own steps"
        ),
        fit_median_error=fit.median_abs_error,
    )
    return EngineCalibration(model_fit, measured, fit)


def _fill_random_kv(cache: KVCache, steps: list[SyntheticStep], block_size: int) -> None:
    """Random KV in every block the steps touch: untouched pool pages would page-fault (and
    read as zeros) during the timed steps."""
    top = max(b for s in steps for q in s.seqs for b in q.block_table) + 1
    gen = torch.Generator(device=cache.device).manual_seed(0)
    cache.fill_random(top * block_size, gen)  # through store(): any pool format
