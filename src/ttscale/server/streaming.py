"""From engine outputs to replies: `request_deltas`, the one async generator per request, and
the two ways a reply is built from it (SSE chunks, or the deltas joined)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable, Sequence

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ttscale.server.engine_loop import EngineFailure, RequestHandle
from ttscale.server.errors import engine_error
from ttscale.server.protocol import (
    ChoiceDelta,
    ChoiceResult,
    Formatter,
    PromptTokensDetails,
    StepDelta,
    UsageInfo,
    error_body,
)


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


def _sum_usage(usages: Sequence[UsageInfo | None]) -> UsageInfo:
    seen = [u for u in usages if u is not None]
    prompt = sum(u.prompt_tokens for u in seen)
    completion = sum(u.completion_tokens for u in seen)
    cached = sum(u.prompt_tokens_details.cached_tokens for u in seen)
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


async def batch_deltas(handles: Sequence[RequestHandle], n: int) -> AsyncIterator[StepDelta]:
    """Deltas of several requests (a batched completions prompt) as one stream: prompt i's
    sample j is choice i * n + j (OpenAI's order); usage sums the prompts'. Raises the
    first EngineFailure; closing it early aborts every request."""
    if len(handles) == 1:
        async for step in request_deltas(handles[0]):
            yield step
        return
    queue: asyncio.Queue[tuple[int, StepDelta | EngineFailure | None]] = asyncio.Queue()

    async def pump(i: int, handle: RequestHandle) -> None:
        try:
            async for step in request_deltas(handle):
                queue.put_nowait((i, step))
        except EngineFailure as e:
            queue.put_nowait((i, e))
        else:
            queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    usages: list[UsageInfo | None] = [None] * len(handles)
    try:
        left = len(handles)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, EngineFailure):
                raise item
            else:
                usages[i] = item.usage
                choices = [dataclasses.replace(c, index=i * n + c.index) for c in item.choices]
                yield StepDelta(choices, _sum_usage(usages))
    finally:
        for task in tasks:
            task.cancel()
        for handle in handles:
            handle.abort()


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
        err = engine_error(e)
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


async def until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


__all__ = [
    "AbortingStreamingResponse",
    "batch_deltas",
    "collect",
    "request_deltas",
    "sse_stream",
    "until_disconnected",
]
