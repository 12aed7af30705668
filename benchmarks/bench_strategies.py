"""Strategies on the embedded model: accuracy and cost per strategy, and wall time against
transformers sampling the same number of completions (`num_return_sequences=N`).

    python benchmarks/bench_strategies.py --task arithmetic --n-problems 50 \
        --strategies greedy,majority@8,bon@8,beam@8/4,tree@8,adaptive@16 --out runs/strategies

1. `ttscale eval` (resumable) on the problems; its summary table is the accuracy report.
2. transformers on the first `--hf-problems` problems: for each distinct N among the
   strategies, `generate(num_return_sequences=N)` with the same chat prompt, sampling controls
   and max_new_tokens, timed end to end. The ratio is ttscale's amortized wall time per problem
   over transformers' for the same N (search strategies are compared with sampling N
   completions, the compute they replace).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ttscale import LLM
from ttscale.eval.harness import run_eval
from ttscale.eval.report import pareto_plot, print_summary
from ttscale.loader.default_model import default_model_path
from ttscale.sampling.params import SamplingParams
from ttscale.strategy_spec import parse_strategy_spec
from ttscale.tasks import load_task


def samples_of(spec: str) -> int:
    n = parse_strategy_spec(spec).n
    return n or 1


def transformers_seconds(task, problems, n: int, params: SamplingParams, threads: int) -> float:
    """Mean wall seconds per problem for transformers to sample n completions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    torch.set_num_threads(threads)
    times = []
    for p in problems:
        text = tok.apply_chat_template(task.prompt(p), add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=params.temperature > 0,
                temperature=params.temperature or None,
                top_p=params.top_p,
                max_new_tokens=params.max_tokens,
                num_return_sequences=n,
                pad_token_id=tok.eos_token_id,
            )
        times.append(time.perf_counter() - t0)
    return statistics.mean(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--n-problems", type=int, default=50)
    ap.add_argument("--strategies", default="greedy,majority@8,bon@8,beam@8/4,tree@8,adaptive@16")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hf-problems", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--out", default="runs/strategies")
    args = ap.parse_args()

    out = Path(args.out)
    task = load_task(args.task)
    specs = args.strategies.split(",")
    params = SamplingParams(
        temperature=args.temperature, top_p=0.95, max_tokens=args.max_tokens, seed=0
    )
    llm = LLM(num_threads=args.threads)
    summary = run_eval(
        llm, task, specs, args.n_problems, out, params=params, concurrency=args.concurrency
    )
    print_summary(summary)
    pareto_plot(summary, out / "pareto.png")
    del llm

    problems = task.problems(args.n_problems, 0)[: args.hf_problems]
    hf = {}
    for n in sorted({samples_of(s) for s in specs}):
        hf[n] = transformers_seconds(task, problems, n, params, args.threads)
        print(f"transformers: N={n} {hf[n]:.2f} s/problem", flush=True)
    by_spec = {s["strategy"]: s for s in summary["strategies"]}
    rows = []
    for spec in specs:
        s = by_spec[spec]
        ours = s["mean_wall_time"]
        n = samples_of(spec)
        rows.append(
            {
                "strategy": spec,
                "N": n,
                "ttscale_s": ours,
                "transformers_s": hf[n],
                "speedup": hf[n] / ours,
                "accuracy": s["accuracy"],
            }
        )
        print(
            f"{spec:12} acc {s['accuracy']:.1%}  ttscale {ours:.2f} s/pb  "
            f"transformers(N={n}) {hf[n]:.2f} s/pb  speedup {hf[n] / ours:.1f}x"
        )
    (out / "vs_transformers.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
