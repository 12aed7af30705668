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
from ttscale.sampling.constraints import TokenConstraint
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
    # Speculation: drafts proposed, drafts kept, and sequence-steps that verified drafts.
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    draft_steps: int = 0

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
    # Hidden-state capture (the probe verifier's features): the states of positions >=
    # hidden_start at these layers, kept as they are computed. An embed-only sequence computes
    # its tokens without sampling and finishes.
    hidden_layers: tuple[int, ...] | None = None
    hidden_start: int = 0
    embed_only: bool = False
    hidden_parts: list[torch.Tensor] = field(default_factory=list)
    num_hidden_rows: int = 0  # rows captured: positions hidden_start .. + num_hidden_rows - 1
    # The grammar state of a structured output (params.constraint), fed every sampled token.
    constraint: TokenConstraint | None = None

    def __post_init__(self) -> None:
        if self.params is None:
            self.params = self.request.params
        if not self.step_start:
            self.step_start = len(self.request.prompt_token_ids)

    @property
    def hidden_states(self) -> torch.Tensor | None:
        """(captured positions from hidden_start, len(hidden_layers), hidden), else None."""
        if not self.hidden_parts:
            return None
        if len(self.hidden_parts) > 1:  # concatenate once, keep the result
            self.hidden_parts = [torch.cat(self.hidden_parts)]
        return self.hidden_parts[0]

    def capture_hidden(self, rows: torch.Tensor, start_pos: int) -> None:
        """Keeps the rows of a computed chunk that starts at `start_pos` and lie at or after
        the next uncaptured position (recomputation after preemption is not kept twice)."""
        first = self.hidden_start + self.num_hidden_rows
        skip = max(0, first - start_pos)
        if skip < rows.shape[0]:
            if start_pos + skip != first:
                raise AssertionError("hidden-state capture skipped positions")
            self.hidden_parts.append(rows[skip:])
            self.num_hidden_rows += rows.shape[0] - skip

    def trim_hidden(self, num_positions: int) -> None:
        """Forgets captured rows at positions >= num_positions (rolled-back drafts)."""
        keep = max(0, num_positions - self.hidden_start)
        if keep < self.num_hidden_rows:
            states = self.hidden_states
            assert states is not None
            self.hidden_parts = [states[:keep]] if keep else []
            self.num_hidden_rows = keep

    @property
    def cacheable_len(self) -> int:
        """How many leading tokens may come from the prefix cache: a capturing sequence must
        compute every position it returns hidden states for."""
        if self.hidden_layers is None:
            return self.num_tokens
        return min(self.num_tokens, self.hidden_start + self.num_hidden_rows + 1)

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
            hidden_layers=self.hidden_layers,
            hidden_start=self.hidden_start,
            hidden_parts=list(self.hidden_parts),
            num_hidden_rows=self.num_hidden_rows,
            constraint=self.constraint.fork() if self.constraint is not None else None,
        )
