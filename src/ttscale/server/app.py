"""The OpenAI-compatible HTTP API over one LLM: `create_app(llm, ServerConfig(...))`.

Request path: body size (413 past the limit; `limits.py`) -> validate and tokenize on the
tokenizer thread (400 naming the field, worst-case KV checked; `validation.py`,
`admission.py`) -> `EngineLoop.submit` (429 when the waiting queue is full) ->
`request_deltas`, the one async generator per request that turns engine outputs into
per-choice deltas (`streaming.py`). Streaming replies format each delta as an SSE chunk;
non-streaming replies consume the same generator and join the deltas. A body with a `ttscale`
field runs a strategy instead (`strategy_jobs.py`); `auth.py` checks the API key.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ttscale.llm import LLM
from ttscale.server.admission import Pool
from ttscale.server.auth import APIKeyMiddleware
from ttscale.server.config import ServerConfig
from ttscale.server.echo import prompt_logprobs_job
from ttscale.server.engine_loop import EngineFailure, EngineLoop, QueueFullError, RequestHandle
from ttscale.server.errors import APIError, engine_error, queue_full
from ttscale.server.limits import BodySizeLimitMiddleware
from ttscale.server.metrics import ServerMetrics
from ttscale.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    EchoPrefix,
    ErrorResponse,
    Formatter,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenTexts,
)
from ttscale.server.strategy_jobs import run_strategy_request
from ttscale.server.streaming import (
    AbortingStreamingResponse,
    batch_deltas,
    collect,
    sse_stream,
    until_disconnected,
)
from ttscale.server.structured import Grammars, requested_grammar
from ttscale.server.ui_routes import router as ui_router
from ttscale.server.validation import (
    Job,
    chat_job,
    completion_job,
    detokenize_body,
    tokenize_body,
)

# Documented so clients and schemathesis know them.
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 501)
}


def create_app(llm: LLM, config: ServerConfig) -> FastAPI:
    metrics = ServerMetrics()
    engine_loop = EngineLoop(llm.engine, metrics, config.max_waiting)
    pool = Pool(engine_loop.pool_blocks, engine_loop.block_size)
    engine_loop.job_kv_blocks = pool.share(config.strategy_kv_share)
    created = int(time.time())
    # One thread: HF tokenizers are not meant for concurrent calls, and one tokenizer busy
    # with a huge prompt must not stall the event loop (health checks, streams).
    tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="ttscale-tokenize")
    # Structured outputs: grammars compile on their own thread (a big schema takes a second).
    grammar_thread = ThreadPoolExecutor(1, thread_name_prefix="ttscale-grammar")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine_loop.start()
        yield
        await asyncio.to_thread(engine_loop.stop)
        tokenizer_thread.shutdown(wait=False, cancel_futures=True)
        grammar_thread.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="ttscale", version="0.1.0", lifespan=lifespan)
    app.state.llm = llm
    app.state.config = config
    app.state.engine_loop = engine_loop
    app.state.metrics = metrics
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=config.max_body_bytes)
    if config.api_key:  # added last: outermost, so the key is checked before the body
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)

    token_text = TokenTexts(llm.tokenizer)
    app.include_router(ui_router)  # the dashboard: /ui, engine stats, playground runs (SSE)
    grammars = Grammars(llm)

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
            raise APIError(  # 404, as OpenAI and vLLM answer
                404,
                f"model {name!r} is not served here; available: {', '.join(config.model_names)}",
                param="model",
                code="model_not_found",
            )

    async def off_loop(fn, *args):
        """Tokenizing and templating take seconds on a large prompt: never on the loop."""
        return await asyncio.get_running_loop().run_in_executor(tokenizer_thread, fn, *args)

    async def grammar_of(body):
        if not body.asks_for_grammar:
            return None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(grammar_thread, requested_grammar, body, grammars)

    async def echo_prefixes(job: Job) -> list[EchoPrefix]:
        """Each prompt's text, and its token logprobs when asked (a job on the engine)."""
        prefixes = []
        for p in job.prompts:
            text = p.text if p.text is not None else llm.tokenizer.decode(p.token_ids)
            prefix = EchoPrefix(text, list(p.token_ids))
            if job.params.logprobs is not None:
                gen = prompt_logprobs_job(llm.engine, p.token_ids, job.params.logprobs)
                blocks = -(-len(p.token_ids) // pool.block_size)
                try:
                    handle = engine_loop.run_job(gen, blocks)
                except QueueFullError:
                    raise queue_full(config.retry_after_s, metrics) from None
                try:
                    prefix.logprobs, prefix.top_logprobs = await asyncio.wrap_future(handle.future)
                except asyncio.CancelledError:  # the client left
                    handle.cancel()
                    raise
                except EngineFailure as e:
                    raise engine_error(e) from None
            prefixes.append(prefix)
        return prefixes

    async def serve(job: Job, request: Request) -> Response:
        echo = await echo_prefixes(job) if job.echo else None
        handles: list[RequestHandle] = []
        try:
            for p in job.prompts:
                handles.append(engine_loop.submit(p.token_ids, job.params, p.text))
        except (QueueFullError, EngineFailure) as e:
            for handle in handles:  # a batch is accepted whole or not at all
                handle.abort()
            if isinstance(e, QueueFullError):
                raise queue_full(config.retry_after_s, metrics) from None
            raise engine_error(e) from None
        num_choices = len(handles) * job.params.n
        fmt = Formatter(job.kind, job.model, num_choices, token_text, echo)
        deltas = batch_deltas(handles, job.params.n)

        def abort() -> None:
            for handle in handles:
                handle.abort()

        if job.stream:
            return AbortingStreamingResponse(
                sse_stream(deltas, fmt, job.include_usage), on_close=abort
            )
        # Non-streaming: also watch the connection, so a client that gives up frees its KV.
        work = asyncio.ensure_future(collect(deltas, num_choices))
        gone = asyncio.ensure_future(until_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            finished = work.done()
            if not finished:
                work.cancel()
            abort()
        if not finished:
            return Response(status_code=499)  # the client left; nobody reads this
        try:
            choices, usage = work.result()
        except EngineFailure as e:
            raise engine_error(e) from None
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

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERRORS)
    async def retrieve_model(model_id: str) -> ModelCard:
        check_model(model_id)
        return ModelCard(id=model_id, created=created)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        check_model(body.model)
        return await off_loop(tokenize_body, body, llm)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        check_model(body.model)
        return await off_loop(detokenize_body, body, llm)

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}},
    )
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        structured = await grammar_of(body)
        job = await off_loop(completion_job, body, llm, config, pool, structured)
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
        structured = await grammar_of(body)
        job = await off_loop(chat_job, body, llm, config, pool, structured)
        if body.ttscale is not None:
            return await run_strategy_request(app, job, body.ttscale, request)
        return await serve(job, request)

    return app


__all__ = ["create_app"]
