"""`APIError`: every error reply the server sends, in OpenAI's shape."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from ttscale.server.engine_loop import EngineFailure
from ttscale.server.metrics import ServerMetrics
from ttscale.server.protocol import error_body


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


def engine_error(e: EngineFailure) -> APIError:
    """The reply for a request the engine failed: a client mistake (< 500) or a server error."""
    kind = "invalid_request_error" if e.status < 500 else "server_error"
    return APIError(e.status, e.message, type=kind)


def queue_full(retry_after_s: int, metrics: ServerMetrics | None) -> APIError:
    """429: the waiting queue (requests and strategy jobs together) is full."""
    if metrics is not None:
        metrics.requests_rejected.inc()
    return APIError(
        429,
        "too many requests waiting; retry later",
        type="rate_limit_error",
        headers={"Retry-After": str(retry_after_s)},
    )


__all__ = ["APIError", "engine_error", "queue_full"]
