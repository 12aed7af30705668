"""Resident memory through bench_engine.py's workloads, one by one (docs/PERF_RSS.md, issue 13).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/rss_breakdown.py            # ttscale-int4
    OMP_NUM_THREADS=1 python benchmarks/rss_breakdown.py --quantize auto --max-tokens 32

Loads `LLM()` on the embedded GGUF as bench_engine.py's `ttscale-int4` does, runs its warm-up
and workloads (single 128 tokens, parallel n=16 and n=64, a 1000-token prefill, copy) on the
same prompts, and prints after each: VmRSS and the peak so far (VmHWM), the KV pool's resident
MiB (`mincore` over its tensors), the rest by mapping (glibc's [heap], other anonymous
memory, files), the distinct block ids handed out so far (the block
manager's allocations, recorded from outside), the block manager's peak of blocks in use, and
the evictable (prefix-cached, unreferenced) blocks. Linux only (/proc, mincore).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
PAGE = mmap.PAGESIZE


def resident_bytes(ptr: int, nbytes: int) -> int:
    """Bytes of [ptr, ptr + nbytes) whose pages are resident (whole pages, clipped)."""
    start = ptr - ptr % PAGE
    length = ptr + nbytes - start
    pages = -(-length // PAGE)
    vec = (ctypes.c_ubyte * pages)()
    if _libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(b & 1 for b in bytes(vec)) * PAGE


def mappings_mib() -> dict[str, float]:
    """Resident MiB by kind of mapping: glibc's [heap], other anonymous ones (large mallocs,
    the KV pool), files (libraries, mapped weights)."""
    out = {"heap": 0.0, "anon": 0.0, "file": 0.0}
    kind = "anon"
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if not head:
                continue
            if "-" in head[0] and not head[0].endswith(":"):
                name = head[5] if len(head) > 5 else ""
                kind = "heap" if name == "[heap]" else "file" if name.startswith("/") else "anon"
            elif head[0] == "Rss:":
                out[kind] += int(head[1]) / 1024
    return out


def kv_tensors(cache) -> list:
    tensors = list(cache.row_tensors()) + list(cache.block_tensors())
    if cache.key_means is not None:
        tensors.append(cache.key_means)
    return tensors


def dense_copy_bytes(model) -> int:
    """2 bytes per weight of every quantized matmul that keeps a bf16 oneDNN copy."""
    from ttscale.models.quant import _WithDense

    total, seen = 0, set()
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, _WithDense) and value.dense is not None and id(value) not in seen:
                seen.add(id(value))
                w = getattr(value, "packed", None)
                n = value.out_features
                k = w.shape[1] * 2 if w is not None else value.codes.shape[1]
                total += 2 * n * k
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quantize", default="native", help="bench_engine's ttscale-int4: native")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ns", default="16,64")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--trim", action="store_true", help="malloc_trim(0) after each workload")
    ap.add_argument(
        "--keep-cached",
        action="store_true",
        help="LLM(evict_before_growing=False): every cached prefix stays until the pool is "
        "full (the default before session 6)",
    )
    ap.add_argument("--dump-prompts", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dump_prompts:  # the child that tokenizes, as bench_engine.py's parent does
        print(json.dumps(peers.build_prompts(n_variants=8)))
        return
    ns = [int(n) for n in args.ns.split(",")]

    import torch

    torch.set_num_threads(1)
    # Tokenized in another process: this one holds only what bench_engine.py's child holds.
    cmd = [sys.executable, __file__, "--dump-prompts"]
    prompts = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    from ttscale import LLM, SamplingParams

    rows: list[tuple[str, ...]] = []
    imported = status_mib("VmRSS")
    t0 = time.perf_counter()
    llm = LLM(
        model=str(peers.model_path()),
        num_threads=1,
        dtype=args.dtype,
        quantize=args.quantize,
        kv_cache_dtype=args.kv_cache_dtype,
        evict_before_growing=not args.keep_cached,
    )
    load_s = time.perf_counter() - t0
    engine = llm.engine
    bm = engine.block_manager
    cache = engine.executor.kv_cache
    pool_bytes = sum(t.nbytes for t in kv_tensors(cache))
    block_bytes = pool_bytes / (cache.num_blocks + 1)
    touched: set[int] = set()
    alloc = bm._alloc

    def recording_alloc() -> int:
        b = alloc()
        touched.add(b)
        return b

    bm._alloc = recording_alloc  # instance attribute: the manager's own calls go through it

    def kv_resident() -> float:
        return sum(resident_bytes(t.data_ptr(), t.nbytes) for t in kv_tensors(cache)) / 2**20

    def trim() -> None:
        if args.trim:
            from ttscale.loader.memory import release_free_memory

            release_free_memory()

    clock = [time.perf_counter()]

    def record(label: str) -> None:
        s = bm.stats()
        now = time.perf_counter()
        m, kv = mappings_mib(), kv_resident()
        rows.append(
            (
                label,
                f"{now - clock[0]:.1f}",
                f"{status_mib('VmRSS'):.0f}",
                f"{status_mib('VmHWM'):.0f}",
                f"{kv:.0f}",
                f"{m['heap']:.0f}",
                f"{m['anon'] - kv:.0f}",
                f"{m['file']:.0f}",
                str(len(touched)),
                f"{len(touched) * block_bytes / 2**20:.0f}",
                str(s["peak"]),
                str(s["evictable"]),
            )
        )
        print(" | ".join(rows[-1]), flush=True)
        clock[0] = time.perf_counter()

    variants = {k: peers.Variants(prompts[k]) for k in ("single", "parallel", "prefill", "copy")}

    def generate(key: str, max_tokens: int, n: int = 1, sample: bool = False) -> None:
        params = SamplingParams(
            n=n,
            temperature=0.8 if sample else 0.0,
            top_p=0.95 if sample else 1.0,
            seed=0,
            max_tokens=max_tokens,
            ignore_eos=True,
        )
        out = llm.generate([variants[key].take()], params, use_tqdm=False)[0]
        assert {len(o.token_ids) for o in out.outputs} == {max_tokens}

    print(
        f"imports {imported:.0f} MiB | LLM() {load_s:.2f} s | KV pool "
        f"{pool_bytes / 2**20:.0f} MiB virtual, {cache.num_blocks} blocks of "
        f"{block_bytes / 2**10:.0f} KiB ({cache.block_size} tokens, {cache.dtype}) | bf16 "
        f"copies {dense_copy_bytes(engine.executor.model) / 2**20:.0f} MiB"
    )
    header = (
        "after",
        "s",
        "VmRSS",
        "VmHWM",
        "KV resident",
        "[heap]",
        "other anon",
        "files",
        "blocks touched",
        "their MiB",
        "bm peak",
        "evictable",
    )
    print(" | ".join(header))
    record("LLM()")
    clock[0] = time.perf_counter()
    generate("single", 8)
    generate("parallel", 4, n=min(ns), sample=True)
    generate("prefill", 1)
    trim()
    record("warm-up")
    params = SamplingParams(n=1, temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    for _ in llm.stream(variants["single"].take(), params):
        pass
    trim()
    record(f"single {args.max_tokens}")
    for n in ns:
        generate("parallel", args.max_tokens, n=n, sample=True)
        trim()
        record(f"parallel n={n}")
    generate("prefill", 1)
    trim()
    record("prefill 1000")
    generate("copy", peers.COPY_NEW_TOKENS)
    trim()
    record(f"copy {peers.COPY_NEW_TOKENS}")
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
