"""API-key authentication, as plain ASGI middleware."""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from ttscale.server.errors import APIError


class APIKeyMiddleware:
    """`Authorization: Bearer <key>` on every path but /health (plain ASGI, so it runs
    before body parsing and leaves streaming untouched)."""

    # The dashboard's static files hold no data: the page asks for the key and sends it with
    # every API call it makes (docs/UI.md).
    OPEN_PATHS = frozenset({"/health", "/ui", "/ui/app.js", "/ui/style.css"})

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    def _valid(self, header: bytes) -> bool:
        # The scheme is case-insensitive (RFC 9110 section 11.1); the key is not.
        scheme, _, token = header.strip().partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] not in self.OPEN_PATHS
            and not self._valid(dict(scope["headers"]).get(b"authorization", b""))
        ):
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


__all__ = ["APIKeyMiddleware"]
