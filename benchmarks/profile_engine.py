"""Where an engine step's time goes: torch profiler over the decode steps of one request.

    python benchmarks/profile_engine.py --n 64 --tokens 40 [--dtype bfloat16] [--threads 2]

Runs n samples of a 150-token prompt on the embedded model, profiles every decode step after
the first, and prints the ms per step and the top torch ops by self CPU time (host time the
profiler does not attribute to an op is Python: batch preparation, sampling, bookkeeping).
"""

from __future__ import annotations

import argparse
import time

from torch.profiler import ProfilerActivity, profile

from ttscale import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=64, help="parallel samples")
    ap.add_argument("--tokens", type=int, default=40, help="new tokens per sample")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rows", type=int, default=15, help="ops to list")
    args = ap.parse_args()
    llm = LLM(num_threads=args.threads, dtype=args.dtype)
    prompt = list(range(1000, 1150))
    params = SamplingParams(
        n=args.n, temperature=0.8, top_p=0.95, seed=0, max_tokens=args.tokens, ignore_eos=True
    )
    llm.generate([prompt], SamplingParams(n=2, max_tokens=4, seed=0), use_tqdm=False)  # warm-up
    llm.engine.reset_prefix_cache()
    engine = llm.engine
    engine.add_request("profiled", prompt, params)
    engine.step()  # prefill
    engine.step()  # first decode step: forks the samples
    steps = 0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        while engine.has_unfinished:
            engine.step()
            steps += 1
        elapsed = time.perf_counter() - t0
    ops = prof.key_averages()
    op_time = sum(e.self_cpu_time_total for e in ops) / 1e6
    print(
        f"n={args.n} {args.dtype} {args.threads} threads: {steps} decode steps, "
        f"{elapsed / steps * 1e3:.1f} ms/step ({op_time / steps * 1e3:.1f} ms in torch ops; "
        "the profiler itself adds some)"
    )
    print(ops.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
