#!/usr/bin/env python
"""Single-stream greedy decode (best of 3 x 128 tokens) and one n=16 sampling run, fp32 weights
(`quantize="none"` where the option exists), 2 threads: a quick same-process check between
commits, run back to back, each from a git worktree:

    git worktree add /tmp/wt_OLD OLD
    PYTHONPATH=/tmp/wt_OLD/src python benchmarks/decode_check.py OLD
    python benchmarks/decode_check.py HEAD [bfloat16]

and between engine options on one tree (compile once first: its time is reported apart):

    python benchmarks/decode_check.py eager --quantize auto
    python benchmarks/decode_check.py compiled --quantize auto --compile
    python benchmarks/decode_check.py self-spec --quantize none --speculative self
"""

import argparse
import inspect
import time

import torch

from ttscale import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("label", nargs="?", default="this tree")
    ap.add_argument("dtype", nargs="?", default="float32")
    ap.add_argument("--quantize", default="none")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--speculative", default=None, help="prompt_lookup | self")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    accepted = inspect.signature(LLM.__init__).parameters
    kw = {"quantize": args.quantize} if "quantize" in accepted else {}
    if args.compile:
        kw["compile"] = True
    if args.speculative:
        kw["speculative"] = args.speculative
    llm = LLM(num_threads=args.threads, dtype=args.dtype, **kw)
    message = {"role": "user", "content": "Write a story about a robot who paints."}
    ids = llm.tokenizer.encode_chat([message])
    greedy = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    # Warm-up; with --compile it compiles the step graphs (loads them from disk when cached).
    t0 = time.perf_counter()
    warm = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate([ids], warm, use_tqdm=False)
    llm.generate([ids], SamplingParams(n=16, max_tokens=4, seed=0), use_tqdm=False)
    warm_s = time.perf_counter() - t0
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        usage = llm.generate([ids], greedy, use_tqdm=False)[0].usage
        best = max(best, 128 / (time.perf_counter() - t0))
    sixteen = SamplingParams(
        n=16, temperature=0.8, top_p=0.95, max_tokens=64, ignore_eos=True, seed=0
    )
    t0 = time.perf_counter()
    llm.generate([ids], sixteen, use_tqdm=False)
    n16 = 16 * 64 / (time.perf_counter() - t0)
    print(
        f"{args.label} {args.dtype} quantize={args.quantize}: single {best:.1f} tok/s  "
        f"n16 {n16:.1f} tok/s  (load {llm.load_seconds:.1f} s, warm-up {warm_s:.1f} s)"
    )
    if usage.acceptance_rate is not None:
        print(
            f"  single: draft acceptance {usage.acceptance_rate:.2f}, "
            f"{usage.tokens_per_step:.2f} tokens per verifying step"
        )


if __name__ == "__main__":
    main()
