#!/usr/bin/env python
"""Accuracy against cost with block top-k: does Kinetics' frontier shift hold on this model?

    python benchmarks/kinetics_frontier.py        # gsm_symbolic, 50 problems, majority@2..16
    python benchmarks/kinetics_frontier.py --n-problems 2 --ns 2 --budgets 128 \\
        --max-tokens 32 --out /tmp/frontier        # smoke check

Runs `ttscale eval`'s harness (run_eval) on the same problems for dense attention and block
top-k at each budget B (and, with --kv-dtypes, quantized KV): one majority@max(N) run per
configuration, the same sampling (T=0.7, top_p=0.95, --max-tokens new tokens). Each
configuration is its own engine and its own eval folder (resumable: a rerun continues).

majority@N for the smaller N is derived from the same samples, not sampled again: the vote
over each problem's first N candidates (sampling order, the voting strategies' tie rule), so
every N is a prefix of the one run and the curves are paired across N. Its cost is the
max(N) run's eFLOPs / seconds scaled by the first N candidates' share of the generated tokens
(the shared prompt prefill, computed once, is scaled too: a small under-count of it at small
N). Prints accuracy (Wilson 95% interval), eFLOPs per problem (FLOPs + I * bytes on the
--hardware roofline, the engine's own count of what it read), measured seconds per problem
and generated tokens per problem, then each configuration against the first (dense) at every
N: exact McNemar on the per-problem outcomes. Writes <out>/frontier.json and plots accuracy
against eFLOPs and seconds (<out>/frontier.png). The local window scales with the budget
(B / 4, at most 64 tokens), so B=64 keeps a sink block, a 16-token window, the current block
and one chosen block.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def configurations(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    configs: dict[str, dict[str, Any]] = {"dense": {}}
    for b in (int(x) for x in args.budgets.split(",") if x.strip()):
        window = min(64, b // 4)
        configs[f"topk B={b}"] = {
            "sparse_attention": "block_topk",
            "kv_budget": b,
            "sparse_window": window,
        }
    for fmt in (x.strip() for x in args.kv_dtypes.split(",") if x.strip()):
        configs[f"kv {fmt}"] = {"kv_cache_dtype": fmt}
    return configs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--task", default="gsm_symbolic")
    ap.add_argument(
        "--difficulty", default=None, help="easy / medium / hard, where a preset exists"
    )
    ap.add_argument("--n-problems", type=int, default=50)
    ap.add_argument("--ns", default="2,4,8,16", help="majority@N for each N")
    ap.add_argument("--budgets", default="64,128,256,512")
    ap.add_argument("--kv-dtypes", default="", help="also these KV formats, dense (e.g. int8)")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantize", default="auto")
    ap.add_argument("--hardware", default="h100", help="roofline the eFLOPs are priced on")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "kinetics_frontier")
    args = ap.parse_args(argv)

    from ttscale import LLM, SamplingParams
    from ttscale.eval.harness import run_eval
    from ttscale.eval.store import RECORDS_FILE, load_records
    from ttscale.tasks import load_task

    task = load_task(args.task, args.difficulty)
    ns = sorted({int(n) for n in args.ns.split(",") if n.strip()})
    strategies = [f"majority@{ns[-1]}"]
    outcomes: dict[str, dict[int, list[bool]]] = {}
    params = SamplingParams(temperature=args.temperature, top_p=0.95, max_tokens=args.max_tokens)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for name, options in configurations(args).items():
        llm = LLM(
            dtype=args.dtype,
            quantize=args.quantize,
            num_threads=args.threads,
            hardware=args.hardware,
            **options,
        )
        folder = args.out / name.replace(" ", "_").replace("=", "")
        summary = run_eval(
            llm,
            task,
            strategies,
            args.n_problems,
            folder,
            params=params,
            progress=False,
            numerics={
                k: str(v)
                for k, v in {"dtype": args.dtype, "quantize": args.quantize, **options}.items()
            },
        )
        ids = [p.id for p in task.problems(args.n_problems, 0)]
        by_id = {
            r["problem_id"]: r
            for r in load_records(folder / RECORDS_FILE)
            if r["strategy"] == strategies[0]
        }
        records = [by_id[i] for i in ids]
        outcomes[name] = {}
        for n in ns:
            rows.append(derived_row(name, options, records, n))
            outcomes[name][n] = rows[-1].pop("outcomes")
            r = rows[-1]
            eff = r["efflops_per_problem"]
            cost = f"eFLOPs {eff:.3g}  " if eff is not None else ""
            print(
                f"{name:14} {r['strategy']:12} acc {r['accuracy']:.3f} "
                f"[{r['accuracy_lo']:.3f}, {r['accuracy_hi']:.3f}]  {cost}"
                f"{r['seconds_per_problem']:.2f} s/problem  "
                f"{r['tokens_per_problem']:.0f} tokens/problem",
                flush=True,
            )
        print(f"{name}: {summary['n_problems']} problems", flush=True)
        del llm
    args.out.mkdir(parents=True, exist_ok=True)
    paired = paired_tests(outcomes)
    for t in paired:
        print(
            f"{t['config']:14} vs {t['baseline']} majority@{t['n']:<3} "
            f"wins {t['wins']} losses {t['losses']}  McNemar p = {t['p']:.3g}"
        )
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
        "paired": paired,
        "outcomes": outcomes,
        "seconds": time.perf_counter() - t0,
    }
    (args.out / "frontier.json").write_text(json.dumps(report, indent=1))
    plot(rows, args.out / "frontier.png")
    print(f"results written to {args.out}")
    return 0


def vote(candidates: list[dict[str, Any]]) -> tuple[str | None, bool]:
    """The plurality answer of these candidates (dropped ones do not vote) and whether it is
    right; the tie rule is the voting strategies' (ttscale.tts.votes)."""
    from ttscale.tts.votes import majority_vote

    answers = [None if c.get("dropped") else c["answer"] for c in candidates]
    winner, _ = majority_vote(answers)
    right = {c["answer"] for c in candidates if c["correct"] and not c.get("dropped")}
    return winner, winner is not None and winner in right


def derived_row(
    name: str, options: dict[str, Any], records: list[dict[str, Any]], n: int
) -> dict[str, Any]:
    """majority@n from the first n candidates of each problem's record; cost scaled by their
    share of the record's generated tokens."""
    from ttscale.eval.metrics import wilson_interval

    outcomes, eff, sec, tok = [], [], [], []
    for r in records:
        cands = r["candidates"]
        if len(cands) < n:
            raise ValueError(f"{r['problem_id']}: {len(cands)} candidates, need {n}")
        outcomes.append(vote(cands[:n])[1])
        total = sum(c["tokens"] for c in cands) or 1
        share = sum(c["tokens"] for c in cands[:n]) / total
        if r.get("efflops") is not None:
            eff.append(r["efflops"] * share)
        sec.append(r["amortized_time"] * share)
        tok.append(sum(c["tokens"] for c in cands[:n]))
    k = sum(outcomes)
    lo, hi = wilson_interval(k, len(outcomes))
    return {
        "config": name,
        "options": options,
        "strategy": f"majority@{n}",
        "n": n,
        "problems": len(outcomes),
        "correct": k,
        "accuracy": k / len(outcomes),
        "accuracy_lo": lo,
        "accuracy_hi": hi,
        "efflops_per_problem": sum(eff) / len(eff) if len(eff) == len(records) else None,
        "seconds_per_problem": sum(sec) / len(sec),
        "tokens_per_problem": sum(tok) / len(tok),
        "outcomes": outcomes,
    }


def paired_tests(outcomes: dict[str, dict[int, list[bool]]]) -> list[dict[str, Any]]:
    """Each configuration against the first at every N: wins (right where the first is wrong),
    losses, exact McNemar p."""
    from ttscale.eval.compare import mcnemar_exact

    names = list(outcomes)
    if not names:
        return []
    base = names[0]
    out = []
    for name in names[1:]:
        for n, right in outcomes[name].items():
            ref = outcomes[base][n]
            wins = sum(a and not b for a, b in zip(right, ref, strict=True))
            losses = sum(b and not a for a, b in zip(right, ref, strict=True))
            p = mcnemar_exact(losses, wins)
            out.append(
                {"config": name, "baseline": base, "n": n, "wins": wins, "losses": losses, "p": p}
            )
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against eFLOPs and against seconds per problem, one line per configuration."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        print("note: matplotlib missing: no plot (pip install 'ttscale[eval]')")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "efflops_per_problem", "eFLOPs per problem"),
        (axes[1], "seconds_per_problem", "measured seconds per problem"),
    ):
        for config in dict.fromkeys(r["config"] for r in rows):
            pts = [r for r in rows if r["config"] == config and r[key] is not None]
            if pts:
                ax.plot([r[key] for r in pts], [r["accuracy"] for r in pts], "o-", label=config)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on a log axis
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (majority@N)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
