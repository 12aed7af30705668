"""Sampling parameters of one request, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ttscale.errors import SamplingParamsError

if TYPE_CHECKING:  # the grammar machinery (torch, xgrammar) is not needed to build params
    from ttscale.sampling.constraints import ConstraintSpec

MAX_TEMPERATURE = 100.0
MAX_PENALTY = 100.0


@dataclass(frozen=True)
class SamplingParams:
    """How to sample the continuations of one request (the OpenAI / vLLM set).

    Invariant: every instance is valid; `__post_init__` rejects impossible values with a
    `ValueError` naming the field, so the engine never sees them.
    """

    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0  # CTRL-style, on prompt and output tokens; 1 disables
    presence_penalty: float = 0.0  # OpenAI-style, on output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None  # per-request seed: same tokens whatever else is in the batch
    max_tokens: int = 16
    min_tokens: int = 0  # EOS and stop ids are masked until this many tokens are generated
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: sampled token's logprob plus top-k
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    speculative: bool = True  # False: no draft tokens for this request (LLM(speculative=...))
    # Block top-k sparse decode attention for this request (None: the engine's setting):
    # "dense" or "block_topk", with a KV token budget per decode step (None: the engine's).
    sparse_attention: str | None = None
    kv_budget: int | None = None
    # Structured output: a grammar every sample follows (`constraints.GrammarCompiler`);
    # the sampler masks what it forbids, the engine advances each sample's parse state.
    constraint: ConstraintSpec | None = None

    def __post_init__(self) -> None:
        # Accept a single string / list for `stop` and lists for ids, store tuples (hashable).
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> SamplingParamsError:
            return SamplingParamsError(name, getattr(self, name), why)

        def finite(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(name, "must be a number")
            if not math.isfinite(value):
                raise bad(name, "must be finite")
            return float(value)

        def integer(name: str) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(name, "must be an integer")
            return value

        if integer("n") < 1:
            raise bad("n", "must be >= 1")
        # Upper bounds keep the sampler's float32 math finite (T=1e40 or a penalty of 1e-40
        # overflow); past them the distribution is already uniform / fully penalized.
        if not 0 <= finite("temperature") <= MAX_TEMPERATURE:
            raise bad("temperature", f"must be in [0, {MAX_TEMPERATURE:g}]")
        if not 0 < finite("top_p") <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if integer("top_k") < 0:
            raise bad("top_k", "must be >= 0 (0 or -1 disables)")
        if not 0 <= finite("min_p") <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not 1 / MAX_PENALTY <= finite("repetition_penalty") <= MAX_PENALTY:
            raise bad("repetition_penalty", f"must be in [{1 / MAX_PENALTY:g}, {MAX_PENALTY:g}]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= finite(name) <= 2:
                raise bad(name, "must be in [-2, 2]")
        if self.seed is not None:
            integer("seed")
        if integer("max_tokens") < 1:
            raise bad("max_tokens", "must be >= 1")
        if not 0 <= integer("min_tokens") <= self.max_tokens:
            raise bad("min_tokens", "must be in [0, max_tokens]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers")
        if not isinstance(self.speculative, bool):
            raise bad("speculative", "must be true or false")
        if self.logprobs is not None and not 0 <= integer("logprobs") <= 20:
            raise bad("logprobs", "must be in [0, 20]")
        if self.sparse_attention is not None:
            # Imported here: kvcache imports torch, which building params (and the CLI's
            # --help, which must stay fast) does not otherwise need.
            from ttscale.kvcache.config import SPARSE_POLICIES

            if self.sparse_attention not in SPARSE_POLICIES:
                raise bad("sparse_attention", f"must be one of {', '.join(SPARSE_POLICIES)}")
        if self.kv_budget is not None and integer("kv_budget") < 1:
            raise bad("kv_budget", "must be >= 1 (the engine checks its own minimum)")
        if self.constraint is not None and self.min_tokens:
            # A complete grammar allows only its stop token, which min_tokens would mask.
            raise bad("min_tokens", "must be 0 with a grammar constraint (it decides the end)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# Default is greedy-free sampling at T=1, like vLLM; `GREEDY` is a convenience for tests and evals.
GREEDY = SamplingParams(temperature=0.0)

__all__ = ["GREEDY", "SamplingParams"]
