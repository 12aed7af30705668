#!/usr/bin/env python
"""What quantized KV and block top-k attention cost in fidelity, on the embedded model.

    python benchmarks/kv_accuracy.py                     # 8 prompts, 512 greedy tokens each
    python benchmarks/kv_accuracy.py --prompts 2 --new-tokens 32 --budgets 96   # smoke check

For every configuration against the unquantized dense cache (same weights and dtype):
  greedy agreement   free-running greedy decoding of `--new-tokens` tokens: the share of
                     positions with the reference's token, and where the two first differ
  mean KL            teacher-forced on the reference's greedy tokens (every step decodes the
                     reference's token whatever the configuration would pick), the mean over
                     positions of KL(reference || configuration) of the next-token
                     distributions: the distortion per step, without the compounding of a
                     divergent continuation
Decode rows go through the engine's real attention path (block top-k reads only decode
rows; the prompt is prefilled densely). The teacher forcing wraps the engine's sampler: the
script's own instrumentation, not an engine feature.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

# Fixed prompts: multi-step word problems whose answers take a few hundred tokens.
QUESTIONS = [
    "A farmer has 17 cows and buys 3 times as many sheep. He sells 12 sheep and then buys "
    "half as many goats as he has sheep. How many animals does he have? Explain each step.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "A train leaves at 9:40 and travels 185 km at 74 km/h. When does it arrive? Show your work.",
    "Explain how photosynthesis works, step by step, for a curious twelve-year-old.",
    "A shop sells pens at 3 for $2 and notebooks at $4.50 each. Maria buys 12 pens and 3 "
    "notebooks and pays with a $50 bill. How much change does she get? Explain.",
    "Describe the water cycle and give three examples of how it affects daily life.",
    "Solve step by step: a rectangle's length is 4 more than twice its width and its "
    "perimeter is 50. Find its area.",
    "Write a letter to a friend describing your favourite season and why you like it.",
]


class Recorder:
    """Wraps the engine's sampler: records each step's next-token log-probabilities (one
    sequence at a time) and, when `forced` is set, replaces the sampled token by the forced
    one at that position (teacher forcing)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.forced: list[int] | None = None
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, rows: Any) -> Any:
        from ttscale.sampling.sampler import SampleResult

        result = self.inner(logits, rows)
        assert len(rows) == 1, "the recorder runs one sequence at a time"
        self.logprobs.append(torch.log_softmax(logits[0].float(), dim=-1))
        k = len(rows[0].output_token_ids)
        if self.forced is not None and k < len(self.forced):
            return SampleResult([self.forced[k]])
        return result


def make_llm(args: argparse.Namespace, **options: Any):
    from ttscale import LLM

    llm = LLM(
        dtype=args.dtype,
        quantize=args.quantize,
        num_threads=args.threads,
        kv_cache_gb=args.kv_gb,
        hardware=None,
        **options,
    )
    recorder = Recorder(llm.engine.sampler)
    llm.engine.sampler = recorder
    return llm, recorder


def decode(llm, recorder: Recorder, ids: list[int], new_tokens: int, forced=None):
    """(tokens, (new_tokens, V) log-probs) of one greedy (or teacher-forced) run."""
    from ttscale import SamplingParams

    recorder.forced, recorder.logprobs = forced, []
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    out = llm.generate([ids], params, use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), torch.stack(recorder.logprobs)


def configurations(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    # The reference's own settings again: agreement 100% and KL ~0 validate the measurement.
    configs: dict[str, dict[str, Any]] = {"dense (self-check)": {}}
    for fmt in args.kv_dtypes.split(","):
        if fmt.strip():
            configs[f"kv {fmt.strip()}"] = {"kv_cache_dtype": fmt.strip()}
    for budget in (int(b) for b in args.budgets.split(",") if b.strip()):
        topk = {"sparse_attention": "block_topk", "kv_budget": budget}
        configs[f"block top-k B={budget}"] = topk
        if args.with_int8:
            configs[f"block top-k B={budget} + int8"] = {**topk, "kv_cache_dtype": "int8"}
    return configs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8, help=f"how many (<= {len(QUESTIONS)})")
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument(
        "--kv-dtypes", default="int8,kivi4,kivi2", help="comma list of kv_cache_dtype values"
    )
    ap.add_argument("--budgets", default="64,128,256,512", help="block top-k budgets")
    ap.add_argument(
        "--with-int8",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also each budget over an int8 cache",
    )
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantize", default="none", help="weights: none | auto | ...")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-gb", type=float, default=0.25)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "kv_accuracy.json")
    args = ap.parse_args(argv)
    if not 1 <= args.prompts <= len(QUESTIONS):
        sys.exit(f"--prompts must be in [1, {len(QUESTIONS)}]")

    t0 = time.perf_counter()
    ref_llm, ref_rec = make_llm(args)
    prompts = [
        ref_llm.tokenizer.encode_chat([{"role": "user", "content": q}])
        for q in QUESTIONS[: args.prompts]
    ]
    # Reference log-probs in fp16 (8 prompts x 512 x 49k vocabulary is ~400 MB): its 10-bit
    # mantissa keeps the log-probs that matter (near 0) within ~1e-4; bf16 would bias the
    # KL by ~1e-3.
    reference = [decode(ref_llm, ref_rec, ids, args.new_tokens) for ids in prompts]
    reference = [(toks, lp.to(torch.float16)) for toks, lp in reference]
    ref_bytes = ref_llm.engine.executor.kv_cache.bytes_per_token
    del ref_llm, ref_rec
    print(
        f"reference: dense, KV {args.dtype}, weights quantize={args.quantize}; "
        f"{len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
        f"{args.new_tokens} new tokens each ({time.perf_counter() - t0:.0f} s)"
    )

    rows = []
    cols = ("agree %", "1st diff", "mean KL", "KV B/token")
    print(f"{'':32}" + "".join(c.rjust(12) for c in cols))
    for name, options in configurations(args).items():
        try:
            llm, rec = make_llm(args, **options)
        except ValueError as e:
            print(f"{name:32}  skipped: {e}")
            rows.append({"config": name, "options": options, "error": str(e)})
            continue
        agree, first, kls = [], [], []
        for ids, (ref_toks, ref_lp) in zip(prompts, reference, strict=True):
            toks, _ = decode(llm, rec, ids, args.new_tokens)
            same = [a == b for a, b in zip(toks, ref_toks, strict=True)]
            agree.append(sum(same) / len(same))
            first.append(same.index(False) if False in same else len(same))
            _, lp = decode(llm, rec, ids, args.new_tokens, forced=ref_toks)
            p = ref_lp.float()
            kls.append(float((p.exp() * (p - lp)).sum(-1).mean()))
        row = {
            "config": name,
            "options": options,
            "greedy_agreement": sum(agree) / len(agree),
            "first_divergence_mean": sum(first) / len(first),
            "first_divergence": first,
            "mean_kl": sum(kls) / len(kls),
            "kv_bytes_per_token": llm.engine.executor.kv_cache.bytes_per_token,
            "kv_bytes_vs_reference": llm.engine.executor.kv_cache.bytes_per_token / ref_bytes,
        }
        rows.append(row)
        cells = [
            f"{100 * row['greedy_agreement']:.1f}",
            f"{row['first_divergence_mean']:.0f}",
            f"{row['mean_kl']:.4f}",
            f"{row['kv_bytes_per_token']}",
        ]
        print(f"{name:32}" + "".join(c.rjust(12) for c in cells))
        del llm, rec

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "torch": torch.__version__,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "reference_kv_bytes_per_token": ref_bytes,
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(f"results written to {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
