"""How well does the cost model predict real step times? (issue: cost model validation)

For the embedded model, runs real engine steps: decode steps of B sequences at context C (B
forks of one C-token prompt, so the cascade attention reads the shared prefix once, as the
engine really does; and B independent prompts, which share nothing) plus prefill chunks,
measures each step's model time, and compares it with two predictions of the same step:

  * the step-time model (cost/steptime.py), calibrated first in this run by
    `calibrate_engine` on synthetic steps whose batch sizes and contexts are *not* the ones
    validated here (see calibration/steps.py): this is the prediction the target is for;
  * the roofline max(FLOPs / peak, bytes / bandwidth) for this machine's calibrated profile:
    a lower bound, reported as "% of hardware limit" (error >= 0 unless the profile
    underestimates the machine).

    python benchmarks/bench_cost_model.py [--threads 2] [--dtype float32|bfloat16]
                                          [--quantize auto] [--kv-cache-dtype auto|int8|...]
                                          [--sparse-attention dense|block_topk]
                                          [--kv-budget 256] [--out runs/bench_cost_model.json]

With --sparse-attention block_topk every request reads block top-k (decode rows whose context
exceeds --kv-budget), so the validated steps are sparse; the calibration's synthetic steps
stay dense, so the fit never sees a sparse step.

error = (measured - predicted) / measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ttscale import LLM, SamplingParams
from ttscale.calibration.steps import calibrate_engine
from ttscale.cost.analytic import estimate
from ttscale.cost.calibrate import calibrate
from ttscale.cost.hardware import Hardware, bound, roofline_time
from ttscale.cost.pricing import step_cost
from ttscale.cost.shapes import StepShape
from ttscale.cost.steptime import StepTimeModel


def predictions(llm: LLM, step: StepShape, hw: Hardware, step_model: StepTimeModel) -> tuple:
    """(roofline seconds, its bound, step-model seconds) of one step."""
    meter = llm.engine.cost_meter
    cost = step_cost(meter.shape, step, meter.bytes_per_value, meter.kv_bytes_per_value)
    roofline = roofline_time(cost, hw, meter.dtype)
    return roofline, bound(cost, hw, meter.dtype), step_model.predict(step)


def measure_decode(
    llm: LLM,
    hw: Hardware,
    step_model: StepTimeModel,
    batch: int,
    context: int,
    shared: bool,
    steps: int = 4,
) -> dict:
    """Median model time of `steps` decode steps of `batch` sequences at ~`context` tokens."""
    engine = llm.engine
    engine.reset_prefix_cache()
    vocab = llm.config.vocab_size
    gen = torch.Generator().manual_seed(context * 1000 + batch)
    # Long enough that no sequence finishes while others are still being prefilled in chunks.
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=4096, ignore_eos=True)
    if shared:
        prompt = torch.randint(100, vocab, (context,), generator=gen).tolist()
        engine.add_request("bench", prompt, dataclasses.replace(params, n=batch))
    else:
        for i in range(batch):
            prompt = torch.randint(100, vocab, (context,), generator=gen).tolist()
            engine.add_request(f"bench-{i}", prompt, params)
    # Prefill everything first (chunks), then time pure decode steps.
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.sequences.values()):
        engine.step()
    times, roofline, bounds, predicted, sizes = [], [], [], [], []
    for _ in range(steps):
        # The executor's time only (stats["model_time"]), not scheduling and sampling.
        before = engine.stats["model_time"]
        engine.step()
        elapsed = engine.stats["model_time"] - before
        step = engine.last_step
        assert step is not None
        r, b, p = predictions(llm, step, hw, step_model)
        times.append(elapsed)
        sizes.append(len(step.query_lens))
        roofline.append(r)
        bounds.append(b)
        predicted.append(p)
    for rid in list(engine.requests):
        engine.abort(rid)
    return {
        "measured_s": statistics.median(times),
        "predicted_s": statistics.median(predicted),
        "roofline_s": statistics.median(roofline),
        "bound": bounds[-1],
        "seqs_in_step": min(sizes),
    }


def measure_prefill(
    llm: LLM, hw: Hardware, step_model: StepTimeModel, tokens: int, reps: int = 3
) -> dict:
    engine = llm.engine
    vocab = llm.config.vocab_size
    times, roofline, predicted = [], [], []
    for r in range(reps):
        engine.reset_prefix_cache()
        prompt = torch.randint(100, vocab, (tokens,), generator=torch.Generator().manual_seed(r))
        engine.add_request("pf", prompt.tolist(), SamplingParams(max_tokens=1))
        before = engine.stats["model_time"]
        engine.step()  # the whole prompt in one chunk: tokens <= max_num_batched_tokens
        times.append(engine.stats["model_time"] - before)
        assert engine.last_step is not None and engine.last_step.num_tokens == tokens
        r_s, _, p_s = predictions(llm, engine.last_step, hw, step_model)
        roofline.append(r_s)
        predicted.append(p_s)
        engine.abort("pf")
    return {
        "measured_s": statistics.median(times),
        "predicted_s": statistics.median(predicted),
        "roofline_s": statistics.median(roofline),
    }


def measure_run(
    llm: LLM, hw: Hardware, step_model: StepTimeModel, n: int, prompt_len: int, gen_len: int
) -> dict:
    """A whole parallel-sampling run (n samples of one prompt) against the analytic what-if
    estimate that `ttscale cost --hardware local` prints for it."""
    engine = llm.engine
    engine.reset_prefix_cache()
    meter = engine.cost_meter
    cache = engine.cache_config
    est = estimate(
        meter.shape, prompt_len, gen_len, n, hw, dtype=meter.dtype,
        block_size=engine.block_size, step_model=step_model,
        weight_bytes_per_param=meter.bytes_per_value, kv_bytes=meter.kv_bytes_per_value,
        kv_budget=cache.kv_budget if cache.sparse_attention == "block_topk" else None,
        sparse_dense_layers=len(cache.sparse_dense_layers),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(n * 7 + prompt_len)
    prompt = torch.randint(100, llm.config.vocab_size, (prompt_len,), generator=gen).tolist()
    params = SamplingParams(n=n, temperature=1.0, seed=0, max_tokens=gen_len, ignore_eos=True)
    before = engine.stats["model_time"]
    engine.add_request("run", prompt, params)
    while engine.has_unfinished:
        engine.step()
    measured = engine.stats["model_time"] - before
    r = {
        "samples": n,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "measured_s": measured,
        "predicted_s": est.predicted_time,
        "roofline_s": est.time,
    }
    err = (measured - est.predicted_time) / measured
    print(
        f"run     N={n:3} P={prompt_len:5} G={gen_len:4}  measured {measured:6.2f} s  "
        f"predicted {est.predicted_time:6.2f} s (error {err:6.1%})  roofline {est.time:6.2f} s",
        flush=True,
    )
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", help="model dtype: float32 or bfloat16")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--contexts", default="128,512,1024,2048")
    ap.add_argument("--quantize", default="auto", help="LLM(quantize=...)")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--sparse-attention", default="dense", choices=("dense", "block_topk"))
    ap.add_argument("--kv-budget", type=int, default=256)
    ap.add_argument("--out", default="runs/bench_cost_model.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hw = calibrate(seconds=3.0, num_threads=args.threads)
    print(
        f"calibrated: fp32 {hw.peak_flops_fp32 / 1e9:.0f} GFLOP/s, "
        f"bandwidth {hw.mem_bandwidth / 1e9:.1f} GB/s ({args.threads} threads)"
    )
    llm = LLM(
        num_threads=args.threads,
        hardware=None,
        kv_cache_gb=6.0,
        dtype=args.dtype,
        quantize=args.quantize,
        kv_cache_dtype=args.kv_cache_dtype,
        sparse_attention=args.sparse_attention,
        kv_budget=args.kv_budget,
    )
    llm.engine.cost_meter.hardware = hw
    t0 = time.perf_counter()
    calibration = calibrate_engine(llm.engine)
    step_model = calibration.model
    fit_error = calibration.fit.median_abs_error
    print(
        f"step-time model: {len(calibration.steps)} calibration steps in "
        f"{time.perf_counter() - t0:.0f} s, fit median |error| {fit_error:.1%}"
    )
    for name, value in step_model.coefficients.items():
        print(f"  {name:24} {value:.3e} s")
    rows = []
    for context in map(int, args.contexts.split(",")):
        for batch in map(int, args.batches.split(",")):
            # Independent prompts are prefilled B times: keep that under ~16k tokens.
            modes = (True, False) if batch > 1 and batch * context <= 16384 else (True,)
            for shared in modes:
                r = measure_decode(llm, hw, step_model, batch, context, shared)
                r.update(kind="decode", batch=batch, context=context, shared=shared)
                rows.append(r)
                print_row(r)
    for tokens in (128, 512, 1024, 2048):
        r = measure_prefill(llm, hw, step_model, tokens)
        r.update(kind="prefill", batch=1, context=tokens, shared=False, bound="compute")
        rows.append(r)
        print_row(r)
    runs = [
        measure_run(llm, hw, step_model, n, p, g) for n, p, g in ((16, 128, 64), (4, 1024, 256))
    ]
    errors = [abs(r["measured_s"] - r["predicted_s"]) / r["measured_s"] for r in rows]
    gaps = [(r["measured_s"] - r["roofline_s"]) / r["measured_s"] for r in rows]
    print(
        f"step-time model: median |error| {statistics.median(errors):.1%}, max {max(errors):.1%}"
        f"; roofline: median gap {statistics.median(gaps):.1%}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "threads": args.threads,
                "dtype": args.dtype,
                "options": {
                    k: getattr(args, k)
                    for k in ("quantize", "kv_cache_dtype", "sparse_attention", "kv_budget")
                },
                "hardware": hw.to_dict(),
                "step_model": step_model.to_dict(),
                "calibration_steps": [
                    {"label": c.label, "measured_s": c.seconds} for c in calibration.steps
                ],
                "rows": rows,
                "runs": runs,
                "median_abs_error": statistics.median(errors),
                "median_roofline_gap": statistics.median(gaps),
            },
            indent=2,
        )
    )


def print_row(r: dict) -> None:
    err = (r["measured_s"] - r["predicted_s"]) / r["measured_s"]
    gap = (r["measured_s"] - r["roofline_s"]) / r["measured_s"]
    tag = "shared" if r.get("shared") else "indep."
    assert r.get("seqs_in_step", r["batch"]) == r["batch"], r
    print(
        f"{r['kind']:7} B={r['batch']:3} C={r['context']:5} {tag:6} "
        f"measured {r['measured_s'] * 1e3:8.1f} ms  predicted {r['predicted_s'] * 1e3:8.1f} ms "
        f"(error {err:6.1%})  roofline {r['roofline_s'] * 1e3:8.1f} ms ({gap:4.0%} below, "
        f"{r.get('bound', '')})",
        flush=True,
    )


if __name__ == "__main__":
    main()
