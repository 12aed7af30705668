"""Calling an ASGI app in-process with a request that arrived elsewhere.

The engine replicas run our FastAPI app (`server.app.create_app`) unchanged; the router
deployment hands each one a `ForwardedRequest` and streams back the app's ASGI messages. The
request's body is sent once; after that ``receive`` waits until the caller goes away, then
answers ``http.disconnect``, which is how the app learns that a client left (it aborts the
request and frees its KV).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ForwardedRequest:
    method: str
    path: str
    query_string: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    def scope(self) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "root_path": "",
            "query_string": self.query_string,
            "headers": [(k.lower(), v) for k, v in self.headers],
            "client": ("ray-serve", 0),
            "server": ("ttscale-replica", 0),
        }


async def asgi_messages(app: Any, request: ForwardedRequest) -> AsyncIterator[dict[str, Any]]:
    """The app's ``http.response.start`` and ``http.response.body`` messages, as it sends
    them. Closing the iterator early tells the app the client disconnected."""
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    gone = asyncio.Event()
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await queue.put(message)

    task = asyncio.ensure_future(app(request.scope(), receive, send))
    task.add_done_callback(lambda _: queue.put_nowait(None))
    complete = False
    try:
        while (message := await queue.get()) is not None:
            yield message
            if message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True
                break
        if not complete and task.done() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    finally:
        gone.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(task), timeout=5.0)
            task.cancel()


__all__ = ["ForwardedRequest", "asgi_messages"]
