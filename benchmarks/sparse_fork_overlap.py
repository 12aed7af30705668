#!/usr/bin/env python
"""How much of a fork group's block top-k reads overlap: what reading the union once would save.

    python benchmarks/sparse_fork_overlap.py                 # n=16, 512-token prompt, 1,024 new
    python benchmarks/sparse_fork_overlap.py --n 4 --prompt-tokens 128 --new-tokens 32 --budget 96

On a block top-k layer each sparse row reads its own chosen blocks (docs/ARCHITECTURE.md, "The
Kinetics memory path"). The n samples of one prompt share the prompt's blocks, so their
choices may overlap; a shared pass could read each (KV head, block) once for the group. This
runs n samples (T=0.8, EOS ignored) and, on every sparse layer of every step, counts the
(KV head, physical block) picks of all rows (what is read now) and the distinct ones (what a
union read would read). The count wraps the selection function: the script's own
instrumentation, not an engine feature.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "sparse_fork_overlap.json")
    args = ap.parse_args(argv)

    import ttscale.attention.paged as paged
    from ttscale import LLM, SamplingParams

    counts = {"layer_steps": 0, "picks": 0, "distinct": 0}
    select = paged.select_blocks

    def counting(q: torch.Tensor, key_means: torch.Tensor, rows: Any):
        idx, chosen = select(q, key_means, rows)
        R, kvh, K = idx.shape
        phys = rows.tables.gather(1, idx.reshape(R, kvh * K)).view(R, kvh, K)
        heads = torch.arange(kvh)[None, :, None].expand(R, kvh, K)
        picked = (phys * kvh + heads)[chosen]  # one id per (KV head, physical block) picked
        counts["layer_steps"] += 1
        counts["picks"] += int(picked.numel())
        counts["distinct"] += int(picked.unique().numel())
        return idx, chosen

    paged.select_blocks = counting
    t0 = time.perf_counter()
    llm = LLM(
        dtype="bfloat16",
        quantize="none",
        num_threads=args.threads,
        hardware=None,
        sparse_attention="block_topk",
        kv_budget=args.budget,
    )
    prompt = peers.long_prompt(peers.load_tokenizer(), args.prompt_tokens)
    params = SamplingParams(
        n=args.n, temperature=0.8, top_p=0.95, seed=0, max_tokens=args.new_tokens, ignore_eos=True
    )
    llm.generate([prompt], params, use_tqdm=False)
    steps = max(1, counts["layer_steps"])
    bs = llm.engine.block_manager.block_size
    row = {
        "n": args.n,
        "prompt_tokens": len(prompt),
        "new_tokens": args.new_tokens,
        "budget": args.budget,
        "sparse_layer_steps": counts["layer_steps"],
        "tokens_read_per_layer_step": bs * counts["picks"] / steps,
        "union_tokens_per_layer_step": bs * counts["distinct"] / steps,
        "union_fraction": counts["distinct"] / max(1, counts["picks"]),
        "seconds": time.perf_counter() - t0,
    }
    print(
        f"n={args.n}, prompt {len(prompt)}, {args.new_tokens} new, B={args.budget}: per sparse "
        f"layer and step, rows read {row['tokens_read_per_layer_step']:.0f} tokens (per KV head "
        f"summed); their union is {row['union_tokens_per_layer_step']:.0f} "
        f"({100 * row['union_fraction']:.1f}%)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=1))
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
