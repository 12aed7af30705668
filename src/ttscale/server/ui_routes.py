"""The dashboard's live routes on `ttscale serve` (docs/SERVER.md, "Dashboard routes"):

- `POST /v1/ttscale/runs`: runs a playground question with a strategy as a job on the engine
  thread and streams its run events (`ttscale.tts.events`) as server-sent events;
- `GET /v1/ttscale/engine`: the engine's live state for the Engine page (sequences, KV pool
  picture, tokens/s, preemptions, cost and roofline utilisation, recent playground runs).

The pages themselves and the eval-folder API come from `ttscale.ui` (shared with the offline
`ttscale ui`). Everything that touches the engine runs on the engine thread
(`EngineLoop.call` / `run_job`): the handlers only read what it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from ttscale.server.admission import Pool, check_fits, strategy_footprint
from ttscale.server.engine_loop import EngineFailure, JobCancelled, QueueFullError
from ttscale.server.errors import APIError, queue_full
from ttscale.server.streaming import AbortingStreamingResponse
from ttscale.ui import pages_router, runs_router

_RATE_WINDOW_S = 10.0  # tokens/s is averaged over the polls of this trailing window
_RECENT_RUNS = 20
_LIVE_REQUESTS = 50  # requests listed with their cost so far (the oldest first)


class PlaygroundRun(BaseModel):
    """A question for the playground: the strategy, its scorer and the search's step rules."""

    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1, max_length=8000)
    strategy: str = Field("majority@8", min_length=1)
    scorer: Literal["logprob", "likelihood", "judge", "probe"] = "logprob"
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.7, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(0.95, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = 0
    # Step-level searches (beam, dvts, tree) cut reasoning into steps at this delimiter.
    step_delimiter: str = Field("\n\n", min_length=1, max_length=16)
    max_step_tokens: int = Field(96, ge=1)
    max_depth: int = Field(10, ge=1, le=64)
    hygiene: bool = True


def _finite(value: Any) -> Any:
    """JSON for browsers: NaN / infinity (a -inf log score, say) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def sse(kind: str, data: dict[str, Any]) -> bytes:
    body = json.dumps(_finite({"kind": kind, **data}), separators=(",", ":"))
    return f"event: {kind}\ndata: {body}\n\n".encode()


def engine_view(engine) -> dict[str, Any]:
    """The engine's state, read on the engine thread between steps."""
    refs, cached = engine.kv_block_states()
    # One character per block: . free, c cached prefix (free, reusable), u used, s shared.
    pool = "".join(
        ("s" if r > 1 else "u") if r else ("c" if c else ".")
        for r, c in zip(refs, cached, strict=True)
    )
    statuses: dict[str, int] = {}
    for seq in engine.sequences.values():
        statuses[seq.status.value] = statuses.get(seq.status.value, 0) + 1
    kv = engine.kv_stats()
    cost = engine.cost_meter.total
    live = []
    for request_id, request in list(engine.requests.items())[:_LIVE_REQUESTS]:
        prompt = len(request.prompt_token_ids)
        live.append(
            {
                "request_id": request_id,
                "sequences": len(request.sequences),
                "prompt_tokens": prompt,
                "cached_prompt_tokens": request.num_cached_prompt_tokens,
                # Of every sequence, search branches' whole paths included.
                "tokens": sum(max(0, len(s.token_ids) - prompt) for s in request.sequences),
                "peak_kv_blocks": request.peak_kv_blocks,
                **request.cost.to_dict(),
            }
        )
    return {
        "sequences": statuses,
        "requests": len(engine.requests),
        "kv": {
            "total": kv["num_blocks"],
            "block_size": kv["block_size"],
            "used": pool.count("u") + pool.count("s"),
            "shared": pool.count("s"),
            "cached": pool.count("c"),
            "free": pool.count("."),
            "prefix_hit_rate": kv["prefix_hit_rate"],
            "pool": pool,
        },
        "preemptions": kv["num_preemptions"],
        "steps": engine.stats["steps"],
        "prefill_tokens": engine.stats["prefill_tokens"],
        "decode_tokens": engine.stats["decode_tokens"],
        "cost": cost.to_dict(),
        "live_requests": live,
    }


def _rates(history: deque, now: float, prefill: int, decode: int) -> dict[str, float]:
    """Tokens/s over the polls of the last _RATE_WINDOW_S seconds."""
    history.append((now, prefill, decode))
    while len(history) > 2 and history[1][0] < now - _RATE_WINDOW_S:
        history.popleft()
    t0, p0, d0 = history[0]
    span = now - t0
    if span <= 0:
        return {"prefill_tokens_per_s": 0.0, "decode_tokens_per_s": 0.0}
    return {
        "prefill_tokens_per_s": (prefill - p0) / span,
        "decode_tokens_per_s": (decode - d0) / span,
    }


router = APIRouter(tags=["dashboard"])
router.include_router(pages_router())
router.include_router(runs_router())


@router.get("/v1/ttscale/engine")
async def engine_stats(request: Request) -> dict[str, Any]:
    """Live engine state for the Engine page (polled about once a second)."""
    state = request.app.state
    view = await asyncio.wrap_future(state.engine_loop.call(engine_view))
    history = _state(state, "ui_rate_history", lambda: deque())
    view.update(_rates(history, time.monotonic(), view["prefill_tokens"], view["decode_tokens"]))
    snapshot = state.engine_loop.snapshot
    view["requests_running"] = snapshot.get("requests_running", 0)
    view["requests_waiting"] = snapshot.get("requests_waiting", 0)
    view["jobs_running"] = snapshot.get("jobs_running", 0)
    view["jobs_waiting"] = snapshot.get("jobs_waiting", 0)
    view["model"] = state.config.model_names[0]
    view["recent_runs"] = list(_state(state, "ui_recent_runs", lambda: deque(maxlen=_RECENT_RUNS)))
    return _finite(view)


def _state(state, name: str, make):
    value = getattr(state, name, None)
    if value is None:
        value = make()
        setattr(state, name, value)
    return value


@router.post("/v1/ttscale/runs", responses={200: {"content": {"text/event-stream": {}}}, 400: {}})
async def playground_run(body: PlaygroundRun, request: Request) -> Response:
    """Runs one question with a strategy; the reply is the run's events as SSE (`event:` the
    kind, `data:` its JSON), from `run` to `done` (or `error`)."""
    from ttscale.sampling.params import SamplingParams
    from ttscale.scorers import load_scorer
    from ttscale.strategies import SearchConfig, make_strategy
    from ttscale.strategies.api import make_query
    from ttscale.tts.hygiene import Hygiene
    from ttscale.tts.session import Session
    from ttscale.tts.watch import Watch

    state = request.app.state
    llm, config, engine_loop = state.llm, state.config, state.engine_loop
    try:
        strategy = make_strategy(body.strategy)
        search = SearchConfig(body.step_delimiter, body.max_step_tokens, body.max_depth)
        params = SamplingParams(
            temperature=body.temperature,
            top_p=body.top_p,
            max_tokens=body.max_tokens,
            seed=body.seed,
        )
    except ValueError as e:
        raise APIError(400, str(e), param="strategy") from None
    scorer = None
    if strategy.needs_scorer:
        try:
            scorer = load_scorer(body.scorer, llm.source)
        except ValueError as e:  # the shipped probe is for the embedded model only
            raise APIError(400, str(e), param="scorer") from None
    # Templating and tokenizing on the engine thread: the tokenizer is not shared safely.
    try:
        query = await asyncio.wrap_future(
            engine_loop.call(
                lambda _: make_query(
                    llm,
                    body.question,
                    params=params,
                    scorer=scorer,
                    search=search,
                    hygiene=Hygiene(enabled=body.hygiene),
                )
            )
        )
    except ValueError as e:
        raise APIError(400, str(e), param="question") from None
    prompt_len, max_len = len(query.prompt_token_ids), llm.engine.max_model_len
    if prompt_len + body.max_tokens > max_len:
        raise APIError(
            400,
            f"max_tokens {body.max_tokens} + the prompt's {prompt_len} tokens exceed the "
            f"context of {max_len}",
            param="max_tokens",
        )
    pool = Pool(engine_loop.pool_blocks, engine_loop.block_size)
    try:
        fp = strategy_footprint(
            body.strategy, prompt_len, body.max_tokens, max_len, config.max_n, search
        )
    except APIError as e:  # it names the extension's field; here the field is `strategy`
        raise APIError(400, e.message, param="strategy") from None
    blocks = check_fits(
        fp, pool.share(config.strategy_kv_share), pool.block_size, "this strategy", "strategy"
    )

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def emit(event) -> None:  # engine thread
        loop.call_soon_threadsafe(queue.put_nowait, event.to_dict())

    def job():
        watch = Watch(emit, llm.engine.held_blocks)
        session = Session(llm.engine, query.prompt_token_ids, tag="ui", observer=watch)
        try:
            return (yield from watch.run(strategy.solve(session, query)))
        finally:
            session.close()  # frees every branch even if the strategy failed or was cancelled

    try:
        handle = engine_loop.run_job(job(), blocks)
    except QueueFullError:
        raise queue_full(config.retry_after_s, state.metrics) from None
    except EngineFailure as e:
        raise APIError(e.status, str(e), type="server_error") from None

    def ended(_) -> None:  # engine thread; after the job's last event
        with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown)
            loop.call_soon_threadsafe(queue.put_nowait, None)

    handle.future.add_done_callback(ended)
    started = time.monotonic()
    header = {
        "question": body.question,
        "strategy": body.strategy,
        "scorer": body.scorer if strategy.needs_scorer else None,
        "prompt_tokens": prompt_len,
        "block_size": pool.block_size,
        "max_tokens": body.max_tokens,
    }

    async def stream() -> AsyncIterator[bytes]:
        yield sse("run", header)
        while (event := await queue.get()) is not None:
            yield sse(event["kind"], event)
        try:
            result = handle.future.result()
        except JobCancelled:
            return
        except EngineFailure as e:
            yield sse("error", {"message": str(e)})
            return
        except Exception as e:  # the strategy failed: say why, the session is released
            yield sse("error", {"message": f"{type(e).__name__}: {e}"})
            return
        seconds = time.monotonic() - started
        stats = result.stats
        recent = _state(state, "ui_recent_runs", lambda: deque(maxlen=_RECENT_RUNS))
        utilization = (
            stats.roofline_time / stats.measured_time
            if stats.roofline_time and stats.measured_time
            else None
        )
        recent.appendleft(
            {
                "strategy": body.strategy,
                "question": body.question[:80],
                "answer": result.answer,
                "seconds": seconds,
                "tokens": stats.generated_tokens,
                "flops": stats.flops,
                "bytes": stats.bytes,
                "utilization": utilization,
            }
        )
        yield sse("done", {"answer": result.answer, "text": result.text, "seconds": seconds})

    return AbortingStreamingResponse(stream(), on_close=handle.cancel)


__all__ = ["PlaygroundRun", "engine_view", "router", "sse"]
