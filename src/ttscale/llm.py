"""The Python API: `LLM(model).generate(prompts, SamplingParams(...))` and `.chat(...)`."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ttscale.engine.llm_engine import LLMEngine, Proposer
from ttscale.engine.outputs import RequestOutput
from ttscale.engine.proposers import check_speculative, make_proposer
from ttscale.engine.scheduler import SchedulerConfig
from ttscale.kvcache import CacheConfig
from ttscale.loader.memory import release_free_memory
from ttscale.models.compiled import CompileConfig
from ttscale.models.config import ModelConfig
from ttscale.models.quant import load_for_compute
from ttscale.models.registry import build_model
from ttscale.sampling.params import SamplingParams
from ttscale.tokenizer import Message

Prompt = str | Sequence[int]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _split_options(options: dict[str, Any]) -> tuple[CacheConfig, SchedulerConfig]:
    """Routes flat engine keyword options to the component configs that own them."""
    parts = []
    for cls in (CacheConfig, SchedulerConfig):
        names = {f.name for f in dataclasses.fields(cls)}
        parts.append(cls(**{k: options.pop(k) for k in list(options) if k in names}))
    if options:
        raise TypeError(f"unknown engine option(s): {', '.join(sorted(options))}")
    return parts[0], parts[1]


def _hardware(spec: str | None):
    """The roofline the cost model holds runs against: "auto" = this machine's calibrated
    profile if `ttscale calibrate` saved one (else no roofline), or a preset name / JSON path."""
    from ttscale.cost.hardware import load_hardware

    if spec is None:
        return None
    try:
        return load_hardware("local" if spec == "auto" else spec)
    except FileNotFoundError:
        if spec == "auto":
            return None
        raise


class LLM:
    """A loaded model plus its engine. `model=None` loads the embedded SmolLM2-135M-Instruct.

    Engine options (see CacheConfig / SchedulerConfig): block_size, kv_cache_gb,
    enable_prefix_caching, attention, max_num_batched_tokens, max_num_seqs,
    enable_chunked_prefill; the KV format `kv_cache_dtype` ("auto" | "bf16" | "int8" |
    "kivi4" | "kivi2" | ...) and block top-k sparse decode attention (`sparse_attention=
    "block_topk"`, `kv_budget`, `sparse_window`, `sparse_dense_layers`; docs/ARCHITECTURE.md,
    "The Kinetics memory path"). `num_threads` sets torch's CPU threads. `hardware` names the
    roofline for the cost model ("auto": the profile `ttscale calibrate` saved, if any).
    `quantize`: "auto" | "none" | "native" | "int8" | "int4", what the matmuls compute with
    (models/quant.py: load_for_compute). `speculative="prompt_lookup"` drafts
    `num_speculative_tokens` tokens per step by n-gram lookup (engine/proposers.py); or pass
    any `proposer`; `speculative="self"` drafts with this model's first `draft_layers`
    layers (or those listed; default: proposers.self_draft_layers), `speculative="draft"`
    with a smaller `draft_model` sharing the tokenizer; `SamplingParams(speculative=False)`
    turns it off per request. `compile=True` runs decode-sized steps through torch.compile
    (models/compiled.py; the first compile is paid once per machine, cached on disk).
    `fused=True` (default) runs small steps of a quantized model (the default GGUF's) as one
    C++ call per step (models/fused.py; built once per machine, eager if it cannot be).
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        num_threads: int | None = None,
        max_model_len: int | None = None,
        hardware: str | None = "auto",
        proposer: Proposer | None = None,
        quantize: str = "auto",
        speculative: str | None = None,
        num_speculative_tokens: int = 4,
        compile: bool = False,
        fused: bool = True,
        draft_model: str | Path | None = None,
        draft_layers: int | Sequence[int] | None = None,
        **engine_options: Any,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}")
        if speculative is not None:
            if proposer is not None:
                raise ValueError("pass either speculative or proposer, not both")
            check_speculative(speculative, num_speculative_tokens, draft_model, draft_layers)
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        cache_config, scheduler_config = _split_options(dict(engine_options))
        t0 = time.perf_counter()
        checkpoint = load_for_compute(model, _DTYPES[dtype], quantize, device)
        self.config = ModelConfig.from_hf(checkpoint.config)
        network = build_model(self.config, checkpoint.tensors, _DTYPES[dtype], device, consume=True)
        self.load_seconds = time.perf_counter() - t0
        self.source = checkpoint.source
        self.tokenizer = checkpoint.tokenizer
        del checkpoint  # emptied by build_model(consume=True); the model holds its weights
        self.tokenizer.eos_token_ids |= frozenset(self.config.eos_token_ids)
        if speculative is not None:
            options = dict(dtype=_DTYPES[dtype], quantize=quantize, device=device, compile=compile)
            proposer = make_proposer(
                speculative,
                num_speculative_tokens,
                network,
                self.tokenizer,
                draft_model,
                draft_layers,
                options,
            )
        self.engine = LLMEngine(
            network,
            self.tokenizer,
            cache_config,
            scheduler_config,
            device,
            max_model_len,
            hardware=_hardware(hardware),
            proposer=proposer,
            compile_config=CompileConfig(enabled=compile, fused=fused),
        )
        self._ids = itertools.count()
        release_free_memory()  # loading's freed temporaries (see loader/memory.py)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Runs every prompt (text or token ids) to completion; outputs keep the input order."""
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        encoded = []
        for p in prompts:  # type: ignore[union-attr]
            if isinstance(p, str):
                encoded.append((p, self.tokenizer.encode(p)))
            else:
                encoded.append((None, list(p)))
        return self._run(encoded, params, use_tqdm)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One conversation or a list of them, rendered with the model's chat template."""
        if not messages:
            raise ValueError("messages must not be empty")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        encoded = []
        for conv in conversations:
            text = self.tokenizer.apply_chat_template(conv)  # type: ignore[arg-type]
            encoded.append((text, self.tokenizer.encode(text, add_special_tokens=False)))
        return self._run(encoded, params, use_tqdm)

    def stream(
        self, prompt_token_ids: Sequence[int], params: SamplingParams, prompt: str | None = None
    ) -> Iterator[RequestOutput]:
        """Yields the request's output after every step that changed it (text_delta is new)."""
        request_id = f"stream-{next(self._ids)}"
        self.engine.add_request(request_id, prompt_token_ids, params, prompt)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort(request_id)

    def hidden_states(
        self,
        token_ids: Sequence[Sequence[int]],
        layers: Sequence[int],
        start: int | Sequence[int] = 0,
    ) -> list[torch.Tensor]:
        """The model's hidden states over each token list, computed by the engine (batched,
        paged, shared prefixes cached): per list, (len - start, len(layers), hidden_size) for
        positions >= start. Layers are numbered as transformers' `output_hidden_states`:
        0 = embeddings, i = after decoder layer i - 1, num_layers = after the final norm."""
        starts = [start] * len(token_ids) if isinstance(start, int) else list(start)
        if len(starts) != len(token_ids):
            raise ValueError("pass one start or one per token list")
        requests = []
        try:
            for ids, first in zip(token_ids, starts, strict=True):
                rid = f"embed-{next(self._ids)}"
                requests.append(self.engine.add_embed_request(rid, ids, layers, first))
            while not all(r.finished for r in requests):
                self.engine.step()
            return [r.sequences[0].hidden_states for r in requests]
        finally:
            for r in requests:
                self.engine.abort(r.request_id)

    def _run(
        self,
        encoded: list[tuple[str | None, list[int]]],
        params: SamplingParams | Sequence[SamplingParams] | None,
        use_tqdm: bool,
    ) -> list[RequestOutput]:
        if params is None or isinstance(params, SamplingParams):
            params_list = [params or SamplingParams()] * len(encoded)
        else:
            params_list = list(params)
            if len(params_list) != len(encoded):
                raise ValueError("pass one SamplingParams or one per prompt")
        ids = [f"req-{next(self._ids)}" for _ in encoded]
        try:
            for request_id, (text, tokens), p in zip(ids, encoded, params_list, strict=True):
                self.engine.add_request(request_id, tokens, p, text)
            results: dict[str, RequestOutput] = {}
            generated = dict.fromkeys(ids, 0)
            # Total is an upper bound (max_tokens); sequences that stop early end the bar short.
            total = sum(p.n * p.max_tokens for p in params_list)
            show = use_tqdm and total >= 1024
            with tqdm(total=total, desc="generating", unit="tok", disable=not show) as bar:
                while len(results) < len(ids):
                    for out in self.engine.step():
                        bar.update(out.usage.generated_tokens - generated[out.request_id])
                        generated[out.request_id] = out.usage.generated_tokens
                        if out.finished:
                            results[out.request_id] = out
            return [results[i] for i in ids]
        finally:
            for request_id in ids:
                self.engine.abort(request_id)
