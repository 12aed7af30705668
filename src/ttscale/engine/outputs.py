"""What the engine returns per request (shaped like vLLM's RequestOutput)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Usage:
    prompt_tokens: int
    cached_prompt_tokens: int  # served by the prefix cache (no compute)
    computed_prompt_tokens: int  # run through the model, recomputation after preemption included
    generated_tokens: int  # over all n samples
    peak_kv_blocks: int  # blocks held by this request's sequences together, at most
    # Cost model (ttscale.cost): its share of each step's FLOPs and bytes moved; eFLOPs and
    # roofline time need a hardware profile (`ttscale calibrate`), else None.
    flops: float = 0.0
    bytes: float = 0.0
    efflops: float | None = None
    roofline_time: float | None = None
    measured_time: float = 0.0
    utilization: float | None = None  # roofline_time / measured_time
    # Speculative decoding: drafts proposed and kept over all samples; acceptance rate
    # (kept / proposed) and tokens a sample gained per step that verified drafts (None when
    # nothing was drafted for this request).
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    acceptance_rate: float | None = None
    tokens_per_step: float | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # None while running; "stop" | "length" | "abort"
    stop_reason: str | int | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    text_delta: str = ""  # new text since the previous output of this sequence (streaming)

    @property
    def cumulative_logprob(self) -> float | None:
        return sum(self.logprobs) if self.logprobs is not None else None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    usage: Usage
    metrics: dict[str, float] = field(default_factory=dict)
