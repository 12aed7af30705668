#!/usr/bin/env python
"""Single-stream greedy decode (best of 3 x 128 tokens) and one n=16 sampling run, fp32 weights
(`quantize="none"` where the option exists), 2 threads: a quick same-process check between
commits, run back to back, each from a git worktree:

    git worktree add /tmp/wt_OLD OLD
    PYTHONPATH=/tmp/wt_OLD/src python benchmarks/decode_check.py OLD
    python benchmarks/decode_check.py HEAD [bfloat16]
"""

import inspect
import sys
import time

import torch

from ttscale import LLM, SamplingParams


def main() -> None:
    torch.set_num_threads(2)
    kw = {"quantize": "none"} if "quantize" in inspect.signature(LLM.__init__).parameters else {}
    dtype = sys.argv[2] if len(sys.argv) > 2 else "float32"
    llm = LLM(num_threads=2, dtype=dtype, **kw)
    message = {"role": "user", "content": "Write a story about a robot who paints."}
    ids = llm.tokenizer.encode_chat([message])
    greedy = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    llm.generate(
        [ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        llm.generate([ids], greedy, use_tqdm=False)
        best = max(best, 128 / (time.perf_counter() - t0))
    sixteen = SamplingParams(
        n=16, temperature=0.8, top_p=0.95, max_tokens=64, ignore_eos=True, seed=0
    )
    t0 = time.perf_counter()
    llm.generate([ids], sixteen, use_tqdm=False)
    n16 = 16 * 64 / (time.perf_counter() - t0)
    label = sys.argv[1] if len(sys.argv) > 1 else "this tree"
    print(f"{label} {dtype}: single {best:.1f} tok/s  n16 {n16:.1f} tok/s")


if __name__ == "__main__":
    main()
