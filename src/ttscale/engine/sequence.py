"""Requests and their sequences: the engine's unit of work is a sequence of tokens.

A request with `n` samples starts as one sequence; when its prompt is prefilled the engine forks
it into `n` sequences that share every KV block (see LLMEngine.fork). Search strategies fork
sequences mid-generation the same way.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field

import torch

from ttscale.cost.usage import RunCost
from ttscale.sampling.detokenizer import IncrementalDetokenizer
from ttscale.sampling.params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # monotonically increasing: FCFS order, and "newest" for preemption
    prompt: str | None = None
    sequences: list[Sequence] = field(default_factory=list)
    num_cached_prompt_tokens: int = 0  # prompt tokens served by the prefix cache
    num_computed_prompt_tokens: int = 0  # prompt tokens run through the model (incl. recompute)
    peak_kv_blocks: int = 0  # blocks held by all its sequences together, at most
    forked: bool = False  # the n samples exist
    retain: bool = False  # keep finished sequences' blocks until release() (for search)
    cost: RunCost = field(default_factory=RunCost)  # its share of every step it was in

    @property
    def finished(self) -> bool:
        return self.forked and all(s.status is SequenceStatus.FINISHED for s in self.sequences)


@dataclass(eq=False)
class Sequence:
    """Invariant: token_ids[:num_computed_tokens] have their KV in the cache (while RUNNING)."""

    seq_id: int
    request: Request
    index: int  # which of the request's samples this is (seeds its RNG)
    token_ids: list[int]
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # matched stop string or stop token id
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    num_preemptions: int = 0
    # A search step forked from a finished branch may bring its own limits and stop strings;
    # limits (max_tokens, min_tokens) count from step_start.
    params: SamplingParams | None = None
    step_start: int = 0
    pending_delta: str = ""  # text produced since the last RequestOutput (streaming)
    # Speculative tokens appended at the end of token_ids for this step only: verified (and
    # accepted or rolled back) by the step that computes them; never seen between steps.
    num_draft_tokens: int = 0
    # An embedding sequence computes its tokens without sampling and keeps the hidden states
    # of positions >= embed_start at these layers (the probe verifier's features).
    embed_layers: tuple[int, ...] | None = None
    embed_start: int = 0
    hidden_parts: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.params is None:
            self.params = self.request.params
        if not self.step_start:
            self.step_start = len(self.request.prompt_token_ids)

    @property
    def hidden_states(self) -> torch.Tensor | None:
        """(positions from embed_start, len(embed_layers), hidden) once computed, else None."""
        return torch.cat(self.hidden_parts) if self.hidden_parts else None

    @property
    def cacheable_len(self) -> int:
        """How many leading tokens may come from the prefix cache: an embedding sequence must
        compute every position it returns hidden states for."""
        return self.embed_start + 1 if self.embed_layers is not None else self.num_tokens

    def drop_drafts(self) -> None:
        if self.num_draft_tokens:
            del self.token_ids[-self.num_draft_tokens :]
            self.num_draft_tokens = 0

    @property
    def num_step_tokens(self) -> int:
        """Tokens generated since this sequence's current step began."""
        return self.num_tokens - self.step_start

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def priority(self) -> tuple[int, int]:
        """Smaller is older: preemption evicts the largest."""
        return (self.request.arrival, self.index)

    def clone(self, seq_id: int, index: int, generator: torch.Generator | None) -> Sequence:
        """A child that continues from exactly this sequence's state (tokens, text, logprobs)."""
        return Sequence(
            params=self.params,
            step_start=self.step_start,
            seq_id=seq_id,
            request=self.request,
            index=index,
            token_ids=list(self.token_ids),
            detokenizer=copy.copy(self.detokenizer),
            generator=generator,
            num_computed_tokens=self.num_computed_tokens,
            status=self.status,
            logprobs=list(self.logprobs),
            top_logprobs=list(self.top_logprobs),
        )
