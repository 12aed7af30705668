"""Draft-token proposers for speculative decoding (the engine's `Proposer` protocol):
prompt lookup (no second model) and a draft model (the target with layers skipped, or a
smaller model sharing the tokenizer).

The engine verifies every draft in the sequence's next step and keeps the longest prefix the
model itself samples, so a proposer only affects speed, never the output distribution (for a
deterministic proposer; see `LLMEngine._accept_drafts`).
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ttscale.engine.llm_engine import LLMEngine, Proposer
from ttscale.errors import ModelLoadError
from ttscale.kvcache import CacheConfig
from ttscale.models.compiled import CompileConfig
from ttscale.models.config import ModelConfig
from ttscale.models.quant import load_for_compute
from ttscale.models.registry import build_model
from ttscale.sampling.params import SamplingParams
from ttscale.tokenizer import Tokenizer

SPECULATIVE_METHODS = ("prompt_lookup", "self", "draft")


class PromptLookupProposer:
    """Prompt lookup decoding (Saxena 2023; vLLM's "ngram" speculator): find the most recent
    earlier occurrence of the sequence's last `ngram` tokens (then shorter suffixes, down to
    `min_ngram`) and propose the `k` tokens that followed it. No second model: it pays where
    the answer repeats the context (edits, summaries, code, quoting), and costs one
    (T,)-token scan per step elsewhere, plus the verification of drafts that miss.
    `min_ngram=2`: single-token matches drafted mostly misses on the embedded model
    (acceptance 0.67 vs 0.81 on the copy workload), and every verified row costs time.

    Deterministic (a function of the tokens alone), so the engine's acceptance keeps the
    target distribution exactly at any temperature.
    """

    def __init__(self, k: int = 4, ngram: int = 3, min_ngram: int = 2) -> None:
        if k < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, not {k}")
        if not 1 <= min_ngram <= ngram:
            raise ValueError(f"need 1 <= min_ngram <= ngram, not {min_ngram} and {ngram}")
        self.k, self.ngram, self.min_ngram = k, ngram, min_ngram

    def propose(self, seq_id: int, token_ids: Sequence[int]) -> list[int]:
        # bytes.rfind runs the search in C; ids are 4-byte items, so a hit must be aligned.
        ids = array("i", token_ids)
        data, width, length = ids.tobytes(), ids.itemsize, len(ids)
        for n in range(min(self.ngram, length - 1), self.min_ngram - 1, -1):
            pattern = data[-n * width :]
            # The match must end before the last token, so at least one token follows it.
            end = (length - 1) * width
            while (pos := data.rfind(pattern, 0, end)) >= 0:
                if pos % width == 0:
                    start = pos // width + n
                    return ids[start : start + self.k].tolist()
                end = pos + len(pattern) - 1
        return []


class DraftModelProposer:
    """Speculation with a draft model: the draft decodes `k` greedy tokens for every
    decoding sequence, all sequences batched in one step of its own engine (its own paged
    KV cache; its prefix cache keeps each sequence's blocks between calls, so a call
    computes the tokens accepted since the last one plus k - 1 decode steps).

    The draft is the target with later layers skipped (`speculative="self"`, sharing the
    weights) or a smaller model with the same tokenizer (`speculative="draft"`). Greedy, so
    deterministic given the tokens: the engine's acceptance keeps the target distribution
    at any temperature.
    """

    def __init__(self, engine: LLMEngine, k: int) -> None:
        if k < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, not {k}")
        self.engine, self.k = engine, k
        self._ids = itertools.count()

    def propose(self, seq_id: int, token_ids: Sequence[int]) -> list[int]:
        return self.propose_batch([(seq_id, token_ids, self.k)])[0]

    def propose_batch(self, items: Sequence[tuple[int, Sequence[int], int]]) -> list[list[int]]:
        """For each (seq_id, tokens, at most this many): its drafts, all in one run."""
        engine = self.engine
        requests = []
        for _, token_ids, limit in items:
            n = min(self.k, limit)
            if n < 1 or len(token_ids) + n > engine.max_model_len:
                requests.append(None)  # no room (or past the draft's context): no drafts
                continue
            params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            rid = f"draft-{next(self._ids)}"
            requests.append(engine.add_request(rid, token_ids, params))
        while engine.has_unfinished:
            engine.step()
        return [[] if r is None else list(r.sequences[0].output_token_ids) for r in requests]


# The draft engine's KV pool: its sequences are the target's decoding ones, and finished
# drafts leave their blocks cached for the next call.
DRAFT_KV_CACHE_GB = 0.25


def make_proposer(
    method: str,
    num_speculative_tokens: int,
    target: torch.nn.Module | None = None,
    tokenizer: Tokenizer | None = None,
    draft_model: str | Path | None = None,
    draft_layers: int | Sequence[int] | None = None,
    draft_options: dict[str, Any] | None = None,
) -> Proposer:
    """`LLM(speculative=...)`'s proposer by name. "self" and "draft" need the loaded target
    and its tokenizer; "draft" loads `draft_model`. `draft_options`: dtype, quantize and
    device (of `load_draft`), compile (the draft engine's steps compiled too)."""
    check_speculative(method, num_speculative_tokens, draft_model, draft_layers)
    if method == "prompt_lookup":
        return PromptLookupProposer(num_speculative_tokens)
    assert target is not None and tokenizer is not None
    options = dict(draft_options or {})
    compile_config = CompileConfig(enabled=bool(options.pop("compile", False)))
    if method == "self":
        model = target.layer_skip(self_draft_layers(target.config.num_hidden_layers, draft_layers))
    else:
        model = load_draft(draft_model, tokenizer, target, **options)
    engine = LLMEngine(
        model,
        tokenizer,
        CacheConfig(kv_cache_gb=DRAFT_KV_CACHE_GB, enable_prefix_caching=True),
        device=options.get("device", "cpu"),
        compile_config=compile_config,
    )
    return DraftModelProposer(engine, num_speculative_tokens)


def self_draft_layers(total: int, draft_layers: int | Sequence[int] | None) -> list[int]:
    """The layers a self-speculation draft keeps: the first `draft_layers`, the listed ones,
    or by default all but ~2/15 of them from 3/5 depth on (the embedded 30-layer model: all
    but 18-21). Why that default: on the embedded model, greedy 48 tokens, k = 3, fp32, it
    kept the most drafts of the patterns tried (acceptance 0.32; first 24 layers 0.13, first
    28 0.20, all but 10-15 0.19, all but every third of 8-23 0.15). Untrained layer skipping
    drafts poorly on so small a model: measured, it does not pay there (docs/BENCHMARKS.md)."""
    if draft_layers is None:
        start, skip = round(0.6 * total), max(1, round(total * 2 / 15))
        return [i for i in range(total) if not start <= i < start + skip]
    if isinstance(draft_layers, int):
        if not 1 <= draft_layers < total:
            raise ValueError(f"draft_layers must be in [1, {total}), not {draft_layers}")
        return list(range(draft_layers))
    return [int(i) for i in draft_layers]


def check_speculative(
    method: str,
    num_speculative_tokens: int,
    draft_model: str | Path | None = None,
    draft_layers: int | Sequence[int] | None = None,
) -> None:
    """Refuses bad speculation options before any model is loaded."""
    if method not in SPECULATIVE_METHODS:
        raise ValueError(
            f"speculative must be one of {', '.join(SPECULATIVE_METHODS)}, not {method!r}"
        )
    if num_speculative_tokens < 1:
        raise ValueError(f"num_speculative_tokens must be >= 1, not {num_speculative_tokens}")
    if method == "draft" and draft_model is None:
        raise ValueError("speculative='draft' needs draft_model (a path to a smaller model)")
    if method != "draft" and draft_model is not None:
        raise ValueError(f"draft_model is for speculative='draft', not {method!r}")
    if method != "self" and draft_layers is not None:
        raise ValueError(f"draft_layers is for speculative='self', not {method!r}")


def load_draft(
    path: str | Path | None,
    tokenizer: Tokenizer,
    target: torch.nn.Module,
    dtype: torch.dtype = torch.float32,
    quantize: str = "auto",
    device: str = "cpu",
) -> torch.nn.Module:
    """A smaller model for drafting; refused unless its tokenizer maps every token to the
    same id as the target's (drafts are token ids)."""
    checkpoint = load_for_compute(path, dtype, quantize, device)
    ours, theirs = tokenizer.hf.get_vocab(), checkpoint.tokenizer.hf.get_vocab()
    if ours != theirs:
        differ = sum(1 for t, i in theirs.items() if ours.get(t) != i) + len(
            set(ours) - set(theirs)
        )
        raise ModelLoadError(
            f"draft model {checkpoint.source} has another tokenizer than the target "
            f"({len(theirs)} vs {len(ours)} tokens, {differ} ids differ): speculation needs "
            "the same token ids"
        )
    config = ModelConfig.from_hf(checkpoint.config)
    if config.vocab_size != target.config.vocab_size:
        raise ModelLoadError(
            f"draft model {checkpoint.source} has {config.vocab_size} logits, the target "
            f"{target.config.vocab_size}: speculation needs the same vocabulary"
        )
    return build_model(config, checkpoint.tensors, dtype, device, consume=True)


def speculation_stats(stats: dict[str, float]) -> dict[str, float]:
    """From `LLMEngine.stats`: the share of drafted tokens the model kept, and the tokens a
    sequence gained per step that verified drafts (1 = speculation bought nothing)."""
    drafted, steps = stats["draft_tokens"], stats["draft_steps"]
    accepted = stats["accepted_draft_tokens"]
    return {
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "tokens_per_step": 1 + accepted / steps if steps else 1.0,
    }
