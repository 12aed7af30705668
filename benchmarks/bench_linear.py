"""The matmul choice behind `ttscale.models.layers.Linear`: MKL `F.linear`, MKL `x @ W_t`
and oneDNN with a pre-packed weight, on this model's per-layer matmul set.

    python benchmarks/bench_linear.py [--threads 2]

Prints milliseconds for one pass over q/k/v, o, gate/up, down and the LM head of
SmolLM2-135M (hidden 576, intermediate 1536, vocab 49152), per number of rows.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = [(576, 1728), (576, 576), (576, 3072), (1536, 576), (576, 49152)]  # (in, out)


def timed(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def variants(x: torch.Tensor, w: torch.Tensor) -> tuple:
    wt = w.t().contiguous()
    packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
    return (
        lambda: F.linear(x, w),
        lambda: x @ wt,
        lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,4,16,64,512")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    header = f"{'rows':>5} {'F.linear':>10} {'x @ W_t':>10} {'oneDNN':>10}"
    print(f"{header}  (ms, {args.threads} threads)")
    for m in map(int, args.rows.split(",")):
        totals = [0.0, 0.0, 0.0]
        for k, n in SHAPES:
            for i, fn in enumerate(variants(torch.randn(m, k), torch.randn(n, k) * 0.02)):
                totals[i] += timed(fn, max(3, 400 // m))
        print(f"{m:5d} " + " ".join(f"{t * 1e3:10.1f}" for t in totals), flush=True)


if __name__ == "__main__":
    main()
