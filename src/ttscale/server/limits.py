"""The request-body size limit, as plain ASGI middleware: a body past `max_bytes` is refused
with 413 before it is read (by its Content-Length), or as soon as a chunked body passes it,
so a huge upload never reaches JSON parsing or the tokenizer."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ttscale.server.errors import APIError


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"the request body is larger than this server's limit of {self.max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            status = 413 if length.isdigit() else 400
            message = self._message() if status == 413 else "invalid Content-Length header"
            await APIError(status, message, code="request_too_large").response()(
                scope, receive, send
            )
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the route's body read: FastAPI re-raises HTTPExceptions,
                    # and the app's handler answers in OpenAI's error shape.
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)


__all__ = ["BodySizeLimitMiddleware"]
