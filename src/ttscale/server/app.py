"""The OpenAI-compatible HTTP API over one LLM: `create_app(llm, ServerConfig(...))`.

Request path: validate (400 naming the field) -> tokenize -> `EngineLoop.submit` (429 when the
waiting queue is full) -> `request_deltas`, the one async generator per request that turns
engine outputs into per-choice deltas. Streaming replies format each delta as an SSE chunk;
non-streaming replies consume the same generator and join the deltas.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ttscale.errors import PromptTooLongError
from ttscale.llm import LLM
from ttscale.sampling.params import SamplingParams, SamplingParamsError
from ttscale.server.engine_loop import EngineFailure, EngineLoop, QueueFullError, RequestHandle
from ttscale.server.metrics import ServerMetrics
from ttscale.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceDelta,
    ChoiceResult,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Formatter,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    StepDelta,
    TokenTexts,
    TTScaleOptions,
    UsageInfo,
    error_body,
)


@dataclass(frozen=True)
class ServerConfig:
    model_names: tuple[str, ...] = ("ttscale",)  # first: the id replies report
    api_key: str | None = None  # None: no authentication
    max_waiting: int = 256  # accepted requests not yet running; beyond: 429
    max_n: int = 64
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if not self.model_names:
            raise ValueError("model_names must not be empty")
        if self.max_waiting < 1 or self.max_n < 1:
            raise ValueError("max_waiting and max_n must be >= 1")


def model_names(source: str, served_name: str | None = None) -> tuple[str, ...]:
    """Names clients may use: the served name if given, then the path's basename (and stem)."""
    path = Path(source)
    names = [served_name] if served_name else []
    names += [path.name, path.stem]
    return tuple(dict.fromkeys(n for n in names if n))


class APIError(Exception):
    """An error reply in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code, self.headers = type, code, headers

    def response(self) -> JSONResponse:
        body = error_body(self.message, self.type, self.param, self.code)
        return JSONResponse(body, self.status, headers=self.headers)


def _engine_error(e: EngineFailure) -> APIError:
    kind = "invalid_request_error" if e.status < 500 else "server_error"
    return APIError(e.status, e.message, type=kind)


# ---- request -> engine input -----------------------------------------------------------


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


def _job(kind, body, text, ids, params, config: ServerConfig) -> Job:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    model = body.model or config.model_names[0]
    return Job(kind, text, ids, params, bool(body.stream), include_usage, model)


# ---- the per-request delta generator ----------------------------------------------------


async def request_deltas(handle: RequestHandle) -> AsyncIterator[StepDelta]:
    """THE generator of a request: engine outputs -> per-choice deltas, in order.

    Raises EngineFailure if the engine fails the request; closing it early aborts the request.
    """
    sent: dict[int, int] = {}  # tokens already reported, per choice
    ended: set[int] = set()
    async for out in handle.outputs():
        choices = []
        for o in sorted(out.outputs, key=lambda o: o.index):
            start = sent.get(o.index, 0)
            sent[o.index] = len(o.token_ids)
            finish = None
            if o.finish_reason is not None and o.index not in ended:
                ended.add(o.index)
                finish = "length" if o.finish_reason == "length" else "stop"
            if start == len(o.token_ids) and not o.text_delta and finish is None:
                continue
            choices.append(
                ChoiceDelta(
                    index=o.index,
                    text=o.text_delta,
                    token_ids=o.token_ids[start:],
                    logprobs=o.logprobs[start:] if o.logprobs is not None else None,
                    top_logprobs=o.top_logprobs[start:] if o.top_logprobs is not None else None,
                    finish_reason=finish,
                )
            )
        u = out.usage
        usage = UsageInfo(
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.generated_tokens,
            total_tokens=u.prompt_tokens + u.generated_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=u.cached_prompt_tokens),
        )
        yield StepDelta(choices, usage)


async def collect(deltas: AsyncIterator[StepDelta], n: int) -> tuple[list[ChoiceResult], UsageInfo]:
    choices = [ChoiceResult(i) for i in range(n)]
    usage = None
    async for step in deltas:
        for d in step.choices:
            choices[d.index].add(d)
        usage = step.usage
    if usage is None:  # the engine reports every request at least once when it finishes
        raise EngineFailure(500, "the request ended without output")
    return choices, usage


def _sse(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


async def sse_stream(
    deltas: AsyncIterator[StepDelta], fmt: Formatter, include_usage: bool
) -> AsyncIterator[bytes]:
    for chunk in fmt.first_chunks():
        yield _sse(chunk)
    usage = None
    try:
        async for step in deltas:
            for d in step.choices:
                yield _sse(fmt.chunk(d))
            usage = step.usage
    except EngineFailure as e:
        # Headers are gone already: report the failure in-band, as OpenAI does.
        err = _engine_error(e)
        yield _sse(json.dumps(error_body(err.message, err.type, code=str(e.status))))
    else:
        if include_usage and usage is not None:
            yield _sse(fmt.usage_chunk(usage))
    yield b"data: [DONE]\n\n"


class AbortingStreamingResponse(StreamingResponse):
    """Aborts the request however the response ends: a client that disconnects mid-stream
    frees its KV blocks at once, even if the body generator never started."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---- test-time-scaling hook --------------------------------------------------------------


async def run_strategy_request(
    app: FastAPI, job: Job, options: TTScaleOptions, request: Request
) -> Response:
    """TTS extension: `"ttscale": {"strategy": "majority@16", "scorer": "logprob"}`.

    The strategy runs as a job on the engine thread (its branches batch with other requests).
    The reply is an ordinary completion whose message is the chosen answer's text, plus a
    `ttscale` field with the candidates, votes / scores and the run's cost. Streaming is not
    offered: the answer is known only when the search ends.
    """
    from ttscale.scorers import load_scorer
    from ttscale.strategies import Query, Session, make_strategy
    from ttscale.tasks.answers import extract_answer

    if job.stream:
        raise APIError(400, "stream is not supported with a ttscale strategy", param="stream")
    extras = options.model_extra or {}
    try:
        strategy = make_strategy(options.strategy)
    except ValueError as e:
        raise APIError(400, str(e), param="ttscale.strategy") from None
    scorer = None
    if strategy.needs_scorer:
        spec = extras.get("scorer", "logprob")
        if spec not in ("logprob", "judge"):  # no loading of arbitrary files from requests
            raise APIError(400, "ttscale.scorer must be logprob or judge", "ttscale.scorer")
        scorer = load_scorer(spec)
    llm = app.state.llm
    question = job.prompt or llm.tokenizer.decode(job.token_ids)
    query = Query(
        question=question,
        prompt_token_ids=job.token_ids,
        extract=extract_answer,
        params=dataclasses.replace(job.params, n=1),
        scorer=scorer,
    )

    def solve():
        session = Session(llm.engine, job.token_ids, tag="tts")
        try:
            return (yield from strategy.solve(session, query))
        finally:
            session.close()  # frees every branch even if the strategy failed

    try:
        result = await asyncio.wrap_future(app.state.engine_loop.run_job(solve()))
    except EngineFailure as e:
        raise APIError(e.status, str(e), type="server_error") from None
    return JSONResponse(_strategy_reply(job, result))


def _strategy_reply(job: Job, result) -> dict[str, Any]:
    stats = result.stats
    body: dict[str, Any] = {
        "id": f"{'chatcmpl' if job.kind == 'chat' else 'cmpl'}-tts-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion" if job.kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": job.model,
        "usage": {
            "prompt_tokens": len(job.token_ids),
            "completion_tokens": stats.generated_tokens,
            "total_tokens": len(job.token_ids) + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_prompt_tokens},
        },
        "ttscale": {
            "strategy": result.strategy,
            "answer": result.answer,
            "votes": result.votes,
            "candidates": [dataclasses.asdict(c) for c in result.candidates],
            "cost": dataclasses.asdict(stats),
            "extra": {k: v for k, v in result.extra.items() if isinstance(v, (int, float, list))},
        },
    }
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
    if job.kind == "chat":
        choice["message"] = {"role": "assistant", "content": result.text}
    else:
        choice["text"] = result.text
    body["choices"] = [choice]
    return body


# ---- authentication ------------------------------------------------------------------------


class APIKeyMiddleware:
    """`Authorization: Bearer <key>` on every path but /health (plain ASGI, so it runs
    before body parsing and leaves streaming untouched)."""

    OPEN_PATHS = frozenset({"/health"})

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                reply = APIError(
                    401,
                    "missing or invalid API key: send 'Authorization: Bearer <key>'",
                    type="authentication_error",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await reply.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- the app ---------------------------------------------------------------------------------

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse}
    for code in (400, 401, 429, 500, 501)  # documented so clients and schemathesis know them
}


def create_app(llm: LLM, config: ServerConfig) -> FastAPI:
    metrics = ServerMetrics()
    engine_loop = EngineLoop(llm.engine, metrics, config.max_waiting)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine_loop.start()
        yield
        await asyncio.to_thread(engine_loop.stop)

    app = FastAPI(title="ttscale", version="0.1.0", lifespan=lifespan)
    app.state.llm = llm
    app.state.config = config
    app.state.engine_loop = engine_loop
    app.state.metrics = metrics
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)

    token_text = TokenTexts(llm.tokenizer)

    # -- errors: always OpenAI's shape, never a 500 for a client mistake
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [p for p in first.get("loc", ()) if p != "body"]
        param = loc[0] if loc and isinstance(loc[0], str) else None
        where = ".".join(str(p) for p in loc)
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
        else:
            message = f"{where + ': ' if where else ''}{first.get('msg', 'invalid request')}"
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return APIError(e.status_code, str(e.detail), type=kind, headers=e.headers).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(e).__name__}", type="server_error").response()

    # -- endpoints
    def check_model(name: str | None) -> None:
        if name is not None and name not in config.model_names:
            raise APIError(
                400,
                f"model {name!r} is not served here; available: {', '.join(config.model_names)}",
                param="model",
                code="model_not_found",
            )

    async def serve(job: Job, request: Request) -> Response:
        try:
            handle = engine_loop.submit(job.token_ids, job.params, job.prompt)
        except QueueFullError:
            metrics.requests_rejected.inc()
            raise APIError(
                429,
                "too many requests waiting; retry later",
                type="rate_limit_error",
                headers={"Retry-After": str(config.retry_after_s)},
            ) from None
        except EngineFailure as e:
            raise _engine_error(e) from None
        fmt = Formatter(job.kind, job.model, job.params.n, token_text)
        deltas = request_deltas(handle)
        if job.stream:
            return AbortingStreamingResponse(
                sse_stream(deltas, fmt, job.include_usage), on_close=handle.abort
            )
        # Non-streaming: also watch the connection, so a client that gives up frees its KV.
        work = asyncio.ensure_future(collect(deltas, job.params.n))
        gone = asyncio.ensure_future(_until_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            finished = work.done()
            if not finished:
                work.cancel()
            handle.abort()
        if not finished:
            return Response(status_code=499)  # the client left; nobody reads this
        try:
            choices, usage = work.result()
        except EngineFailure as e:
            raise _engine_error(e) from None
        return JSONResponse(fmt.response(choices, usage))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=n, created=created) for n in config.model_names])

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}},
    )
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        job = completion_job(body, llm, config)
        if body.ttscale is not None:
            return await run_strategy_request(app, job, body.ttscale, request)
        return await serve(job, request)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}},
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        job = chat_job(body, llm, config)
        if body.ttscale is not None:
            return await run_strategy_request(app, job, body.ttscale, request)
        return await serve(job, request)

    return app
