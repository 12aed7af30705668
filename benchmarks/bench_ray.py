#!/usr/bin/env python
"""Overhead of evaluation on Ray (issue 15): the same problems and strategies

  A. in one process with 2 torch threads (`ttscale eval`),
  B. on a local Ray cluster, 2 engine actors x 1 thread (`ttscale eval --ray --workers 2`),
  C. on the same cluster, 1 engine actor x 1 thread,

timing only the evaluation (model loads and actor start-up are reported apart). Prints
throughput (problems/s) per run, B/A (the goal on 2 cores: >= 0.9x, no loss) and per-worker
throughput B/C (flat from 1 to 2 workers: each worker is an independent engine, so more
machines add throughput linearly), and checks that A and B answered every problem alike.

Smoke test (a minute or two):   python benchmarks/bench_ray.py
The quiet run for the docs:     python benchmarks/bench_ray.py --n-problems 64 --concurrency 8 \
                                    --strategies greedy,majority@8 --max-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--n-problems", type=int, default=8)
    p.add_argument("--strategies", default="greedy,majority@4")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=2, help="problems per chunk / batch")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    p.add_argument("--out", type=Path, default=None, help="default: a temporary folder")
    return p.parse_args()


def answers(summary_dir: Path) -> dict[tuple[str, str], object]:
    lines = (summary_dir / "records.jsonl").read_text().splitlines()
    return {(r["strategy"], r["problem_id"]): r["answer"] for r in map(json.loads, lines)}


def main() -> None:
    args = parse()
    import ray

    from ttscale import SamplingParams
    from ttscale.eval.harness import run_eval as run_local
    from ttscale.llm import LLM
    from ttscale.ray import EnginePool, WorkerConfig, run_eval
    from ttscale.tasks import load_task

    out = args.out or Path(tempfile.mkdtemp(prefix="bench_ray_"))
    task = load_task(args.task)
    specs = [s for s in args.strategies.split(",") if s]
    params = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=args.max_tokens, seed=0)
    common = dict(params=params, concurrency=args.concurrency, resume=False, progress=False)
    total = args.n_problems * len(specs)
    rows = []

    t0 = time.perf_counter()
    llm = LLM(args.model, num_threads=2)
    load = time.perf_counter() - t0
    warm = SamplingParams(temperature=0, max_tokens=8)
    llm.generate(["Warm-up: 1 + 1 ="], warm, use_tqdm=False)  # first-step set-up is not eval
    t0 = time.perf_counter()
    run_local(llm, task, specs, args.n_problems, out / "one", **common)
    rows.append(("one process x 2 threads", 1, time.perf_counter() - t0, load))
    del llm

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    for workers in (2, 1):
        t0 = time.perf_counter()
        config = WorkerConfig(args.model, num_threads=1)
        with EnginePool(config, workers) as pool:
            start = time.perf_counter() - t0
            pool.solve_many(["1 + 1 ="] * workers, "greedy", params=warm, concurrency=1)
            t0 = time.perf_counter()
            run_eval(pool, task, specs, args.n_problems, out / f"ray{workers}", **common)
            rows.append(
                (f"ray, {workers} worker(s) x 1 thread", workers, time.perf_counter() - t0, start)
            )
    ray.shutdown()

    one, two = answers(out / "one"), answers(out / "ray2")
    same = sum(one[k] == two.get(k) for k in one)
    thr = {name: total / secs for name, _, secs, _ in rows}
    per_worker = {name: total / secs / w for name, w, secs, _ in rows}
    a, b, c = (r[0] for r in rows)
    print(
        f"# bench_ray: {args.task}, {args.n_problems} problems x {specs}, "
        f"max_tokens {args.max_tokens}, chunks of {args.concurrency}, {os.cpu_count()} CPUs"
    )
    print("| run | eval s | problems/s | per worker | start-up s |")
    print("|---|---|---|---|---|")
    for name, _, secs, start in rows:
        print(f"| {name} | {secs:.1f} | {thr[name]:.3f} | {per_worker[name]:.3f} | {start:.1f} |")
    print(f"\nray x2 / one process: {thr[b] / thr[a]:.2f}x (goal >= 0.9x)")
    print(f"per-worker throughput, 2 workers / 1 worker: {per_worker[b] / per_worker[c]:.2f}")
    print(f"same answers as one process: {same}/{len(one)}  (records in {out})")


if __name__ == "__main__":
    main()
