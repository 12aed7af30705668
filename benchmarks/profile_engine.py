"""Where an engine step's time goes: matmul kernels, attention, and the overhead around them.

    python benchmarks/profile_engine.py --n 1 --tokens 64                  # eager and fused
    python benchmarks/profile_engine.py --n 1 --modes eager,fused,compiled # and torch.compile
    python benchmarks/profile_engine.py --n 64 --tokens 40 --quantize none --modes eager

Runs n samples of a 150-token prompt on the embedded model (quantize auto by default) and
times the decode steps after the first: plain (ms/step as the engine runs, best of
--repeats) and once under torch.profiler, which gives the time inside the matmul kernels
(int4 / int8 / oneDNN) and inside attention (each attention call is wrapped in a
`record_function`). Overhead = profiled ms/step - matmuls - attention, all from the profiled
run: norms, RoPE, residuals, casts, Python, batch building, sampling. The profiler's own cost
(per op) inflates eager overhead more than compiled; compare plain ms/step too.
Modes, each its own engine in the same process (so the rows share the machine's load):
`eager` (LLM(fused=False): the per-op Python forward), `fused` (the default: small steps of
a quantized model in one C++ call, models/fused.py; its layers are one opaque call, so the
profile splits out only the LM head's matmul and sampling; its "overhead" holds the fused
loops and attention), `compiled` (compile=True, fused=False; compiling first, timed).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ttscale import LLM, SamplingParams
from ttscale.attention.registry import get_backend

MATMUL_OPS = (
    "aten::_weight_int4pack_mm_for_cpu",
    "aten::_weight_int8pack_mm",
    "mkldnn::_linear_pointwise",
    "aten::mm",
    "aten::addmm",
)


def _label_attention(name: str) -> None:
    """Wraps the backend's call in a profiler range, so attention shows as one entry."""
    cls = get_backend(name)
    if getattr(cls.__call__, "_profiled", False):
        return
    call = cls.__call__

    def wrapped(self, spec, q, k, v):
        with record_function("attention"):
            return call(self, spec, q, k, v)

    wrapped._profiled = True  # type: ignore[attr-defined]
    cls.__call__ = wrapped


def _decode(llm: LLM, prompt: list[int], params: SamplingParams, prof: bool):
    """Runs one request; returns (decode steps, seconds, profiler or None)."""
    engine = llm.engine
    engine.reset_prefix_cache()
    engine.add_request(f"p{time.perf_counter_ns()}", prompt, params)
    engine.step()  # prefill
    engine.step()  # first decode step: forks the samples
    steps = 0
    ctx = profile(activities=[ProfilerActivity.CPU]) if prof else None
    if ctx is not None:
        ctx.__enter__()
    t0 = time.perf_counter()
    while engine.has_unfinished:
        engine.step()
        steps += 1
    elapsed = time.perf_counter() - t0
    if ctx is not None:
        ctx.__exit__(None, None, None)
    return steps, elapsed, ctx


def measure(llm: LLM, args: argparse.Namespace, label: str) -> dict[str, float]:
    prompt = list(range(1000, 1150))
    params = SamplingParams(
        n=args.n, temperature=0.8, top_p=0.95, seed=0, max_tokens=args.tokens, ignore_eos=True
    )
    t0 = time.perf_counter()  # warm-up: compiles the step graphs when compile=True
    warm = SamplingParams(n=args.n, max_tokens=4, seed=0, ignore_eos=True)
    llm.generate([prompt], warm, use_tqdm=False)
    llm.generate([prompt], warm, use_tqdm=False)  # again, from the prefix cache
    warm_s = time.perf_counter() - t0
    best = float("inf")
    for _ in range(args.repeats):
        steps, elapsed, _ = _decode(llm, prompt, params, prof=False)
        best = min(best, elapsed / steps)
    steps, elapsed, prof = _decode(llm, prompt, params, prof=True)
    ops = prof.key_averages()
    matmul = sum(e.self_cpu_time_total for e in ops if e.key in MATMUL_OPS) / 1e6 / steps
    attention = sum(e.cpu_time_total for e in ops if e.key == "attention") / 1e6 / steps
    profiled = elapsed / steps
    result = {
        "ms/step": best * 1e3,
        "profiled ms": profiled * 1e3,
        "matmul ms": matmul * 1e3,
        "attention ms": attention * 1e3,
        "overhead ms": (profiled - matmul - attention) * 1e3,
        "warm-up s": warm_s,
    }
    if args.table:
        print(f"--- {label}: top ops by self CPU time (profiled run) ---")
        print(ops.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1, help="parallel samples")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per sample")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantize", default="auto")
    ap.add_argument("--modes", default="eager,fused", help="comma list: eager, fused, compiled")
    ap.add_argument(
        "--compare", action="store_true", help="--modes eager,compiled (older docs' commands)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="plain runs (best is kept)")
    ap.add_argument("--table", action="store_true", help="print the top ops")
    ap.add_argument("--rows", type=int, default=15, help="ops to list")
    args = ap.parse_args()
    _label_attention("fast")
    options = {
        "eager": {"fused": False},
        "fused": {"fused": True},
        "compiled": {"fused": False, "compile": True},
    }
    results = {}
    for label in ("eager,compiled" if args.compare else args.modes).split(","):
        if label not in options:
            raise SystemExit(f"unknown mode {label!r}: choose from {', '.join(options)}")
        t0 = time.perf_counter()
        llm = LLM(
            num_threads=args.threads, dtype=args.dtype, quantize=args.quantize, **options[label]
        )
        load = time.perf_counter() - t0
        results[label] = {"load s": load, **measure(llm, args, label)}
        llm.engine.shutdown()
        del llm
    print(
        f"n={args.n} quantize={args.quantize} {args.dtype} {args.threads} threads, "
        f"torch {torch.__version__}; per decode step (ms/step: best of {args.repeats} plain "
        "runs; the rest from one profiled run):"
    )
    keys = list(next(iter(results.values())))
    print(f"{'':>14}" + "".join(f"{k:>14}" for k in keys))
    for label, r in results.items():
        print(f"{label:>14}" + "".join(f"{r[k]:>14.2f}" for k in keys))


if __name__ == "__main__":
    main()
