"""The OpenAI wire format: request and response bodies, and engine deltas -> response objects.

Requests are validated in strict mode, so `"n": "2"` or `"temperature": true` is a 400 naming the
field rather than a silent coercion. Sampling fields are only type-checked here; their ranges
are checked by `SamplingParams` (one source of truth), whose errors the app maps back to the
field. Most fields accept `null` (some clients send every field) and then take the default.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ttscale.sampling.params import MAX_PENALTY, MAX_TEMPERATURE
from ttscale.tokenizer import Tokenizer


class _Strict(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers commonly do (clients send
    # vendor extras); everything declared is type-checked without coercion.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool | None = None


class TTScaleOptions(BaseModel):
    """Test-time-scaling extension: `extra_body={"ttscale": {"strategy": "majority@16"}}`.

    Options besides `strategy` are the strategy's own and are kept as extras.
    """

    model_config = ConfigDict(strict=True, extra="allow")
    strategy: str = Field(min_length=1, examples=["majority@16"])
    # Candidate hygiene: cut-off and looping candidates neither vote nor get selected.
    hygiene: bool = True


# Ranges are stated in the schema too (documentation, and fuzzers then reach the engine);
# SamplingParams still checks every value, so the two cannot drift into accepting bad input.
_Finite = dict(allow_inf_nan=False)


class _SamplingRequest(_Strict):
    """Fields common to both endpoints (OpenAI's plus vLLM-style extras)."""

    model: str | None = None
    n: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE, **_Finite)
    top_p: float | None = Field(None, gt=0, le=1, **_Finite)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)  # an int64 seed, as vLLM takes it
    presence_penalty: float | None = Field(None, ge=-2, le=2, **_Finite)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, **_Finite)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extras beyond OpenAI's set (vLLM names).
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1, **_Finite)
    repetition_penalty: float | None = Field(None, ge=1 / MAX_PENALTY, le=MAX_PENALTY, **_Finite)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    # ttscale extras: block top-k sparse decode attention for this request ("dense" or
    # "block_topk"; the engine must run block_topk), and its KV token budget.
    sparse_attention: str | None = None
    kv_budget: int | None = Field(None, ge=1)
    ttscale: TTScaleOptions | None = None
    # Structured outputs (`structured.py`); `Any`: each is type-checked there, by name.
    response_format: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None

    @property
    def asks_for_grammar(self) -> bool:
        """Whether a structured-output field is set (`structured.requested_grammar` reads it)."""
        fmt = self.response_format
        return (fmt is not None and fmt.get("type", "text") != "text") or any(
            getattr(self, name) is not None
            for name in (
                "structured_outputs",
                "guided_json",
                "guided_regex",
                "guided_choice",
                "guided_grammar",
            )
        )

    # Declared only to refuse it (400, see `validation.refuse_unsupported`) rather than
    # silently ignore what changes the output.
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_SamplingRequest):
    # A string, token ids, or a list of either (a batch: each prompt gets its own n choices).
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None  # only 1 (or null): the server has no server-side best-of


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None  # refused when non-empty
    tool_choice: Any = None  # refused: there are no tools
    functions: list[Any] | None = None  # refused when given (the deprecated tools)
    function_call: Any = None


class TokenizeRequest(_Strict):
    """vLLM's `POST /tokenize`: a `prompt`, or chat `messages` rendered by the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


# ---- responses ---------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    """Also the shape of each streamed chunk (`finish_reason` null until the last one)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ttscale"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: Any = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---- engine deltas -> OpenAI objects ---------------------------------------------------------


@dataclass
class ChoiceDelta:
    """What one sample gained in one engine step."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    finish_reason: str | None


@dataclass
class StepDelta:
    choices: list[ChoiceDelta]
    usage: UsageInfo


@dataclass
class EchoPrefix:
    """What one prompt puts in front of each of its choices when `echo` is set; its
    logprobs come from `echo.prompt_logprobs_job` (None for the first token)."""

    text: str
    token_ids: list[int]
    logprobs: list[float | None] | None = None
    top_logprobs: list[list[tuple[int, float]] | None] | None = None

    def prepend(self, c: ChoiceResult) -> ChoiceResult:
        logprobs = top = None
        if self.logprobs is not None and c.logprobs is not None:
            logprobs = self.logprobs + list(c.logprobs)
            top = (self.top_logprobs or []) + list(c.top_logprobs or [])
        return ChoiceResult(
            c.index,
            self.text + c.text,
            self.token_ids + c.token_ids,
            logprobs,
            top,
            c.finish_reason,
        )


@dataclass
class ChoiceResult:
    """A whole sample, joined from its deltas."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None

    def add(self, d: ChoiceDelta) -> None:
        self.text += d.text
        self.token_ids += d.token_ids
        if d.logprobs is not None:
            self.logprobs = (self.logprobs or []) + d.logprobs
        if d.top_logprobs is not None:
            self.top_logprobs = (self.top_logprobs or []) + d.top_logprobs
        self.finish_reason = d.finish_reason or self.finish_reason


class TokenTexts:
    """Text and exact bytes of single tokens, for logprobs (cached: a vocabulary is finite).

    A token may hold part of a UTF-8 character; its text then has U+FFFD where OpenAI does,
    while `bytes` are the token's true bytes, recovered through the byte-level alphabet for
    byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}
        self._bytes: dict[int, bytes] = {}
        decoder = getattr(tokenizer.hf.backend_tokenizer, "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._special = tokenizer.all_special_ids

    def __call__(self, token_id: int) -> str:
        text = self._text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._text[token_id] = text
        return text

    def bytes(self, token_id: int) -> bytes:
        raw = self._bytes.get(token_id)
        if raw is None:
            raw = self(token_id).encode()
            if self._byte_level and token_id not in self._special:
                (piece,) = self.tokenizer.convert_ids_to_tokens([token_id])
                if piece and all(c in _BYTE_OF_CHAR for c in piece):
                    raw = bytes(_BYTE_OF_CHAR[c] for c in piece)
            self._bytes[token_id] = raw
        return raw


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: printable stand-in character -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = dict.fromkeys(keep)
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c if c is not None else b): b for b, c in chars.items()}


_BYTE_OF_CHAR = _byte_level_alphabet()


class Formatter:
    """Turns deltas and results into OpenAI response objects for one request."""

    def __init__(
        self,
        kind: str,
        model: str,
        n: int,
        token_text: TokenTexts,
        echo: list[EchoPrefix] | None = None,
    ) -> None:
        self.kind, self.model, self.n = kind, model, n
        self.token_text = token_text
        self.echo = echo  # completions with echo: one prefix per prompt, n / len(echo) each
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._offsets: dict[int, int] = {}  # completions' text_offset, per choice

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "model": self.model}

    # -- logprobs
    def _chat_logprobs(self, token_ids, logprobs, top) -> ChatLogprobs | None:
        if logprobs is None:
            return None
        content = []
        for i, (tid, lp) in enumerate(zip(token_ids, logprobs, strict=False)):
            alts = [self._top(t, v) for t, v in top[i]] if top and i < len(top) else []
            content.append(TokenLogprob(**self._top(tid, lp).model_dump(), top_logprobs=alts))
        return ChatLogprobs(content=content)

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        text, raw = self.token_text(token_id), self.token_text.bytes(token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(raw))

    def _completion_logprobs(self, index, token_ids, logprobs, top) -> CompletionLogprobs | None:
        if logprobs is None:
            return None
        tokens = [self.token_text(t) for t in token_ids]
        offsets = []
        offset = self._offsets.get(index, 0)
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        self._offsets[index] = offset
        tops = None
        if top is not None:
            # OpenAI: "up to logprobs + 1" entries: the sampled token is always among them
            # (logprobs=0 gives just the sampled token), whatever the temperature.
            tops = []
            for i, row in enumerate(top):
                if row is None:  # an echoed prompt's first token: nothing predicts it
                    tops.append(None)
                    continue
                entry = {self.token_text(t): v for t, v in row}
                if i < len(tokens):
                    entry.setdefault(tokens[i], logprobs[i])
                tops.append(entry)
        return CompletionLogprobs(
            tokens=tokens, token_logprobs=list(logprobs), top_logprobs=tops, text_offset=offsets
        )

    # -- streaming
    def first_chunks(self) -> list[str]:
        if self.kind != "chat":
            return []
        return [
            ChatCompletionChunk(
                **self._head(),
                choices=[
                    ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                ],
            ).model_dump_json()
            for i in range(self.n)
        ]

    def chunk(self, d: ChoiceDelta) -> str:
        if self.kind == "chat":
            choice = ChatChunkChoice(
                index=d.index,
                delta=DeltaMessage(content=d.text)
                if d.text or d.finish_reason is None
                else DeltaMessage(),
                logprobs=self._chat_logprobs(d.token_ids, d.logprobs, d.top_logprobs),
                finish_reason=d.finish_reason,
            )
            return ChatCompletionChunk(**self._head(), choices=[choice]).model_dump_json()
        choice = CompletionChoice(
            index=d.index,
            text=d.text,
            logprobs=self._completion_logprobs(d.index, d.token_ids, d.logprobs, d.top_logprobs),
            finish_reason=d.finish_reason,
        )
        return CompletionResponse(**self._head(), choices=[choice]).model_dump_json()

    def usage_chunk(self, usage: UsageInfo) -> str:
        cls = ChatCompletionChunk if self.kind == "chat" else CompletionResponse
        return cls(**self._head(), choices=[], usage=usage).model_dump_json()

    # -- whole reply
    def response(self, choices: list[ChoiceResult], usage: UsageInfo) -> dict[str, Any]:
        if self.kind == "chat":
            reply = ChatCompletionResponse(
                **self._head(),
                choices=[
                    ChatChoice(
                        index=c.index,
                        message=AssistantMessage(content=c.text),
                        logprobs=self._chat_logprobs(c.token_ids, c.logprobs, c.top_logprobs),
                        finish_reason=c.finish_reason,
                    )
                    for c in choices
                ],
                usage=usage,
            )
        else:
            if self.echo is not None:
                per_prompt = self.n // len(self.echo)
                choices = [self.echo[c.index // per_prompt].prepend(c) for c in choices]
            reply = CompletionResponse(
                **self._head(),
                choices=[
                    CompletionChoice(
                        index=c.index,
                        text=c.text,
                        logprobs=self._completion_logprobs(
                            c.index, c.token_ids, c.logprobs, c.top_logprobs
                        ),
                        finish_reason=c.finish_reason,
                    )
                    for c in choices
                ],
                usage=usage,
            )
        return reply.model_dump(mode="json")
