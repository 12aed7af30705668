"""Verifier experiments on the embedded model (numbers in the probe's card and the report).

    python benchmarks/bench_verifier.py temperature --n-problems 64 --samples 8 \\
        --temperatures 0.3,0.5,0.7
        greedy / mean sample / majority / pass@K accuracy per sampling temperature, on pilot
        problems (seed 7900: neither the probe's training nor its test problems)

The probe itself is trained and measured by ``ttscale train-verifier`` (its card records the
command); sampled data and features are cached under runs/verifier_data/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from ttscale.llm import LLM
from ttscale.tasks import load_task
from ttscale.tts.votes import majority_vote
from ttscale.verifier.data import build_dataset
from ttscale.verifier.metrics import bootstrap_ci

PILOT_SEED = 7_900
app = typer.Typer(add_completion=False)


@app.command()
def temperature(
    task: str = "arithmetic",
    n_problems: int = 64,
    samples: int = 8,
    temperatures: str = "0.3,0.5,0.7",
    max_tokens: int = 160,
    top_p: float = 1.0,
    threads: Annotated[int, typer.Option(help="1 on a shared machine")] = 1,
    data_dir: Path = Path("runs/verifier_data"),
) -> None:
    import numpy as np

    llm = LLM(num_threads=threads)
    task_obj = load_task(task)
    for t in (float(x) for x in temperatures.split(",")):
        t0 = time.perf_counter()
        path = data_dir / f"pilot_{task}_T{t}_p{top_p}_k{samples}_m{max_tokens}.jsonl"
        items = build_dataset(
            llm,
            task_obj,
            n_problems,
            samples,
            t,
            path,
            top_p=top_p,
            max_tokens=max_tokens,
            seed=PILOT_SEED,
            log=lambda s: None,
        )
        rows: dict[str, list[float]] = {"greedy": [], "sample": [], "majority": [], "pass": []}
        for it in items:
            winner, _ = majority_vote([c.answer for c in it.candidates])
            rows["greedy"].append(float(it.greedy.correct))
            rows["sample"].append(float(np.mean([c.correct for c in it.candidates])))
            rows["majority"].append(
                float(any(c.correct and c.answer == winner for c in it.candidates))
            )
            rows["pass"].append(float(any(c.correct for c in it.candidates)))
        out = {"temperature": t, "n_problems": n_problems, "samples": samples}
        for k, v in rows.items():
            arr = np.array(v)
            lo, hi = bootstrap_ci(arr)
            out[k] = [round(float(arr.mean()), 4), round(lo, 4), round(hi, 4)]
        out["cut_off"] = round(
            float(np.mean([c.finish_reason == "length" for it in items for c in it.candidates])),
            4,
        )
        out["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    app()
