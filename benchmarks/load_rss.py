"""Resident memory of loading a model, in this fresh process (docs/PERF_RSS.md).

    OMP_NUM_THREADS=1 python benchmarks/load_rss.py                      # the embedded model
    OMP_NUM_THREADS=1 python benchmarks/load_rss.py --quantize none --dtype bfloat16

Prints VmRSS (MiB) after the imports, after `LLM()` and after a greedy 32-token generation
plus 16 sampled ones, with the peak (`ru_maxrss`) at each point. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time


def rss() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) // 1024


def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file or HF folder (default: embedded)")
    parser.add_argument("--quantize", default="auto")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    from ttscale import LLM, SamplingParams

    imported = rss()
    t0 = time.perf_counter()
    llm = LLM(args.model, num_threads=1, quantize=args.quantize, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    loaded, load_peak = rss(), peak()
    prompt = "Hello, tell me a story."
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    params = SamplingParams(temperature=0.7, max_tokens=32)
    llm.generate([prompt] * 16, params, use_tqdm=False)
    print(
        f"imports {imported} MiB | after LLM() {loaded} MiB (peak {load_peak}) | after generate "
        f"{rss()} MiB (peak {peak()}) | LLM() {load_s:.2f} s | "
        f"torch._dynamo imported: {'torch._dynamo' in sys.modules}"
    )


if __name__ == "__main__":
    main()
