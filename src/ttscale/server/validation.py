"""Request validation: an OpenAI request body -> a `Job` (token ids + SamplingParams), or an
`APIError` 400 naming the offending field, before anything reaches the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ttscale.errors import PromptTooLongError, SamplingParamsError
from ttscale.llm import LLM
from ttscale.sampling.params import SamplingParams
from ttscale.server.config import ServerConfig
from ttscale.server.errors import APIError
from ttscale.server.protocol import ChatCompletionRequest, CompletionRequest


@dataclass
class Job:
    """A validated request, ready for the engine."""

    kind: str  # "chat" | "completion"
    prompt: str | None
    token_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    model: str


_SAMPLING_FIELDS = (
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "min_tokens",
    "ignore_eos",
)


def build_params(
    body: ChatCompletionRequest | CompletionRequest,
    max_tokens: int,
    logprobs: int | None,
    api_names: dict[str, str],
    max_n: int,
) -> SamplingParams:
    """SamplingParams from the request; an impossible value becomes a 400 naming its API field."""
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    if body.n is not None and not 1 <= body.n <= max_n:
        raise APIError(400, f"n must be in [1, {max_n}], got {body.n}", param="n")
    kwargs: dict[str, Any] = {
        name: getattr(body, name) for name in _SAMPLING_FIELDS if getattr(body, name) is not None
    }
    kwargs["max_tokens"] = max_tokens
    kwargs["logprobs"] = logprobs
    if body.stop is not None:
        kwargs["stop"] = body.stop
    try:
        return SamplingParams(**kwargs)
    except SamplingParamsError as e:
        raise APIError(400, str(e), param=api_names.get(e.field, e.field)) from None


def _check_prompt(ids: list[int], llm: LLM, param: str) -> None:
    """The engine's own prompt checks, answered as a 400 before anything is streamed."""
    try:
        llm.engine.validate_prompt(ids)
    except PromptTooLongError as e:
        raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
    except ValueError as e:
        raise APIError(400, str(e), param=param) from None


def chat_job(body: ChatCompletionRequest, llm: LLM, config: ServerConfig) -> Job:
    if not body.messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    if body.tools:
        raise APIError(400, "tools are not supported", param="tools")
    tokenizer = llm.tokenizer
    if not tokenizer.has_chat_template:
        raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = tokenizer.apply_chat_template(messages)
        ids = tokenizer.encode(text, add_special_tokens=False)
    except Exception as e:  # e.g. a lone surrogate the tokenizer cannot encode
        raise APIError(400, f"cannot tokenize the messages: {e}", param="messages") from None
    _check_prompt(ids, llm, "messages")
    api_names = {"logprobs": "top_logprobs"}
    max_tokens = body.max_completion_tokens
    if max_tokens is not None:
        api_names["max_tokens"] = "max_completion_tokens"
    else:
        max_tokens = body.max_tokens
    if max_tokens is None:  # OpenAI's chat default: the rest of the context
        max_tokens = llm.engine.max_model_len - len(ids)
    logprobs = None
    if body.logprobs:
        logprobs = body.top_logprobs or 0
    elif body.top_logprobs is not None:
        raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
    params = build_params(body, max_tokens, logprobs, api_names, config.max_n)
    return _job("chat", body, text, ids, params, config)


def completion_job(body: CompletionRequest, llm: LLM, config: ServerConfig) -> Job:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise APIError(400, "only one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    if body.echo:
        raise APIError(400, "echo is not supported", param="echo")
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if isinstance(prompt, str):
        text: str | None = prompt
        try:
            ids = llm.tokenizer.encode(prompt)
        except Exception as e:  # e.g. a lone surrogate the tokenizer cannot encode
            raise APIError(400, f"cannot tokenize the prompt: {e}", param="prompt") from None
    else:
        text, ids = None, list(prompt)
    _check_prompt(ids, llm, "prompt")
    max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default
    params = build_params(body, max_tokens, body.logprobs, {}, config.max_n)
    return _job("completion", body, text, ids, params, config)


def _job(
    kind: str,
    body: ChatCompletionRequest | CompletionRequest,
    text: str | None,
    ids: list[int],
    params: SamplingParams,
    config: ServerConfig,
) -> Job:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    model = body.model or config.model_names[0]
    return Job(kind, text, ids, params, bool(body.stream), include_usage, model)


__all__ = ["Job", "build_params", "chat_job", "completion_job"]
