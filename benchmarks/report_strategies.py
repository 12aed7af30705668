#!/usr/bin/env python
"""Does test-time compute buy accuracy on the embedded model? The strategy report of issue 11.

    python benchmarks/report_strategies.py --task arithmetic --n-problems 300 \
        --scorer probe --out runs/report_arithmetic

1. `ttscale eval` (resumable, hygiene on) runs greedy, bon@N (the probe), beam@N/M and tree@N
   (the probe scoring partial paths) and adaptive@N on the same held-out problems (seed
   `--seed`; the shipped probe was trained on seeds 7000+, and the report checks that no
   question of its training data is among these).
2. majority@N, weighted@N (probe-weighted vote), bon@N and pass@N (the ceiling) come from
   the *same* N samples: bon@N's records hold every candidate with its answer, probe score and
   correctness, and with per-sample seeds majority@N would draw exactly these samples. The
   first k candidates are what the @k strategies draw, so @k rows come free. A check run
   executes majority@N and weighted@N for real on the first `--check` problems and the report
   states whether their answers agree with the derived ones.
3. For every strategy: accuracy with its 95% Wilson interval, an exact McNemar test against
   greedy and against majority at the same N (wins / losses / p), and compute per problem
   (generated tokens, FLOPs, bytes, seconds). Derived rows carry the cost of the bon@N run
   they come from (majority alone skips the probe: its overhead is measured on the check run).
4. Pareto plots of accuracy against seconds and against FLOPs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from ttscale import LLM
from ttscale.eval.harness import run_eval
from ttscale.eval.metrics import wilson_interval
from ttscale.eval.report import pareto_plot
from ttscale.eval.store import load_records
from ttscale.sampling.params import SamplingParams
from ttscale.strategies import SearchConfig
from ttscale.tasks import load_task
from ttscale.tts.votes import vote_with_ties
from ttscale.verifier.metrics import mcnemar

COST = ("generated_tokens", "flops", "bytes", "amortized_time")


def derived_rows(records: list[dict], task, problems: dict, k: int) -> dict[str, list[dict]]:
    """majority@k / pass@k (and weighted@k / bon@k for k = N) from the first k candidates of
    bon@N records."""
    out: dict[str, list[dict]] = {f"{s}@{k}": [] for s in ("majority", "weighted", "bon", "pass")}
    for r in records:
        p = problems[r["problem_id"]]
        cands = r["candidates"][:k]
        answers = [c["answer"] for c in cands]
        scores = [c["score"] for c in cands]
        weights = [0.0 if s is None else s for s in scores]
        maj = vote_with_ties(answers)[0]
        wtd = vote_with_ties(answers, weights, scores)[0]
        kept = [
            i for i, c in enumerate(cands) if c["score"] is not None and c["answer"] is not None
        ]
        best = cands[max(kept, key=lambda i: (scores[i], -i))]["answer"] if kept else None
        # The bon@N run's cost belongs to N samples; @k rows (k < N) have no cost of their own.
        cost = {f: r.get(f) if k == len(r["candidates"]) else None for f in COST}
        # Scores of an answer probe depend on the set scored together (an answer's vote count
        # among the N): weighted/bon from a subset of those scores would not be what the
        # strategy at k computes, so @k < N rows derive only majority and pass@k.
        selections = [("majority", maj), ("weighted", wtd), ("bon", best)]
        if k < len(r["candidates"]):
            out.pop(f"weighted@{k}", None)
            out.pop(f"bon@{k}", None)
            selections = selections[:1]
        for name, answer in selections:
            out[f"{name}@{k}"].append(
                {
                    "problem_id": p.id,
                    "answer": answer,
                    "correct": task.is_correct(p, answer),
                    **cost,
                }
            )
        out[f"pass@{k}"].append(
            {"problem_id": p.id, "correct": any(c["correct"] for c in cands), **cost}
        )
    return out


def row_stats(name: str, rows: list[dict]) -> dict[str, Any]:
    n = len(rows)
    right = sum(r["correct"] for r in rows)
    lo, hi = wilson_interval(right, n)
    stats: dict[str, Any] = {"strategy": name, "n": n, "accuracy": right / n, "lo": lo, "hi": hi}
    for f in COST:
        values = [r[f] for r in rows if r.get(f) is not None]
        stats[f] = statistics.mean(values) if values else None
    stats["wall_time"] = stats["amortized_time"]  # the plot's name for seconds per problem
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--difficulty", default=None, help="task preset: easy / medium / hard")
    ap.add_argument("--n-problems", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0, help="problem set (held out from training)")
    ap.add_argument("--n", type=int, default=16, help="samples / branches per problem")
    ap.add_argument("--m", type=int, default=4, help="beam width split")
    ap.add_argument("--scorer", default="probe")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--searches", default="beam,tree,adaptive", help="'' to skip")
    ap.add_argument(
        "--search-problems", type=int, default=None, help="run the searches on the first ones"
    )
    ap.add_argument("--check", type=int, default=20, help="problems run for real as a check")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--training-data",
        type=Path,
        nargs="*",
        default=[],
        help="the probe's data files: problems whose question appears there are left out",
    )
    ap.add_argument("--out", type=Path, default=Path("runs/report"))
    args = ap.parse_args()

    N, M = args.n, args.m
    task = load_task(args.task, args.difficulty)
    params = SamplingParams(
        temperature=args.temperature, top_p=0.95, max_tokens=args.max_tokens, seed=args.seed
    )
    search = SearchConfig(step_delimiter="\n")  # the probe's process labels cut at newlines
    llm = LLM(num_threads=args.threads, dtype=args.dtype)
    base = ["greedy", f"bon@{N}"]
    names = {"beam": f"beam@{N}/{M}", "tree": f"tree@{N}", "adaptive": f"adaptive@{N}"}
    searches = [names[s] for s in args.searches.split(",") if s]
    specs = base + searches
    for group, n_problems in ((base, args.n_problems), (searches, args.search_problems)):
        if group:
            run_eval(
                llm,
                task,
                group,
                n_problems or args.n_problems,
                args.out,
                seed=args.seed,
                params=params,
                scorer_spec=args.scorer,
                search=search,
            )
    records = load_records(args.out / "records.jsonl")
    problems = {p.id: p for p in task.problems(args.n_problems, args.seed)}
    # Held out means never seen: a question the probe was trained (or selected) on is left
    # out, even if another seed generated it again.
    seen = {
        json.loads(line).get("question")
        for path in args.training_data
        for line in path.open(encoding="utf-8")
    }
    overlap = {i for i, p in problems.items() if p.question in seen}
    problems = {i: p for i, p in problems.items() if i not in overlap}
    by_spec: dict[str, list[dict]] = {}
    for r in records:
        if r["problem_id"] in problems:
            by_spec.setdefault(r["strategy"], []).append(r)
    for rows in by_spec.values():
        rows.sort(key=lambda r: r["problem_id"])

    report: dict[str, Any] = {
        "task": args.task,
        "n_problems": len(problems),
        "seed": args.seed,
        "scorer": args.scorer,
        "params": vars(args)
        | {"out": str(args.out), "training_data": list(map(str, args.training_data))},
        "left_out_seen_in_training": len(overlap),
    }

    rows = {s: by_spec[s] for s in specs}
    for k in sorted({N // 2, N}):
        rows |= derived_rows(by_spec[f"bon@{N}"], task, problems, k)
    rows[f"bon@{N}"] = by_spec[f"bon@{N}"]  # the real run (the derived one must agree)
    derived_bon = {
        r["problem_id"]: r["answer"]
        for r in derived_rows(by_spec[f"bon@{N}"], task, problems, N)[f"bon@{N}"]
    }
    report["bon_rederived_agrees"] = all(
        derived_bon[r["problem_id"]] == r["answer"] for r in by_spec[f"bon@{N}"]
    )

    # The check: majority@N and weighted@N for real on the first problems.
    check_dir = args.out / "check"
    check_specs = [f"majority@{N}", f"weighted@{N}", f"bon@{N}"]
    run_eval(
        llm,
        task,
        check_specs,
        args.check,
        check_dir,
        seed=args.seed,
        params=params,
        scorer_spec=args.scorer,
        search=search,
    )
    check = load_records(check_dir / "records.jsonl")
    agree = {}
    for spec in check_specs[:2]:
        real = {r["problem_id"]: r["answer"] for r in check if r["strategy"] == spec}
        derived = {r["problem_id"]: r["answer"] for r in rows[spec]}
        shared = real.keys() & derived.keys()  # problems left out of the report are skipped
        agree[spec] = sum(real[i] == derived[i] for i in shared) / max(1, len(shared))
    t = {
        s: statistics.mean(r["amortized_time"] for r in check if r["strategy"] == s)
        for s in check_specs
    }
    report["check"] = {
        "problems": args.check,
        "agreement": agree,
        "seconds_per_problem": t,
        "probe_overhead": t[f"bon@{N}"] / t[f"majority@{N}"] - 1,
    }

    table = []
    correct = {s: {r["problem_id"]: r["correct"] for r in rs} for s, rs in rows.items()}

    def paired(a: str, b: str) -> dict[str, float]:
        """McNemar on the problems both ran (searches may cover the first ones only)."""
        ids = sorted(correct[a].keys() & correct[b].keys())
        return {
            **mcnemar([correct[a][i] for i in ids], [correct[b][i] for i in ids]),
            "n": len(ids),
        }

    def order(name: str) -> tuple[int, int]:
        kind = name.split("@")[0]
        rank = ["greedy", "majority", "weighted", "bon", "beam", "tree", "adaptive", "pass"]
        n_of = 1 if name == "greedy" else int(name.split("@")[1].split("/")[0])
        return n_of, rank.index(kind)

    for name in sorted(rows, key=order):
        stats = row_stats(name, rows[name])
        stats["vs_greedy"] = paired(name, "greedy")
        maj = f"majority@{order(name)[0]}"
        if maj in correct and name not in (maj, "greedy"):
            stats["vs_majority"] = paired(name, maj)
        table.append(stats)
    report["strategies"] = table
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    lines = [
        "| strategy | accuracy [95% CI] | vs greedy W/L (p) | vs majority W/L (p) | tokens | "
        "GFLOPs | s/problem |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in table:
        vm = s.get("vs_majority")
        vg = s["vs_greedy"]
        lines.append(
            f"| {s['strategy']} | {s['accuracy']:.1%} [{s['lo']:.1%}, {s['hi']:.1%}] | "
            f"{vg['wins']}/{vg['losses']} ({vg['p_value']:.3g}) | "
            + (f"{vm['wins']}/{vm['losses']} ({vm['p_value']:.3g})" if vm else "-")
            + " | "
            + " | ".join(
                "-" if s[f] is None else fmt.format(s[f] / scale)
                for f, fmt, scale in (
                    ("generated_tokens", "{:.0f}", 1),
                    ("flops", "{:.0f}", 1e9),
                    ("amortized_time", "{:.2f}", 1),
                )
            )
            + " |"
        )
    md = "\n".join(lines)
    (args.out / "report.md").write_text(md + "\n")
    print(md)
    print(json.dumps({k: v for k, v in report.items() if k != "strategies"}, indent=2))
    plot_summary = {
        "strategies": [
            {**s, "accuracy_lo": s["lo"], "accuracy_hi": s["hi"]}
            for s in table
            if not s["strategy"].startswith("pass@") and s["amortized_time"] is not None
        ]
    }
    pareto_plot(plot_summary, args.out / "pareto.png", x=("wall_time", "flops"))


if __name__ == "__main__":
    main()
