"""Accuracy of a report's strategies on the questions a probe was trained on vs the others.

Generators repeat questions across seeds (two-term sums often do), so a probe's accuracy on a
problem set mixes questions it saw in training with new ones. This splits a
`report_strategies.py` folder's problems by whether their question appears in the probe's
training data and re-derives majority / weighted / bon / pass@N from the bon@N records on each
part (McNemar wins/losses against majority on the same problems).

    python benchmarks/seen_unseen.py runs/report_arithmetic \\
        --training-data runs/verifier_data/arithmetic_T0.7_p0.95_k16_m160_s7000.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from report_strategies import derived_rows

from ttscale.tasks import load_task
from ttscale.verifier.metrics import mcnemar


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("folder", type=Path, help="a report_strategies.py --out folder")
    ap.add_argument("--training-data", type=Path, nargs="+", required=True)
    ap.add_argument("--n", type=int, default=16)
    args = ap.parse_args()
    run = (
        json.loads((args.folder / "report.json").read_text())
        if (args.folder / "report.json").exists()
        else None
    )
    settings = run["params"] if run else {"task": "arithmetic", "n_problems": 300, "seed": 0}
    task = load_task(settings["task"], settings.get("difficulty"))
    records = [json.loads(line) for line in (args.folder / "records.jsonl").open()]
    seen = {
        json.loads(line).get("question")
        for path in args.training_data
        for line in path.open(encoding="utf-8")
    }
    all_problems = task.problems(settings["n_problems"], settings["seed"])
    print("| questions | problems | greedy | majority | weighted (W/L vs maj) | bon (W/L) | pass |")
    print("|---|---|---|---|---|---|---|")
    for name, keep in (
        ("not in training", lambda q: q not in seen),
        ("in training", lambda q: q in seen),
        ("all", lambda q: True),
    ):
        problems = {p.id: p for p in all_problems if keep(p.question)}
        bon = [
            r for r in records if r["strategy"] == f"bon@{args.n}" and r["problem_id"] in problems
        ]
        greedy = [
            r["correct"]
            for r in records
            if r["strategy"] == "greedy" and r["problem_id"] in problems
        ]
        rows = derived_rows(bon, task, problems, args.n)
        acc = {k: {r["problem_id"]: r["correct"] for r in v} for k, v in rows.items()}
        maj = acc[f"majority@{args.n}"]
        ids = sorted(maj)

        cells = {}
        for kind in ("weighted", "bon"):
            c = acc[f"{kind}@{args.n}"]
            m = mcnemar([c[i] for i in ids], [maj[i] for i in ids])
            cells[kind] = f"{sum(c.values()) / len(c):.1%} ({m['wins']}/{m['losses']})"

        print(
            f"| {name} | {len(problems)} | {sum(greedy) / len(greedy):.1%} | "
            f"{sum(maj.values()) / len(maj):.1%} | {cells['weighted']} | {cells['bon']} | "
            f"{sum(acc[f'pass@{args.n}'].values()) / len(maj):.1%} |"
        )


if __name__ == "__main__":
    main()
