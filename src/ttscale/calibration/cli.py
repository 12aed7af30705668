"""`ttscale calibrate`: measure this machine's roofline and, with --model, the engine's step
time (which loads and drives an engine, hence above the cost model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ttscale.cost.cli import fail, format_gib, format_seconds, format_si
from ttscale.cost.hardware import save_hardware
from ttscale.cost.steptime import StepTimeModel

_out = Console()
_err = Console(stderr=True)


def calibrate_cmd(
    seconds: Annotated[float, typer.Option(help="Measurement budget in seconds.")] = 3.0,
    save: Annotated[
        bool, typer.Option(help="Save the profile (then --hardware local finds it).")
    ] = True,
    threads: Annotated[int | None, typer.Option(help="Torch threads (default: all).")] = None,
    profile_dir: Annotated[
        Path | None, typer.Option(help="Where to save (default ~/.cache/ttscale/hardware).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Also calibrate the engine's step time for this model (folder, .gguf or "
            "'default'; ~30 s), so `ttscale cost --hardware local` predicts wall time."
        ),
    ] = None,
    dtype: Annotated[str, typer.Option(help="Model dtype for --model.")] = "float32",
    json_out: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
) -> None:
    """Measure this machine's matmul FLOP/s and memory bandwidth and save its profile; with
    --model, also calibrate the engine's step-time model for that model."""
    from ttscale.cost.calibrate import measure  # torch import only when calibrating

    try:
        cal = measure(seconds, threads)
    except ValueError as e:
        raise fail(str(e)) from None
    hw = cal.to_hardware()
    try:
        path = save_hardware(hw, profile_dir) if save else None
        steps = _calibrate_steps(model, dtype, threads, save, profile_dir, quiet=json_out)
    except OSError as e:
        raise fail(f"cannot save the profile: {e}") from None
    if json_out:
        typer.echo(
            json.dumps(
                {
                    "profile": hw.to_dict(),
                    "measurement": {
                        "matmul_flops_fp32": cal.matmul_flops_fp32,
                        "matmul_flops_bf16": cal.matmul_flops_bf16,
                        "gemm_size_fp32": cal.gemm_size_fp32,
                        "gemm_size_bf16": cal.gemm_size_bf16,
                        "read_bandwidth": cal.read_bandwidth,
                        "copy_bandwidth": cal.copy_bandwidth,
                        "array_bytes": cal.array_bytes,
                        "threads": cal.threads,
                        "seconds": cal.seconds,
                    },
                    "saved_to": str(path) if path else None,
                    "step_model": steps[0].to_dict() if steps else None,
                    "step_model_saved_to": str(steps[1]) if steps and steps[1] else None,
                },
                indent=2,
            )
        )
        return
    table = Table(title=f"{hw.name} ({cal.threads} threads, {cal.seconds:.1f} s)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row(
        f"matmul fp32 ({cal.gemm_size_fp32}³ GEMM)", format_si(cal.matmul_flops_fp32, "FLOP/s")
    )
    table.add_row(
        f"matmul bf16 ({cal.gemm_size_bf16}³ GEMM)", format_si(cal.matmul_flops_bf16, "FLOP/s")
    )
    table.add_row(
        f"read bandwidth (sum, {cal.array_bytes >> 20} MiB)", format_si(cal.read_bandwidth, "B/s")
    )
    table.add_row("copy bandwidth (read + write)", format_si(cal.copy_bandwidth, "B/s"))
    table.add_row("memory", format_gib(hw.memory_bytes))
    table.add_row("intensity I (bf16)", f"{hw.intensity('bf16'):.1f} FLOP/B")
    _out.print(table)
    if path:
        where = "" if profile_dir is None else f" --profile-dir {profile_dir}"
        _out.print(f"saved to {path} (use --hardware local{where})", highlight=False)
    if steps:
        _print_step_model(*steps)


def _calibrate_steps(
    model: str | None,
    dtype: str,
    threads: int | None,
    save: bool,
    profile_dir: Path | None,
    quiet: bool,
) -> tuple[StepTimeModel, Path | None] | None:
    """Load `model` and calibrate its step-time model (None without --model)."""
    if model is None:
        return None
    from ttscale.calibration.steps import calibrate_engine
    from ttscale.llm import LLM

    try:
        llm = LLM(None if model == "default" else model, dtype=dtype, num_threads=threads,
                  hardware=None)  # fmt: skip
        log = None if quiet else (lambda msg: _err.print(f"[dim]{msg}[/]", highlight=False))
        result = calibrate_engine(llm.engine, log=log, model_name=Path(llm.source).stem)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise fail(str(e)) from None
    return result.model, result.model.save(profile_dir) if save else None


def _print_step_model(model: StepTimeModel, path: Path | None) -> None:
    title = f"step-time model: {model.shape.name} ({model.dtype}, {model.threads} threads)"
    table = Table(title=title)
    table.add_column("term")
    table.add_column("seconds per unit", justify="right")
    table.add_row("one block's matmuls, 1 row", format_seconds(model.layer_linear(1)))
    table.add_row("one block's matmuls, 64 rows", format_seconds(model.layer_linear(64)))
    table.add_row("lm_head, 1 row", format_seconds(model.lm_head(1)))
    for name, value in model.coefficients.items():
        table.add_row(name, f"{value:.3g} s")
    _out.print(table)
    _out.print(f"[dim]{model.source}[/]", highlight=False)
    if path:
        _out.print(f"saved to {path} (`ttscale cost --hardware local` uses it)", highlight=False)
