#!/usr/bin/env python
"""The report's searches with another scorer, on the same problems and settings, for a paired
comparison (docs/BENCHMARKS.md: beam and tree with the probe against logprob).

    python benchmarks/search_with_scorer.py --scorer logprob --n-problems 100 \
        --out runs/report_arithmetic_logprob
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ttscale import LLM
from ttscale.eval.harness import run_eval
from ttscale.sampling.params import SamplingParams
from ttscale.strategies import SearchConfig
from ttscale.tasks import load_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--scorer", default="logprob")
    ap.add_argument("--strategies", default="beam@16/4,tree@16")
    ap.add_argument("--n-problems", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/report_arithmetic_logprob"))
    args = ap.parse_args()
    params = SamplingParams(
        temperature=args.temperature, top_p=0.95, max_tokens=args.max_tokens, seed=args.seed
    )
    run_eval(
        LLM(num_threads=args.threads),
        load_task(args.task),
        args.strategies.split(","),
        args.n_problems,
        args.out,
        seed=args.seed,
        params=params,
        scorer_spec=args.scorer,
        search=SearchConfig(step_delimiter="\n"),  # as report_strategies.py
    )


if __name__ == "__main__":
    main()
