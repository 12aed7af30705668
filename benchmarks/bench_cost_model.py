"""How well does the cost model predict real step times? (issue: cost model validation)

For the embedded model, runs decode steps of B sequences at context C (B forks of one C-token
prompt, so the cascade attention reads the shared prefix once, as the engine really does; and
B independent prompts, which share nothing) plus prefill chunks, measures each step's model
time, and compares it with the roofline prediction max(FLOPs / peak, bytes / bandwidth) of the
same step, for this machine's calibrated profile.

    python benchmarks/bench_cost_model.py [--threads 2] [--out runs/bench_cost_model.json]

Prints the error table (error = (measured - predicted) / measured; the roofline is a lower
bound, so errors are >= 0 unless the profile underestimates the machine).
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
from ttscale.cost.calibrate import calibrate
from ttscale.cost.hardware import bound, roofline_time
from ttscale.cost.model import StepShape, step_cost


def measure_decode(llm: LLM, batch: int, context: int, shared: bool, steps: int = 4) -> dict:
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
    times, predicted, bounds, sizes = [], [], [], []
    shape, hw, dtype = engine.cost_meter.shape, engine.cost_meter.hardware, "fp32"
    for _ in range(steps):
        batch_out = engine.scheduler.schedule()
        t0 = time.perf_counter()
        logits = engine.runner.run(batch_out)
        elapsed = time.perf_counter() - t0
        step = StepShape(
            query_lens=tuple(len(s.token_ids) for s in batch_out.seqs),
            context_lens=tuple(s.start_pos + len(s.token_ids) for s in batch_out.seqs),
            kv_tokens_read=engine.runner.last_kv_tokens_read,
            num_logits=logits.shape[0],
        )
        cost = step_cost(shape, step, 4, 4)
        engine._update(batch_out, logits)
        times.append(elapsed)
        sizes.append(len(batch_out.seqs))
        predicted.append(roofline_time(cost, hw, dtype))
        bounds.append(bound(cost, hw, dtype))
    for rid in list(engine.requests):
        engine.abort(rid)
    return {
        "measured_s": statistics.median(times),
        "predicted_s": statistics.median(predicted),
        "bound": bounds[-1],
        "seqs_in_step": min(sizes),
    }


def measure_prefill(llm: LLM, tokens: int, reps: int = 3) -> dict:
    engine = llm.engine
    vocab = llm.config.vocab_size
    times, predicted = [], []
    hw = engine.cost_meter.hardware
    for r in range(reps):
        engine.reset_prefix_cache()
        prompt = torch.randint(100, vocab, (tokens,), generator=torch.Generator().manual_seed(r))
        engine.add_request("pf", prompt.tolist(), SamplingParams(max_tokens=1))
        batch_out = engine.scheduler.schedule()
        t0 = time.perf_counter()
        logits = engine.runner.run(batch_out)
        times.append(time.perf_counter() - t0)
        step = StepShape(
            query_lens=tuple(len(s.token_ids) for s in batch_out.seqs),
            context_lens=tuple(s.start_pos + len(s.token_ids) for s in batch_out.seqs),
            kv_tokens_read=engine.runner.last_kv_tokens_read,
            num_logits=logits.shape[0],
        )
        predicted.append(roofline_time(step_cost(engine.cost_meter.shape, step, 4, 4), hw, "fp32"))
        engine._update(batch_out, logits)
        engine.abort("pf")
    return {"measured_s": statistics.median(times), "predicted_s": statistics.median(predicted)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--contexts", default="128,512,1024,2048")
    ap.add_argument("--out", default="runs/bench_cost_model.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hw = calibrate(seconds=3.0, num_threads=args.threads)
    print(
        f"calibrated: fp32 {hw.peak_flops_fp32 / 1e9:.0f} GFLOP/s, "
        f"bandwidth {hw.mem_bandwidth / 1e9:.1f} GB/s ({args.threads} threads)"
    )
    llm = LLM(num_threads=args.threads, hardware=None, kv_cache_gb=6.0)
    llm.engine.cost_meter.hardware = hw
    rows = []
    for context in map(int, args.contexts.split(",")):
        for batch in map(int, args.batches.split(",")):
            # Independent prompts are prefilled B times: keep that under ~16k tokens.
            modes = (True, False) if batch > 1 and batch * context <= 16384 else (True,)
            for shared in modes:
                r = measure_decode(llm, batch, context, shared)
                r.update(kind="decode", batch=batch, context=context, shared=shared)
                rows.append(r)
                print_row(r)
    for tokens in (128, 512, 1024, 2048):
        r = measure_prefill(llm, tokens)
        r.update(kind="prefill", batch=1, context=tokens, shared=False, bound="compute")
        rows.append(r)
        print_row(r)
    errors = [abs(r["measured_s"] - r["predicted_s"]) / r["measured_s"] for r in rows]
    print(f"median |error| {statistics.median(errors):.1%}, max {max(errors):.1%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "threads": args.threads,
                "hardware": hw.to_dict(),
                "rows": rows,
                "median_abs_error": statistics.median(errors),
            },
            indent=2,
        )
    )


def print_row(r: dict) -> None:
    err = (r["measured_s"] - r["predicted_s"]) / r["measured_s"]
    tag = "shared" if r.get("shared") else "indep."
    assert r.get("seqs_in_step", r["batch"]) == r["batch"], r
    print(
        f"{r['kind']:7} B={r['batch']:3} C={r['context']:5} {tag:6} "
        f"measured {r['measured_s'] * 1e3:8.1f} ms  predicted {r['predicted_s'] * 1e3:8.1f} ms  "
        f"error {err:6.1%}  ({r.get('bound', '')})",
        flush=True,
    )


if __name__ == "__main__":
    main()
