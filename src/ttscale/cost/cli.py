"""`ttscale cost`: what-if pricing of a run, without running the model.

`ttscale.cli` registers it; `fail` and the `format_*` helpers are shared with
`ttscale calibrate` (ttscale.calibration.cli).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.table import Table

from ttscale.cost.analytic import SPARSE_BLOCK, Estimate, estimate, strategy_cost_profile
from ttscale.cost.hardware import Hardware, load_hardware, local_profile_name, normalize_dtype
from ttscale.cost.shapes import ModelShape, load_shape
from ttscale.cost.steptime import StepTimeModel, find_step_model
from ttscale.kvcache.config import CacheConfig, canonical_kv_format, check_sparse
from ttscale.kvcache.quant import kv_bytes_per_value

_out = Console()
_err = Console(stderr=True)


def fail(message: str) -> typer.Exit:
    _err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=2)


def format_si(value: float, unit: str) -> str:
    """1.23e12, "FLOP" -> "1.23 TFLOP" (decimal prefixes)."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g} {unit}"
    for factor, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    if abs(value) >= 1e3:
        return f"{value / 1e3:.3g} k{unit}"
    return f"{value:.3g} {unit}"


def format_gib(n: float) -> str:
    """Memory capacities in binary units, as data sheets and nvidia-smi count them."""
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def format_seconds(t: float) -> str:
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
        + (f", block top-k B={run.kv_budget}" if run.kv_budget is not None else "")
        + f", KV {est.kv_bytes:.3g} B/value"
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
    row("FLOPs", lambda ph: format_si((ph.cost if ph else tot).flops, "FLOP"))
    row("bytes", lambda ph: format_si((ph.cost if ph else tot).bytes, "B"))
    row("  weights read", lambda ph: format_si((ph.cost if ph else tot).bytes_weights, "B"))
    row("  KV read", lambda ph: format_si((ph.cost if ph else tot).bytes_kv_read, "B"))
    row("  KV written", lambda ph: format_si((ph.cost if ph else tot).bytes_kv_write, "B"))
    row("  logits written", lambda ph: format_si((ph.cost if ph else tot).bytes_activations, "B"))
    row(
        "compute time (FLOPs/peak)",
        lambda ph: format_seconds(ph.compute_time if ph else pre.compute_time + dec.compute_time),
    )
    row(
        "memory time (bytes/bw)",
        lambda ph: format_seconds(ph.memory_time if ph else pre.memory_time + dec.memory_time),
    )
    row(
        "roofline time",
        lambda ph: format_seconds(ph.time) if ph else f"[bold]{format_seconds(est.time)}[/]",
    )
    row("bound", lambda ph: ph.bound if ph else "")
    row(
        "eFLOPs",
        lambda ph: (
            format_si(ph.efflops, "FLOP") if ph else f"[bold]{format_si(est.efflops, 'FLOP')}[/]"
        ),
    )
    if est.predicted_time is not None:
        total = f"[bold]{format_seconds(est.predicted_time)}[/]"
        row(
            "predicted time here (calibrated)",
            lambda ph: format_seconds(ph.predicted_time) if ph else total,
        )
    _out.print(table)

    mem = Table(show_header=False, box=None, padding=(0, 2))
    mem.add_column(justify="left")
    mem.add_column(justify="right")
    mem.add_row("weights", format_gib(est.weight_bytes))
    mem.add_row("peak KV, prefix shared", format_gib(est.peak_kv_bytes_shared))
    mem.add_row("peak KV, not shared", format_gib(est.peak_kv_bytes_unshared))
    fits = "[green]yes[/]" if est.fits_memory else "[red]no[/]"
    mem.add_row(f"weights + peak KV fit in {format_gib(hw.memory_bytes)}", fits)
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
    sparse: Annotated[
        str,
        typer.Option(help="Decode attention: dense or block_topk (Kinetics block top-k)."),
    ] = "dense",
    kv_budget: Annotated[
        int, typer.Option(help="Block top-k: KV tokens each sample reads per decode step.")
    ] = 256,
    sparse_dense_layers: Annotated[
        int, typer.Option(help="Block top-k: layers kept dense (the engine's default: 1).")
    ] = 1,
    kv_dtype: Annotated[
        str,
        typer.Option(
            help="KV cache format: auto (the compute dtype), bf16, fp16, fp32, int8, kivi4, kivi2."
        ),
    ] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Price a test-time-scaling run (FLOPs, bytes, roofline time, KV memory) without running
    the model."""
    try:
        shape = load_shape(model)
        hw = load_hardware(hardware, profile_dir)
        strat = strategy_cost_profile(strategy)
        steps = _step_model(step_model, shape, dtype, hw, profile_dir)
        budget = _sparse_budget(sparse, kv_budget, block_size)
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
            kv_budget=budget,
            sparse_dense_layers=sparse_dense_layers,
            kv_bytes=_kv_bytes(kv_dtype, shape, dtype, block_size),
        )
    except (ValueError, FileNotFoundError) as e:
        raise fail(str(e)) from None
    if json_out:
        data: dict[str, Any] = est.to_dict()
        data["hardware_profile"] = hw.to_dict()
        data["step_model_source"] = steps.source if steps else None
        typer.echo(json.dumps(data, indent=2))
    else:
        _print_estimate(est, hw, steps)


def _sparse_budget(policy: str, budget: int, block_size: int | None) -> int | None:
    """The budget to price, None for dense; the engine's own checks and messages."""
    window = CacheConfig().sparse_window  # the engine's default local window
    check_sparse(policy, budget, block_size or SPARSE_BLOCK, window, "--sparse")
    return budget if policy == "block_topk" else None


def _kv_bytes(kv_dtype: str, shape: ModelShape, dtype: str, block_size: int | None) -> float | None:
    """Bytes per K/V value of a KV format (scales included); None: the compute dtype's."""
    fmt = canonical_kv_format(kv_dtype, "--kv-dtype")
    if fmt == "auto":
        return None
    compute = {"fp32": torch.float32, "fp16": torch.float16}.get(normalize_dtype(dtype))
    # The engine's default block: 32 for the KIVI formats (kvcache/config.py), else 16.
    block = block_size or CacheConfig(kv_cache_dtype=fmt).block_size
    return kv_bytes_per_value(fmt, shape.head_dim, compute or torch.bfloat16, block)


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
