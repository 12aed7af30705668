"""`ttscale cost` (what-if pricing of a run) and `ttscale calibrate` (measure this machine).

The lead registers these on the main CLI:

    app.command("cost")(cost)
    app.command("calibrate")(calibrate_cmd)

and `python -m ttscale.cost.cli cost --model default --prompt-len 512 --gen-len 4096` runs
them standalone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ttscale.cost.analytic import Estimate, estimate, parse_strategy
from ttscale.cost.hardware import (
    Hardware,
    load_hardware,
    local_profile_name,
    normalize_dtype,
    save_hardware,
)
from ttscale.cost.model import ModelShape, load_shape
from ttscale.cost.steptime import StepTimeModel, find_step_model

_out = Console()
_err = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    _err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=2)


def _si(value: float, unit: str) -> str:
    """1.23e12, "FLOP" -> "1.23 TFLOP" (decimal prefixes)."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g} {unit}"
    for factor, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    if abs(value) >= 1e3:
        return f"{value / 1e3:.3g} k{unit}"
    return f"{value:.3g} {unit}"


def _gib(n: float) -> str:
    """Memory capacities in binary units, as data sheets and nvidia-smi count them."""
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def _seconds(t: float) -> str:
    if t >= 1000:
        return f"{t:,.0f} s"
    if t >= 1:
        return f"{t:.3g} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3g} ms"
    return f"{t * 1e6:.3g} µs"


def _print_estimate(est: Estimate, hw: Hardware, step_model: StepTimeModel | None) -> None:
    run = est.run
    strategy = est.strategy
    title = (
        f"{est.model} on {hw.name} ({est.dtype}): "
        f"{strategy.spec if strategy else ''} N={run.num_samples}, "
        f"prompt {run.prompt_len} + gen {run.gen_len} tokens, "
        f"prefix {'shared' if run.share_prefix else 'not shared'}"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for col in ("prefill", "decode", "total"):
        table.add_column(col, justify="right")
    pre, dec, tot = est.prefill, est.decode, est.total

    def row(label: str, f: Any) -> None:
        table.add_row(label, *(f(x) for x in (pre, dec, None)))

    row("steps", lambda ph: str(ph.steps if ph else pre.steps + dec.steps))
    row("tokens computed", lambda ph: f"{ph.tokens if ph else pre.tokens + dec.tokens:,}")
    row("FLOPs", lambda ph: _si((ph.cost if ph else tot).flops, "FLOP"))
    row("bytes", lambda ph: _si((ph.cost if ph else tot).bytes, "B"))
    row("  weights read", lambda ph: _si((ph.cost if ph else tot).bytes_weights, "B"))
    row("  KV read", lambda ph: _si((ph.cost if ph else tot).bytes_kv_read, "B"))
    row("  KV written", lambda ph: _si((ph.cost if ph else tot).bytes_kv_write, "B"))
    row("  logits written", lambda ph: _si((ph.cost if ph else tot).bytes_activations, "B"))
    row(
        "compute time (FLOPs/peak)",
        lambda ph: _seconds(ph.compute_time if ph else pre.compute_time + dec.compute_time),
    )
    row(
        "memory time (bytes/bw)",
        lambda ph: _seconds(ph.memory_time if ph else pre.memory_time + dec.memory_time),
    )
    row("roofline time", lambda ph: _seconds(ph.time) if ph else f"[bold]{_seconds(est.time)}[/]")
    row("bound", lambda ph: ph.bound if ph else "")
    row(
        "eFLOPs",
        lambda ph: _si(ph.efflops, "FLOP") if ph else f"[bold]{_si(est.efflops, 'FLOP')}[/]",
    )
    if est.predicted_time is not None:
        total = f"[bold]{_seconds(est.predicted_time)}[/]"
        row(
            "predicted time here (calibrated)",
            lambda ph: _seconds(ph.predicted_time) if ph else total,
        )
    _out.print(table)

    mem = Table(show_header=False, box=None, padding=(0, 2))
    mem.add_column(justify="left")
    mem.add_column(justify="right")
    mem.add_row("weights", _gib(est.weight_bytes))
    mem.add_row("peak KV, prefix shared", _gib(est.peak_kv_bytes_shared))
    mem.add_row("peak KV, not shared", _gib(est.peak_kv_bytes_unshared))
    fits = "[green]yes[/]" if est.fits_memory else "[red]no[/]"
    mem.add_row(f"weights + peak KV fit in {_gib(hw.memory_bytes)}", fits)
    mem.add_row("generated tokens / s (roofline)", f"{est.tokens_per_second:,.0f}")
    mem.add_row("hardware intensity I = peak / bandwidth", f"{hw.intensity(est.dtype):,.0f} FLOP/B")
    _out.print(mem)
    if strategy is not None and strategy.approximate:
        _out.print(f"[yellow]approximation:[/] {strategy.note}", highlight=False)
    _out.print(f"[dim]hardware: {hw.source}[/]", highlight=False)
    if est.predicted_time is not None and step_model is not None:
        _out.print(f"[dim]predicted time: step-time model {step_model.source}[/]", highlight=False)


def cost(
    prompt_len: Annotated[int, typer.Option("--prompt-len", "-p", help="Prompt tokens.")],
    gen_len: Annotated[int, typer.Option("--gen-len", "-g", help="Generated tokens per sample.")],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="Model folder, config.json or .gguf, or a known name "
            "(default = SmolLM2-135M, qwen3-8b, llama-3.1-8b, ...).",
        ),
    ] = "default",
    strategy: Annotated[
        str,
        typer.Option(
            help="greedy, sample@N, majority@N, weighted@N, bon@N, beam@N/M, dvts@N/M, tree@N, "
            "adaptive@N"
        ),
    ] = "majority@8",
    hardware: Annotated[
        str,
        typer.Option(
            help="Preset (h100, h200, a100, l4), 'local', a saved profile or a JSON file."
        ),
    ] = "h100",
    dtype: Annotated[str, typer.Option(help="Compute dtype: bf16, fp16 or fp32.")] = "bf16",
    share_prefix: Annotated[
        bool, typer.Option(help="Samples share the prompt's KV blocks (and read them once).")
    ] = True,
    block_size: Annotated[
        int | None, typer.Option(help="KV block size (default: token-granular sharing).")
    ] = None,
    weight_bytes: Annotated[
        float | None,
        typer.Option(help="Bytes per weight if not the dtype's (e.g. 0.5625 for 4.5-bit)."),
    ] = None,
    profile_dir: Annotated[
        Path | None, typer.Option(help="Where saved hardware profiles live.")
    ] = None,
    step_model: Annotated[
        str,
        typer.Option(
            help="Predict this engine's wall time with a step-time calibration: 'auto' (this "
            "machine's, from `ttscale calibrate --model`, when --hardware is this machine), "
            "'none', or a JSON file."
        ),
    ] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Price a test-time-scaling run (FLOPs, bytes, roofline time, KV memory) without running
    the model."""
    try:
        shape = load_shape(model)
        hw = load_hardware(hardware, profile_dir)
        strat = parse_strategy(strategy)
        steps = _step_model(step_model, shape, dtype, hw, profile_dir)
        est = estimate(
            shape,
            prompt_len,
            gen_len,
            strat.num_samples,
            hw,
            share_prefix=share_prefix,
            dtype=dtype,
            block_size=block_size,
            weight_bytes_per_param=weight_bytes,
            strategy=strat,
            step_model=steps,
        )
    except (ValueError, FileNotFoundError) as e:
        raise _fail(str(e)) from None
    if json_out:
        data: dict[str, Any] = est.to_dict()
        data["hardware_profile"] = hw.to_dict()
        data["step_model_source"] = steps.source if steps else None
        typer.echo(json.dumps(data, indent=2))
    else:
        _print_estimate(est, hw, steps)


def _step_model(
    spec: str, shape: ModelShape, dtype: str, hw: Hardware, profile_dir: Path | None
) -> StepTimeModel | None:
    """The step-time calibration `spec` names (see `cost --step-model`)."""
    key = spec.strip().lower()
    if key == "none":
        return None
    if key == "auto":
        # Only this machine's calibration predicts this machine's time.
        if hw.name != local_profile_name():
            return None
        return find_step_model(shape, normalize_dtype(dtype), directory=profile_dir)
    model = StepTimeModel.load(spec)
    if not model.matches(shape, normalize_dtype(dtype)):
        raise ValueError(
            f"{spec}: calibrated for {model.shape.name} in {model.dtype}, "
            f"not {shape.name} in {normalize_dtype(dtype)}"
        )
    return model


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
        raise _fail(str(e)) from None
    hw = cal.to_hardware()
    try:
        path = save_hardware(hw, profile_dir) if save else None
        steps = _calibrate_steps(model, dtype, threads, save, profile_dir, quiet=json_out)
    except OSError as e:
        raise _fail(f"cannot save the profile: {e}") from None
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
    table.add_row(f"matmul fp32 ({cal.gemm_size_fp32}³ GEMM)", _si(cal.matmul_flops_fp32, "FLOP/s"))
    table.add_row(f"matmul bf16 ({cal.gemm_size_bf16}³ GEMM)", _si(cal.matmul_flops_bf16, "FLOP/s"))
    table.add_row(
        f"read bandwidth (sum, {cal.array_bytes >> 20} MiB)", _si(cal.read_bandwidth, "B/s")
    )
    table.add_row("copy bandwidth (read + write)", _si(cal.copy_bandwidth, "B/s"))
    table.add_row("memory", _gib(hw.memory_bytes))
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
    from ttscale import LLM
    from ttscale.cost.calibrate_steps import calibrate_engine

    try:
        llm = LLM(None if model == "default" else model, dtype=dtype, num_threads=threads,
                  hardware=None)  # fmt: skip
        log = None if quiet else (lambda msg: _err.print(f"[dim]{msg}[/]", highlight=False))
        result = calibrate_engine(llm.engine, log=log, model_name=Path(llm.source).stem)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise _fail(str(e)) from None
    return result.model, result.model.save(profile_dir) if save else None


def _print_step_model(model: StepTimeModel, path: Path | None) -> None:
    title = f"step-time model: {model.shape.name} ({model.dtype}, {model.threads} threads)"
    table = Table(title=title)
    table.add_column("term")
    table.add_column("seconds per unit", justify="right")
    table.add_row("one block's matmuls, 1 row", _seconds(model.layer_linear(1)))
    table.add_row("one block's matmuls, 64 rows", _seconds(model.layer_linear(64)))
    table.add_row("lm_head, 1 row", _seconds(model.lm_head(1)))
    for name, value in model.coefficients.items():
        table.add_row(name, f"{value:.3g} s")
    _out.print(table)
    _out.print(f"[dim]{model.source}[/]", highlight=False)
    if path:
        _out.print(f"saved to {path} (`ttscale cost --hardware local` uses it)", highlight=False)


cost_app = typer.Typer(help="ttscale cost model (standalone).", no_args_is_help=True)
cost_app.command("cost")(cost)
cost_app.command("calibrate")(calibrate_cmd)

if __name__ == "__main__":
    cost_app()
