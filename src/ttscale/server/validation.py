"""Request validation: an OpenAI request body -> a `Job` (token ids + SamplingParams), or an
`APIError` 400 naming the offending field, before anything reaches the engine.

`chat_job` and `completion_job` tokenize (an 8 MB prompt takes seconds), so the app runs them
off the event loop, on its tokenizer thread.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from ttscale.errors import PromptTooLongError, SamplingParamsError
from ttscale.llm import LLM
from ttscale.sampling.params import SamplingParams
from ttscale.server.admission import Footprint, Pool, check_fits, max_gen_that_fits
from ttscale.server.config import ServerConfig
from ttscale.server.errors import APIError
from ttscale.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from ttscale.server.structured import Structured
from ttscale.tokenizer import Tokenizer


@dataclass
class Prompt:
    text: str | None  # None when the client sent token ids
    token_ids: list[int]


@dataclass
class Job:
    """A validated request, ready for the engine: each prompt gets `params.n` choices."""

    kind: str  # "chat" | "completion"
    prompts: list[Prompt]
    params: SamplingParams
    stream: bool
    include_usage: bool
    model: str
    # True when the client left max_tokens unset (chat): a strategy may then shrink it to
    # what its samples can hold, as a plain request's default is shrunk to its n samples.
    default_max_tokens: bool = False
    echo: bool = False  # completions: each choice starts with its prompt (and its logprobs)
    # The request field that asked for a grammar (params.constraint), if any.
    structured_field: str | None = None


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
    "sparse_attention",
    "kv_budget",
)

# Fields that would change the output and that the server does not implement: a 400 naming
# the field beats a 200 whose text silently ignores them (a JSON mode returning prose).
_UNSUPPORTED = (
    "logit_bias",
    "functions",
    "function_call",
    "suffix",
)


# Stop strings are searched in the text after every token: bound their number and length
# (OpenAI allows 4; lm-eval sends a handful).
MAX_STOP_STRINGS = 32
MAX_STOP_CHARS = 512


def refuse_unsupported(body: ChatCompletionRequest | CompletionRequest) -> None:
    for name in _UNSUPPORTED:
        if getattr(body, name, None) not in (None, [], {}, ""):
            raise APIError(400, f"{name} is not supported by this server", param=name)
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream=true", "stream_options")
    if isinstance(body, CompletionRequest):
        if body.best_of not in (None, 1):
            raise APIError(400, "best_of other than 1 is not supported", param="best_of")
    else:
        if body.tools:
            raise APIError(400, "tools are not supported", param="tools")
        if body.tool_choice is not None:
            raise APIError(400, "tool_choice is only allowed with tools", param="tool_choice")


def build_params(
    body: ChatCompletionRequest | CompletionRequest,
    max_tokens: int,
    logprobs: int | None,
    api_names: dict[str, str],
    max_n: int,
    structured: Structured | None,
) -> SamplingParams:
    """SamplingParams from the request (with its compiled grammar, if any); an impossible
    value becomes a 400 naming its API field."""
    if body.n is not None and not 1 <= body.n <= max_n:
        raise APIError(400, f"n must be in [1, {max_n}], got {body.n}", param="n")
    kwargs: dict[str, Any] = {
        name: getattr(body, name) for name in _SAMPLING_FIELDS if getattr(body, name) is not None
    }
    kwargs["max_tokens"] = max_tokens
    kwargs["logprobs"] = logprobs
    if body.stop is not None:
        stops = [body.stop] if isinstance(body.stop, str) else body.stop
        if len(stops) > MAX_STOP_STRINGS or any(len(x) > MAX_STOP_CHARS for x in stops):
            raise APIError(
                400,
                f"stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} "
                "characters each",
                param="stop",
            )
        kwargs["stop"] = body.stop
    if structured is not None:
        kwargs["constraint"] = structured.grammar
    try:
        return SamplingParams(**kwargs)
    except SamplingParamsError as e:
        raise APIError(400, str(e), param=api_names.get(e.field, e.field)) from None


@functools.cache
def _longest_token_chars(tokenizer: Tokenizer) -> int:
    return max((len(t) for t in tokenizer.hf.get_vocab()), default=1)


def _check_text_fits(text: str, llm: LLM, param: str) -> None:
    """Refuses, before tokenizing it (seconds for megabytes), a text that cannot fit the
    context. A token's vocabulary string is at least as long as the text it stands for
    (byte-level pieces are bytes, SentencePiece's are characters), so a text needs at least
    len(text) / longest-piece tokens; the factor 2 leaves room for normalizers that shrink
    text (NFKC)."""
    limit = 2 * llm.engine.max_model_len * _longest_token_chars(llm.tokenizer)
    if len(text) > limit:
        raise APIError(
            400,
            f"the prompt has {len(text)} characters, more than this model's context of "
            f"{llm.engine.max_model_len} tokens can hold",
            param=param,
            code="context_length_exceeded",
        )


def _check_prompt(ids: list[int], llm: LLM, param: str) -> None:
    """The engine's own prompt checks, answered as a 400 before anything is streamed."""
    try:
        llm.engine.validate_prompt(ids)
    except PromptTooLongError as e:
        raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
    except ValueError as e:
        raise APIError(400, str(e), param=param) from None


def _check_attention(params: SamplingParams, llm: LLM) -> None:
    """The engine's checks of the request's sparse attention settings, as a 400."""
    try:
        llm.engine.validate_params(params)
    except ValueError as e:
        param = "kv_budget" if str(e).startswith("kv_budget") else "sparse_attention"
        raise APIError(400, str(e), param=param) from None


def _check_max_tokens(prompt_len: int, max_tokens: int, llm: LLM, param: str) -> None:
    room = llm.engine.max_model_len - prompt_len
    if max_tokens > room:
        raise APIError(
            400,
            f"{param}={max_tokens} is too large: this model's context holds "
            f"{llm.engine.max_model_len} tokens and the prompt has {prompt_len}, so at most "
            f"{room} tokens can be generated",
            param=param,
            code="context_length_exceeded",
        )


def _check_kv(job: Job, pool: Pool, strategy: bool) -> None:
    """Each prompt's n samples must fit the pool together (strategies: `strategy_jobs`)."""
    if strategy:
        return
    for p in job.prompts:
        fp = Footprint(len(p.token_ids), job.params.n, job.params.max_tokens)
        check_fits(fp, pool.num_blocks, pool.block_size, "this request", param="n")


def chat_job(
    body: ChatCompletionRequest,
    llm: LLM,
    config: ServerConfig,
    pool: Pool,
    structured: Structured | None = None,
) -> Job:
    refuse_unsupported(body)
    if not body.messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    tokenizer = llm.tokenizer
    if not tokenizer.has_chat_template:
        raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = tokenizer.apply_chat_template(messages)
        _check_text_fits(text, llm, "messages")
        ids = tokenizer.encode(text, add_special_tokens=False)
    except APIError:
        raise
    except Exception as e:  # e.g. a lone surrogate the tokenizer cannot encode
        raise APIError(400, f"cannot tokenize the messages: {e}", param="messages") from None
    _check_prompt(ids, llm, "messages")
    api_names = {"logprobs": "top_logprobs"}
    max_tokens = body.max_completion_tokens
    param = "max_tokens"
    if max_tokens is not None:
        api_names["max_tokens"] = param = "max_completion_tokens"
    else:
        max_tokens = body.max_tokens
    default = max_tokens is None
    if max_tokens is None:
        # OpenAI's chat default is the rest of the context; here it is also no more than
        # the n samples can hold in the pool together (a default must never be refused).
        n = (body.n or 1) if body.ttscale is None else 1
        fits = max_gen_that_fits(len(ids), n, pool.num_blocks, pool.block_size)
        max_tokens = max(1, min(llm.engine.max_model_len - len(ids), fits))
    _check_max_tokens(len(ids), max_tokens, llm, param)
    logprobs = None
    if body.logprobs:
        logprobs = body.top_logprobs or 0
    elif body.top_logprobs is not None:
        raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
    params = build_params(body, max_tokens, logprobs, api_names, config.max_n, structured)
    _check_attention(params, llm)
    job = _job("chat", body, [Prompt(text, ids)], params, config, default)
    job.structured_field = structured.field if structured else None
    _check_kv(job, pool, body.ttscale is not None)
    return job


def _completion_prompts(body: CompletionRequest, llm: LLM, max_prompts: int) -> list[Prompt]:
    raw = body.prompt
    batched = isinstance(raw, list) and raw and isinstance(raw[0], str | list)
    batch: list[Any] = raw if batched else [raw]  # type: ignore[assignment]
    if len(batch) > max_prompts:
        raise APIError(
            400, f"at most {max_prompts} prompts per request, got {len(batch)}", param="prompt"
        )
    prompts = []
    for item in batch:
        if isinstance(item, str):
            _check_text_fits(item, llm, "prompt")
            try:
                ids = llm.tokenizer.encode(item)
            except Exception as e:  # e.g. a lone surrogate the tokenizer cannot encode
                raise APIError(400, f"cannot tokenize the prompt: {e}", param="prompt") from None
            prompts.append(Prompt(item, ids))
        else:
            prompts.append(Prompt(None, list(item)))
        _check_prompt(prompts[-1].token_ids, llm, "prompt")
    return prompts


def completion_job(
    body: CompletionRequest,
    llm: LLM,
    config: ServerConfig,
    pool: Pool,
    structured: Structured | None = None,
) -> Job:
    refuse_unsupported(body)
    if body.echo and (body.stream or body.ttscale is not None):
        raise APIError(400, "echo is not supported with stream or ttscale", param="echo")
    prompts = _completion_prompts(body, llm, config.max_prompts)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default
    for p in prompts:
        _check_max_tokens(len(p.token_ids), max_tokens, llm, "max_tokens")
    params = build_params(body, max_tokens, body.logprobs, {}, config.max_n, structured)
    _check_attention(params, llm)
    if len(prompts) * params.n > config.max_n:
        raise APIError(
            400,
            f"{len(prompts)} prompts x n={params.n} exceeds this server's limit of "
            f"{config.max_n} choices per request",
            param="n",
        )
    job = _job("completion", body, prompts, params, config)
    job.echo = bool(body.echo)
    job.structured_field = structured.field if structured else None
    _check_kv(job, pool, body.ttscale is not None)
    return job


def tokenize_body(body: TokenizeRequest, llm: LLM) -> TokenizeResponse:
    """vLLM's /tokenize: a prompt (special tokens added by default), or messages through the
    chat template (which holds its special tokens already)."""
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", param="prompt")
    tokenizer = llm.tokenizer
    try:
        if body.messages is not None:
            if not body.messages:
                raise APIError(400, "messages must be a non-empty list", param="messages")
            if not tokenizer.has_chat_template:
                raise APIError(400, "this model has no chat template", param="messages")
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            text = tokenizer.apply_chat_template(messages, body.add_generation_prompt)
            special = bool(body.add_special_tokens)
        else:
            text = body.prompt or ""
            special = body.add_special_tokens is not False
        ids = tokenizer.encode(text, add_special_tokens=special)
    except APIError:
        raise
    except Exception as e:  # e.g. a lone surrogate the tokenizer cannot encode
        param = "messages" if body.messages is not None else "prompt"
        raise APIError(400, f"cannot tokenize: {e}", param=param) from None
    strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(
        count=len(ids), max_model_len=llm.engine.max_model_len, tokens=ids, token_strs=strs
    )


def detokenize_body(body: DetokenizeRequest, llm: LLM) -> DetokenizeResponse:
    vocab = llm.engine.model_config.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
    return DetokenizeResponse(prompt=llm.tokenizer.decode(body.tokens))


def _job(
    kind: str,
    body: ChatCompletionRequest | CompletionRequest,
    prompts: list[Prompt],
    params: SamplingParams,
    config: ServerConfig,
    default_max_tokens: bool = False,
) -> Job:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    model = body.model or config.model_names[0]
    return Job(kind, prompts, params, bool(body.stream), include_usage, model, default_max_tokens)


__all__ = [
    "Job",
    "Prompt",
    "build_params",
    "chat_job",
    "completion_job",
    "detokenize_body",
    "refuse_unsupported",
    "tokenize_body",
]
