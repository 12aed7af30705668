#!/usr/bin/env python
"""ttscale vs transformers vs llama-cpp-python: one command, same GGUF, same prompts, same threads.

    python benchmarks/bench_engine.py                        # all engines, all workloads
    python benchmarks/bench_engine.py --quick                # smoke check: n=16, 32 tokens
    python benchmarks/bench_engine.py --engines transformers,llamacpp --workloads single,prefill

Workloads (each engine that supports it):
  single    one short chat prompt, 128 new tokens, greedy, EOS ignored: decode tok/s, end-to-end
  parallel  n=16 and n=64 samples of one ~140-token chat prompt, 128 new tokens each (T=0.8)
  prefill   a 1000-token prompt, max_tokens=1
  copy      fix the typos of a ~400-token text and write it out: 256 new tokens, greedy, EOS
            ignored (the answer repeats the prompt: what prompt-lookup speculation is for)
  rss       peak RSS of each engine's process
  long      the Kinetics regime (run on its own: --workloads long): n=16 samples of a
            512-token prompt, 2,048 new tokens each (T=0.8, EOS ignored), ttscale dense fp32
            and bf16, bf16 + block top-k (B=256), + int8 KV, + both, + kivi4 KV, and llama.cpp
            with f16 and q8_0 KV (flash attention on): decode tok/s over the run and over its
            last 128 steps (context near 2.5k), peak KV MiB, peak RSS. Smoke check:
            --workloads long --long-n 4 --long-new-tokens 64 --long-prompt-tokens 128

Every engine runs in its own subprocess (this script with `--engine NAME`), so peak RSS is its
own and engines never compete for threads or memory. The parent tokenizes the prompts once
(the GGUF's tokenizer and chat template) and hands every engine the same token ids.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers

# ttscale: weights dequantized to fp32 (quantize="none"), as transformers does; ttscale-bf16:
# to bf16 (native bf16 matmuls on AVX512-BF16 / AMX CPUs); ttscale-int4: the GGUF's own
# quantization (quantize="native": Q4_1 on the int4 kernel, the Q8_0 head on the int8 one);
# ttscale-lookup: ttscale-int4 plus prompt-lookup speculation. ttscale-int4 runs small steps
# through the fused C++ decode step (the default, models/fused.py); ttscale-int4-eager is the
# same weights with LLM(fused=False), the per-op Python forward.
ENGINES = (
    "ttscale",
    "ttscale-bf16",
    "ttscale-int4",
    "ttscale-int4-eager",
    "ttscale-lookup",
    "transformers",
    "llamacpp",
)
OURS = ("ttscale", "ttscale-bf16", "ttscale-int4", "ttscale-int4-eager", "ttscale-lookup")
WORKLOADS = ("single", "parallel", "prefill", "copy")
LOOKUP_TOKENS = 4  # drafts per step of ttscale-lookup (the int4 kernel's cost grows per row)
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "runs" / "bench_engine.json"
QUANT_NOTE = (
    "llama.cpp runs the GGUF's Q4_1 weights (F16 KV cache); ttscale-int4 and ttscale-lookup "
    "compute with them too (bf16 activations in the kernels); ttscale and transformers "
    "dequantize them to fp32, ttscale-bf16 to bf16."
)
SAMPLING_NOTE = (
    "parallel sampling: ttscale and transformers use T=0.8, top_p=0.95; the llama.cpp peer "
    "samples with temperature only (numpy, its time included), prefills the prompt once and "
    "copies its KV to the n sequences (llama_memory_seq_cp)."
)


# --------------------------------------------------------------------------------------------
# ttscale: the only code touching ttscale's API (keep it here so it is easy to adjust).
# --------------------------------------------------------------------------------------------


def run_ttscale(spec: dict[str, Any]) -> dict[str, Any]:
    import dataclasses

    import torch

    threads = spec["threads"]
    torch.set_num_threads(threads)
    from ttscale import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        model=spec["model_path"],
        num_threads=threads,
        dtype=spec.get("dtype", "float32"),
        quantize=spec.get("quantize", "none"),
        speculative=spec.get("speculative"),
        num_speculative_tokens=LOOKUP_TOKENS,
        fused=spec.get("fused", True),
    )
    results: dict[str, Any] = {"load_s": time.perf_counter() - t0}
    single, parallel, prefill, copy = (
        peers.Variants(spec["prompts"][k]) for k in spec["prompts_keys"]
    )
    T = spec["max_tokens"]

    def usage_dict(usage: Any) -> dict[str, Any]:
        if usage is None:
            return {}
        if dataclasses.is_dataclass(usage):
            return dataclasses.asdict(usage)
        if isinstance(usage, dict):
            return dict(usage)
        return {k: v for k, v in vars(usage).items() if not k.startswith("_")}

    def generate(ids: list[int], max_tokens: int, n: int = 1, sample: bool = False):
        params = SamplingParams(
            n=n,
            temperature=spec["temperature"] if sample else 0.0,
            top_p=spec["top_p"] if sample else 1.0,
            seed=spec["seed"],
            max_tokens=max_tokens,
            ignore_eos=True,
        )
        t0 = time.perf_counter()
        outs = llm.generate([ids], params, use_tqdm=False)
        dt = time.perf_counter() - t0
        out = outs[0]
        assert len(out.outputs) == n, f"{len(out.outputs)} outputs, wanted {n}"
        lengths = {len(o.token_ids) for o in out.outputs}
        assert lengths == {max_tokens}, f"output lengths {lengths}, wanted {max_tokens}"
        samples = [list(o.token_ids) for o in out.outputs]
        return dt, usage_dict(getattr(out, "usage", None)), samples

    peers.log("  warm-up ...")
    generate(single.take(), 8)
    generate(parallel.take(), 4, n=min(spec["ns"]), sample=True)
    generate(prefill.take(), 1)

    def run_single() -> dict[str, Any]:
        ids = single.take()
        params = SamplingParams(n=1, temperature=0.0, max_tokens=T, ignore_eos=True)
        if hasattr(llm, "stream"):
            # timestamp every step's output: TTFT, then decode time of tokens 2..T
            t0 = time.perf_counter()
            stamps, out = [], None
            for out in llm.stream(ids, params):
                stamps.append((time.perf_counter(), len(out.outputs[0].token_ids)))
            dt = time.perf_counter() - t0
            samples = [list(out.outputs[0].token_ids)]
            assert len(samples[0]) == T, f"{len(samples[0])} tokens, wanted {T}"
            t_first = next(t for t, k in stamps if k >= 1) - t0
            decode_s = stamps[-1][0] - (t0 + t_first)
            usage, usage_first = usage_dict(out.usage), None
        else:
            # decode time = generate(T tokens) - generate(1 token), on two equal-length prompts
            # that share no cacheable prefix.
            t_first, usage_first, _ = generate(single.take(), 1)
            dt, usage, samples = generate(ids, T)
            decode_s = dt - t_first
        return {
            "prompt_tokens": len(ids),
            "prompt_id": peers.prompt_id(ids),
            "new_tokens": T,
            "wall_s": dt,
            "ttft_s": t_first,
            "decode_s": decode_s,
            "decode_tok_s": (T - 1) / decode_s,
            "e2e_tok_s": T / dt,
            "usage": usage,
            "usage_ttft_call": usage_first,
            "token_ids": samples[0],
        }

    def run_parallel(n: int) -> dict[str, Any]:
        ids = parallel.take()
        dt, usage, samples = generate(ids, T, n=n, sample=True)
        return {**peers.parallel_result(len(ids), n, T, dt, samples), "usage": usage}

    def run_prefill() -> dict[str, Any]:
        ids = prefill.take()
        dt, usage, _ = generate(ids, 1)
        return {
            "prompt_tokens": len(ids),
            "wall_s": dt,
            "prefill_tok_s": len(ids) / dt,
            "usage": usage,
        }

    def run_copy() -> dict[str, Any]:
        from ttscale.engine.proposers import speculation_stats

        ids = copy.take()
        before = dict(llm.engine.stats)
        dt, usage, samples = generate(ids, peers.COPY_NEW_TOKENS)
        delta = {k: llm.engine.stats[k] - before[k] for k in before}
        return {
            **peers.copy_result(ids, dt, samples[0]),
            "steps": delta["steps"],
            "speculation": speculation_stats(delta),
            "usage": usage,
        }

    peers.run_workloads(results, spec, run_single, run_parallel, run_prefill, run_copy)
    return results


RUNNERS = {
    "ttscale": run_ttscale,
    "ttscale-bf16": lambda spec: run_ttscale({**spec, "dtype": "bfloat16"}),
    "ttscale-int4": lambda spec: run_ttscale({**spec, "quantize": "native"}),
    "ttscale-int4-eager": lambda spec: run_ttscale({**spec, "quantize": "native", "fused": False}),
    "ttscale-lookup": lambda spec: run_ttscale(
        {**spec, "quantize": "native", "speculative": "prompt_lookup"}
    ),
    "transformers": peers.run_transformers,
    "llamacpp": peers.run_llamacpp,
}


# --------------------------------------------------------------------------------------------
# The `long` workload: one process per configuration (its own peak RSS).
# --------------------------------------------------------------------------------------------

# name -> LLM options (ttscale) or the KV type (llama.cpp). The sparse / quantized columns
# use bf16 weights, so "same dtype" comparisons read against ttscale-bf16.
LONG_CONFIGS: dict[str, dict[str, Any]] = {
    "ttscale-fp32": {"dtype": "float32"},
    "ttscale-bf16": {"dtype": "bfloat16"},
    "ttscale-bf16-topk": {"dtype": "bfloat16", "sparse_attention": "block_topk"},
    "ttscale-bf16-int8": {"dtype": "bfloat16", "kv_cache_dtype": "int8"},
    "ttscale-bf16-topk-int8": {
        "dtype": "bfloat16",
        "sparse_attention": "block_topk",
        "kv_cache_dtype": "int8",
    },
    "ttscale-bf16-kivi4": {"dtype": "bfloat16", "kv_cache_dtype": "kivi4"},
    "llamacpp-f16": {"llamacpp_kv": "f16"},
    "llamacpp-q8_0": {"llamacpp_kv": "q8_0"},
}


def run_ttscale_long(spec: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """n samples of the long prompt through the engine step by step, timestamping each step
    and tracking the KV blocks in use."""
    import torch

    torch.set_num_threads(spec["threads"])
    from ttscale import LLM, SamplingParams

    options = dict(options)
    if options.get("sparse_attention"):
        options["kv_budget"] = spec["long_budget"]
    n, T, ids = spec["long_n"], spec["long_new_tokens"], spec["long_prompt"]
    t0 = time.perf_counter()
    llm = LLM(
        model=spec["model_path"],
        num_threads=spec["threads"],
        quantize="none",
        kv_cache_gb=spec["long_kv_gb"],
        **options,
    )
    results: dict[str, Any] = {"load_s": time.perf_counter() - t0}
    engine = llm.engine
    cache = engine.executor.kv_cache

    def run(new_tokens: int, request_id: str) -> tuple[list[float], int]:
        params = SamplingParams(
            n=n,
            temperature=spec["temperature"],
            top_p=spec["top_p"],
            seed=spec["seed"],
            max_tokens=new_tokens,
            ignore_eos=True,
        )
        engine.add_request(request_id, ids, params)
        stamps, peak_blocks = [], 0
        while engine.has_unfinished:
            outs = engine.step()
            peak_blocks = max(peak_blocks, engine.kv_stats()["num_used_blocks"])
            if any(o.usage.generated_tokens for o in outs):
                stamps.append(time.perf_counter())
        return stamps, peak_blocks

    run(4, "warm-up")
    t0 = time.perf_counter()
    stamps, peak_blocks = run(T, "long")
    wall = time.perf_counter() - t0
    block_bytes = cache.block_size * cache.bytes_per_token
    if cache.key_means is not None:
        block_bytes += cache.key_means[:, 0].numel() * 4
    results["long"] = {
        **peers.long_decode_metrics(stamps, n, T, spec["long_tail_steps"]),
        "wall_s": wall,
        "n": n,
        "prompt_tokens": len(ids),
        "new_tokens": n * T,
        "peak_kv_blocks": peak_blocks,
        "peak_kv_mib": peak_blocks * block_bytes / 2**20,
        "kv_bytes_per_token": cache.bytes_per_token,
        "options": options,
    }
    return results


def long_child_main(config: str, spec_path: Path, result_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    options = LONG_CONFIGS[config]
    result: dict[str, Any] = {"engine": config, "status": "ok"}
    t0 = time.perf_counter()
    try:
        if "llamacpp_kv" in options:
            result["workloads"] = peers.run_llamacpp_long(spec, options["llamacpp_kv"])
        else:
            result["workloads"] = run_ttscale_long(spec, options)
    except Exception as e:
        import traceback

        traceback.print_exc()
        result.update(status="error", error=f"{type(e).__name__}: {e}")
    result["wall_s"] = time.perf_counter() - t0
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result_path.write_text(json.dumps(result))
    return 0


def run_long(args: argparse.Namespace) -> int:
    """The `long` workload: every configuration in its own process, one table."""
    configs = [c.strip() for c in args.long_configs.split(",") if c.strip()]
    for c in configs:
        if c not in LONG_CONFIGS:
            sys.exit(f"unknown long config {c!r}; choose from {', '.join(LONG_CONFIGS)}")
    machine = peers.machine_info()
    print(f"machine: {machine['cpu']} | {machine['cores']} cores | torch {machine['torch']}")
    tokenizer = peers.load_tokenizer()
    prompt = peers.long_prompt(tokenizer, args.long_prompt_tokens)
    spec = {
        "model_path": str(peers.model_path()),
        "threads": args.threads,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "long_prompt": prompt,
        "long_n": args.long_n,
        "long_new_tokens": args.long_new_tokens,
        "long_budget": args.long_budget,
        "long_tail_steps": args.long_tail_steps,
        "long_kv_gb": args.long_kv_gb,
    }
    print(
        f"long: n={args.long_n}, prompt {len(prompt)} tok, {args.long_new_tokens} new tokens "
        f"each, block top-k B={args.long_budget}, threads={args.threads}"
    )
    from ttscale.cost.shapes import ModelShape

    shape = ModelShape.from_path(peers.model_path())
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_long_") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for config in configs:
            if "llamacpp_kv" in LONG_CONFIGS[config] and not peers.llama_cpp_available()[0]:
                results[config] = {"status": "skipped", "error": "llama_cpp not importable"}
                continue
            peers.wait_for_quiet(args.quiet_wait)
            peers.log(f"{config}: starting")
            result_path = Path(tmp) / f"result_{config}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--long-config", config]
            cmd += ["--spec", str(spec_path), "--result", str(result_path)]
            env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                env[var] = str(args.threads)
            subprocess.run(cmd, env=env, timeout=args.timeout)
            if result_path.is_file():
                results[config] = json.loads(result_path.read_text())
            else:
                results[config] = {"status": "error", "error": "no result"}
            r = results[config]
            long = (r.get("workloads") or {}).get("long") or {}
            if "kv_type" in long:  # llama.cpp allocates every cell up front
                cells = args.long_n * (len(prompt) + args.long_new_tokens + 16)
                long["peak_kv_mib"] = (
                    cells * shape.kv_bytes_per_token(long["kv_bytes_per_value"]) / 2**20
                )
            peers.log(f"{config}: {r.get('status')} {r.get('error') or ''}")

    base = ((results.get("ttscale-bf16") or {}).get("workloads") or {}).get("long") or {}
    lc = [
        ((results.get(c) or {}).get("workloads") or {}).get("long", {}).get("end_decode_tok_s")
        for c in ("llamacpp-f16", "llamacpp-q8_0")
    ]
    best_lc = max((x for x in lc if x), default=None)
    cols = ("decode tok/s", "end tok/s", "peak KV MiB", "peak RSS MiB", "end/bf16", "end/llama")
    print(f"{'':26}" + "".join(c.rjust(14) for c in cols))
    for config in configs:
        r = results[config]
        long = (r.get("workloads") or {}).get("long")
        if r.get("status") != "ok" or not long:
            print(f"{config:26}  {r.get('status')}: {r.get('error')}")
            continue
        end = long["end_decode_tok_s"]
        cells = [
            f"{long['decode_tok_s']:.1f}",
            f"{end:.1f}",
            f"{long['peak_kv_mib']:.0f}",
            f"{r['peak_rss_mib']:.0f}",
            f"{end / base['end_decode_tok_s']:.2f}x" if base else "n/a",
            f"{end / best_lc:.2f}x" if best_lc else "n/a",
        ]
        print(f"{config:26}" + "".join(c.rjust(14) for c in cells))
    print(
        f"note: end tok/s = the last {args.long_tail_steps} decode steps (context near "
        f"{len(prompt) + args.long_new_tokens}); llama.cpp's KV MiB is its allocated cells."
    )
    out = args.out.with_name("bench_long.json") if args.out == DEFAULT_OUT else args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine,
        "config": {k: v for k, v in spec.items() if k != "long_prompt"},
        "engines": results,
    }
    out.write_text(json.dumps(report, indent=1))
    print(f"results written to {out}")
    return 0


# --------------------------------------------------------------------------------------------
# Child: one engine, one process.
# --------------------------------------------------------------------------------------------


def child_main(engine: str, spec_path: Path, result_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    result: dict[str, Any] = {"engine": engine, "status": "ok"}
    t0 = time.perf_counter()
    try:
        result["workloads"] = RUNNERS[engine](spec)
    except Exception as e:
        import traceback

        traceback.print_exc()
        result["status"] = "error"
        result["error"] = f"{type(e).__name__}: {e}"
        result["workloads"] = {}
    result["wall_s"] = time.perf_counter() - t0
    # Linux reports ru_maxrss in KiB.
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result_path.write_text(json.dumps(result, indent=1))
    return 0


def run_child(engine: str, spec_path: Path, threads: int, timeout: float | None) -> dict[str, Any]:
    result_path = spec_path.with_name(f"result_{engine}.json")
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF dequantization progress bar
    cmd = [sys.executable, str(Path(__file__).resolve()), "--engine", engine]
    cmd += ["--spec", str(spec_path), "--result", str(result_path)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"engine": engine, "status": "error", "error": f"timed out after {timeout}s"}
    if not result_path.is_file():
        return {
            "engine": engine,
            "status": "error",
            "error": f"process exited with {proc.returncode} and no result",
            "wall_s": time.perf_counter() - t0,
        }
    return json.loads(result_path.read_text())


# --------------------------------------------------------------------------------------------
# Parent: prompts, children, table, JSON.
# --------------------------------------------------------------------------------------------


def _rows(ns: list[int], workloads: list[str]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    if "single" in workloads:
        rows += [
            ("single: decode tok/s", "single", "decode_tok_s"),
            ("single: end-to-end tok/s", "single", "e2e_tok_s"),
        ]
    if "parallel" in workloads:
        for n in ns:
            rows.append((f"parallel n={n}: end-to-end tok/s", f"parallel_n{n}", "e2e_tok_s"))
    if "prefill" in workloads:
        rows.append((f"prefill {peers.PREFILL_TOKENS} tok: tok/s", "prefill", "prefill_tok_s"))
    if "copy" in workloads:
        rows.append((f"copy {peers.COPY_NEW_TOKENS} tok: end-to-end tok/s", "copy", "e2e_tok_s"))
    rows.append(("peak RSS MiB", "", "peak_rss_mib"))
    return rows


def _others_cores(result: dict[str, Any] | None, workload: str) -> float | None:
    if not result or not workload:
        return None
    cpu = result.get("workloads", {}).get(workload, {}).get("cpu") or {}
    return cpu.get("others_cores")


def _value(result: dict[str, Any] | None, workload: str, metric: str) -> float | None:
    if not result or result.get("status") not in ("ok",):
        return None
    if not workload:
        return result.get(metric)
    return result.get("workloads", {}).get(workload, {}).get(metric)


def make_table(
    results: dict[str, dict[str, Any]], ns: list[int], workloads: list[str]
) -> list[dict[str, Any]]:
    table = []
    for label, workload, metric in _rows(ns, workloads):
        row: dict[str, Any] = {"row": label, "workload": workload or "rss", "metric": metric}
        row["contended"] = []
        for engine in ENGINES:
            row[engine] = _value(results.get(engine), workload, metric)
            others = _others_cores(results.get(engine), workload)
            if row[engine] is not None and others is not None and others > peers.CONTENDED_CORES:
                row["contended"].append(engine)
        for ours in OURS:
            t = row[ours]
            for peer in ("llamacpp", "transformers"):
                row[f"{ours}/{peer}"] = t / row[peer] if t and row[peer] else None
        table.append(row)
    return table


def print_table(table: list[dict[str, Any]], engines: list[str]) -> None:
    cols = [e for e in ENGINES if e in engines]
    for ours in OURS:
        if ours in engines:
            cols += [f"{ours}/{p}" for p in ("llamacpp", "transformers") if p in engines]
    names = {
        "llamacpp": "llama.cpp",
        "ttscale/llamacpp": "ts/llama.cpp",
        "ttscale/transformers": "ts/transf.",
        "ttscale-bf16/llamacpp": "bf16/llama.cpp",
        "ttscale-bf16/transformers": "bf16/transf.",
        "ttscale-int4/llamacpp": "int4/llama.cpp",
        "ttscale-int4/transformers": "int4/transf.",
        "ttscale-int4-eager": "int4-eager",
        "ttscale-int4-eager/llamacpp": "eager/llama.cpp",
        "ttscale-int4-eager/transformers": "eager/transf.",
        "ttscale-lookup/llamacpp": "lookup/llama.cpp",
        "ttscale-lookup/transformers": "lookup/transf.",
    }
    w0 = max(len(r["row"]) for r in table) + 2
    head = "".ljust(w0) + "".join(names.get(c, c).rjust(16) for c in cols)
    print(head)
    print("-" * len(head))
    for r in table:
        cells = []
        for c in cols:
            v = r[c]
            if v is None:
                cells.append("n/a".rjust(16))
            elif "/" in c:
                cells.append(f"{v:.2f}x".rjust(16))
            else:
                mark = "*" if c in r["contended"] else ""
                cells.append(f"{v:.1f}{mark}".rjust(16))
        print(r["row"].ljust(w0) + "".join(cells))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--engines", default=",".join(ENGINES), help="comma list of " + ",".join(ENGINES)
    )
    ap.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="comma list of " + ",".join(WORKLOADS)
    )
    ap.add_argument("--quick", action="store_true", help="smoke check: n=16 only, 32 new tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--max-tokens", type=int, default=None, help="new tokens (default 128; 32 with --quick)"
    )
    ap.add_argument(
        "--ns", default=None, help="parallel sample counts (default 16,64; 16 with --quick)"
    )
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--repeats", type=int, default=1, help="timed runs per workload; the fastest is kept"
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=300,
        help="before each timed run, wait up to this many seconds for other processes to leave "
        "the cores idle (0: don't wait)",
    )
    ap.add_argument(
        "--retries",
        type=int,
        default=2,
        help="extra runs allowed per workload to replace runs disturbed by other processes",
    )
    ap.add_argument(
        "--llamacpp-unified-kv",
        action="store_true",
        help="llama.cpp parallel sampling: one unified KV cache whose prompt cells all n samples "
        "share (less memory; slower at n=64 since every sample attends over the whole buffer) "
        "instead of one KV stream per sample (default)",
    )
    ap.add_argument("--timeout", type=float, default=None, help="seconds per engine process")
    ap.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"JSON results (default {DEFAULT_OUT.relative_to(ROOT)})",
    )
    ap.add_argument("--long-n", type=int, default=16, help="long: samples")
    ap.add_argument("--long-new-tokens", type=int, default=2048, help="long: new tokens each")
    ap.add_argument("--long-prompt-tokens", type=int, default=512, help="long: prompt tokens")
    ap.add_argument("--long-budget", type=int, default=256, help="long: block top-k budget")
    ap.add_argument(
        "--long-tail-steps", type=int, default=128, help="long: steps of the end-of-run rate"
    )
    ap.add_argument("--long-kv-gb", type=float, default=2.0, help="long: ttscale KV pool GiB")
    ap.add_argument(
        "--long-configs",
        default=",".join(LONG_CONFIGS),
        help="long: comma list of " + ",".join(LONG_CONFIGS),
    )
    # internal: child mode
    ap.add_argument("--long-config", choices=list(LONG_CONFIGS), help=argparse.SUPPRESS)
    ap.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.engine:
        return child_main(args.engine, args.spec, args.result)
    if args.long_config:
        return long_child_main(args.long_config, args.spec, args.result)
    if args.workloads == "long":
        return run_long(args)

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for e in engines:
        if e not in ENGINES:
            sys.exit(f"unknown engine {e!r}; choose from {', '.join(ENGINES)}")
    for w in workloads:
        if w not in (*WORKLOADS, "rss"):
            sys.exit(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    max_tokens = args.max_tokens or (32 if args.quick else 128)
    ns = [int(x) for x in args.ns.split(",")] if args.ns else ([16] if args.quick else [16, 64])

    machine = peers.machine_info()
    print(
        f"machine: {machine['cpu']} | {machine['cores']} cores ({machine['usable_cores']} usable)"
        f" | {machine['mem_gib']} GiB | torch {machine['torch']} | transformers "
        f"{machine['transformers']} | llama_cpp {machine['llama_cpp_python']}"
    )
    print(
        f"model: {peers.model_path()} | threads={args.threads} | max_tokens={max_tokens} | n={ns}"
    )
    print(f"note: {QUANT_NOTE}")

    skipped: dict[str, str] = {}
    if "llamacpp" in engines:
        ok, why = peers.llama_cpp_available()
        if not ok:
            skipped["llamacpp"] = (
                f"llama_cpp not importable ({why}); install the optional extra: "
                "pip install -e .[bench]"
            )
            print(f"note: skipping llama.cpp: {skipped['llamacpp']}")

    t0 = time.perf_counter()
    runs_per_workload = max(1, args.repeats) + max(0, args.retries)
    tokenizer = peers.load_tokenizer()
    prompts = peers.build_prompts(
        tokenizer=tokenizer, n_variants=min(900, 4 + 2 * runs_per_workload * max(1, len(ns)))
    )
    print(
        f"prompts: single {len(prompts['single'][0])} tok, parallel {len(prompts['parallel'][0])}"
        f" tok, prefill {len(prompts['prefill'][0])} tok, copy {len(prompts['copy'][0])} tok"
        f" ({time.perf_counter() - t0:.1f}s)"
    )
    spec = {
        "model_path": str(peers.model_path()),
        "threads": args.threads,
        "workloads": workloads,
        "ns": ns,
        "max_tokens": max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "repeats": args.repeats,
        "retries": args.retries,
        "quiet_wait_s": args.quiet_wait,
        "llamacpp_kv_unified": args.llamacpp_unified_kv,
        "prompts_keys": ["single", "parallel", "prefill", "copy"],
        "prompts": {k: prompts[k] for k in ("single", "parallel", "prefill", "copy")},
    }

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for engine in engines:
            if engine in skipped:
                results[engine] = {"engine": engine, "status": "skipped", "note": skipped[engine]}
                continue
            peers.log(f"{engine}: starting")
            results[engine] = run_child(engine, spec_path, args.threads, args.timeout)
            r = results[engine]
            status = r.get("status")
            extra = f" ({r.get('error')})" if status != "ok" else ""
            peers.log(
                f"{engine}: {status}{extra}, {r.get('wall_s', 0):.0f}s, "
                f"peak RSS {r.get('peak_rss_mib', 0):.0f} MiB"
            )

    table = make_table(results, ns, workloads)
    print()
    print_table(table, engines)
    print()
    agreement = peers.greedy_agreement(results, tokenizer)
    if agreement:
        print("greedy single-stream outputs (first 40 tokens):")
        print("\n".join(agreement))
    print(f"note: {QUANT_NOTE}")
    if any(r["contended"] for r in table):
        print(
            f"note: * = other processes used > {peers.CONTENDED_CORES} cores on average while this "
            "was measured (see cpu.others_cores in the JSON); rerun on a quiet machine."
        )
    if "parallel" in workloads:
        print(f"note: {SAMPLING_NOTE}")
        print("note: transformers' num_return_sequences re-prefills the prompt once per sample.")
    for engine, r in results.items():
        if r.get("status") != "ok":
            print(f"note: {engine}: {r.get('status')}: {r.get('error') or r.get('note')}")
        for w, m in r.get("workloads", {}).items():
            if isinstance(m, dict) and "error" in m:
                print(f"note: {engine} {w}: {m['error']}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine,
        "config": {k: v for k, v in spec.items() if k not in ("prompts", "prompts_keys")},
        "prompt_tokens": {k: len(prompts[k][0]) for k in ("single", "parallel", "prefill", "copy")},
        "notes": [QUANT_NOTE, SAMPLING_NOTE],
        "table": table,
        "greedy_agreement": agreement,
        "engines": results,
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
