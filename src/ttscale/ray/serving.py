"""`ttscale serve --ray`: engine replicas behind Ray Serve, with prefix-aware routing.

Layout of the Serve application (``ttscale``):

- ``ttscale-engine-{i}`` (one deployment per replica, ``num_replicas=1``): an `EngineReplica`,
  which loads one engine and runs our whole FastAPI app (`server.app.create_app`) in-process:
  validation, OpenAI errors, streaming, strategy jobs, admission (429), API keys and metrics
  behave exactly as in `ttscale serve`.
- ``ttscale-router`` (the HTTP ingress, no CPU reserved): reads each request, picks a replica
  with `routing.PrefixRouter` and streams the replica's reply back; ``/metrics`` merges every
  replica's metrics (`prom.py`).

Why our app and not Ray Serve's LLM interface (``ray.serve.llm``): that interface serves a
vLLM engine through its own OpenAI layer, so it would drop our engine, the ``ttscale``
strategy extension, our validation and our cost accounting; wrapping our app keeps the API
whole. Why one deployment per replica instead of ``num_replicas=N``: the router must send a
prompt to the one replica that holds its prefix and ask every replica for its metrics, and
Serve's handle picks among a deployment's replicas itself.

Failures never hang a client: a replica must accept a request (its first streamed item)
within ``accept_timeout_s``; a replica that died or did not accept is marked down, and a
request that has not started answering is retried on the next replica; when none is left the
client gets a 503 naming the cause. A stream cut by a dying replica ends with an SSE error
event. Serve restarts the dead replica (health checks every few seconds).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ttscale.ray.asgi import ForwardedRequest, asgi_messages
from ttscale.ray.cluster import (
    RayClusterError,
    cause_line,
    check_cpus,
    connect,
    require_serve,
)
from ttscale.ray.prom import merge_metrics
from ttscale.ray.routing import PrefixRouter, RoutingConfig, routing_text
from ttscale.ray.worker import WorkerConfig
from ttscale.server.config import ServerConfig

log = logging.getLogger("ttscale.ray")
APP_NAME = "ttscale"
ENGINE_PREFIX = "ttscale-engine-"
# Our app answers 429 itself past --max-waiting; Serve's own per-replica cap must not queue
# requests in front of it (they would look like a replica that does not accept).
MAX_ONGOING = 100_000
METRICS_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class RayServeConfig:
    replicas: int = 2
    cpus_per_replica: float = 1.0
    host: str = "127.0.0.1"
    port: int = 8000
    address: str | None = None  # None: a local cluster
    health_check_period_s: float = 2.0
    # Serve retries a replica whose constructor raised; a model that cannot load will not
    # load on the next try either, and each try costs a model load.
    max_constructor_retry_count: int = 1
    deploy_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("--replicas must be >= 1")
        if self.cpus_per_replica <= 0:
            raise ValueError("--cpus-per-replica must be > 0")


class EngineReplica:
    """One engine and our FastAPI app around it (a Serve deployment's class)."""

    async def __init__(self, worker: WorkerConfig, server: ServerConfig, index: int) -> None:
        from ttscale.server.app import create_app

        self.index = index
        llm = await asyncio.to_thread(worker.load)
        self.app = create_app(llm, server)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # starts the engine thread

    async def handle(self, request: ForwardedRequest) -> AsyncIterator[dict[str, Any]]:
        """First an ``accepted`` item (so the router knows this replica is alive), then the
        app's ASGI messages."""
        yield {"type": "accepted", "replica": self.index}
        async for message in asgi_messages(self.app, request):
            yield message

    async def metrics(self) -> str:
        return self.app.state.metrics.render().decode()

    def check_health(self) -> None:
        """Serve calls this every few seconds; a dead engine thread makes the replica
        unhealthy, so Serve replaces it."""
        thread = getattr(self.app.state.engine_loop, "_thread", None)
        if thread is not None and not thread.is_alive():
            raise RuntimeError("the engine thread died")


def _error(status: int, message: str, retry_after: int | None = None) -> Any:
    from ttscale.server.errors import APIError

    headers = {"Retry-After": str(retry_after)} if retry_after else None
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return APIError(status, message, type=kind, headers=headers).response()


class Router:
    """The HTTP ingress: routes each request to an engine replica (a Serve deployment's
    class; ``engines`` are the replicas' deployment handles)."""

    def __init__(self, engines: list[Any], server: ServerConfig, routing: RoutingConfig) -> None:
        self.engines = engines
        self.server = server
        self.routing = routing
        self.router = PrefixRouter(len(engines), routing)
        self.outcomes: dict[tuple[int, str], int] = {}

    def _count(self, replica: int, outcome: str) -> None:
        self.outcomes[(replica, outcome)] = self.outcomes.get((replica, outcome), 0) + 1

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import PlainTextResponse

        path = request.url.path
        if request.method == "GET" and path == "/metrics":
            return PlainTextResponse(
                await self.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8"
            )
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.server.max_body_bytes:
            return _error(
                413,
                "the request body is larger than this server's limit of "
                f"{self.server.max_body_bytes} bytes",
            )
        body = await request.body()
        forwarded = ForwardedRequest(
            request.method,
            path,
            request.url.query.encode(),
            tuple((k.encode(), v.encode()) for k, v in request.headers.items()),
            body,
        )
        return await self.forward(forwarded, routing_text(path, body))

    async def _open(self, replica: int, forwarded: ForwardedRequest) -> tuple[Any, dict]:
        """The replica's reply stream and its ``http.response.start``; raises if the replica
        is dead or does not accept within ``accept_timeout_s``."""
        stream = self.engines[replica].options(stream=True).handle.remote(forwarded)
        try:
            first = await asyncio.wait_for(stream.__anext__(), self.routing.accept_timeout_s)
            if first.get("type") != "accepted":
                raise RuntimeError(f"the replica sent {first.get('type')!r} before accepting")
            start = await stream.__anext__()  # a non-streaming reply: when it is done
        except BaseException:
            stream.cancel()
            raise
        return stream, start

    async def forward(self, forwarded: ForwardedRequest, text: str) -> Any:
        from starlette.responses import StreamingResponse

        tried: list[int] = []
        causes: list[str] = []
        while len(tried) < len(self.engines):
            route = self.router.choose(text, exclude=tried)
            i = route.replica
            tried.append(i)
            self.router.started(i)
            try:
                stream, start = await self._open(i, forwarded)
            except asyncio.CancelledError:
                self.router.finished(i, text, ok=False)
                raise
            except Exception as e:  # dead, restarting or not accepting: try the next one
                self.router.finished(i, text, ok=False)
                self.router.mark_down(i)
                self._count(i, "failed")
                cause = "no answer in time" if isinstance(e, asyncio.TimeoutError) else _short(e)
                causes.append(f"replica {i}: {cause}")
                log.warning("replica %d failed a request (%s); trying another", i, cause)
                continue
            self._count(i, route.reason)
            headers = {k.decode(): v.decode() for k, v in start.get("headers", [])}
            headers["x-ttscale-replica"] = str(i)
            return StreamingResponse(
                self._body(stream, i, text, headers.get("content-type", "")),
                status_code=start["status"],
                headers=headers,
            )
        self._count(-1, "unavailable")
        return _error(
            503,
            f"no engine replica could take the request ({'; '.join(causes)}); Ray Serve is "
            "restarting the failed ones: retry shortly",
            retry_after=int(self.routing.down_s) or 1,
        )

    async def _body(
        self, stream: Any, replica: int, text: str, content_type: str
    ) -> AsyncIterator[bytes]:
        ok = False
        try:
            async for message in stream:
                if message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body"):
                        break
            ok = True
        except Exception as e:  # the replica died mid-reply: end it visibly, never hang
            self.router.mark_down(replica)
            self._count(replica, "cut")
            if content_type.startswith("text/event-stream"):
                yield (
                    b'data: {"error": {"message": "the engine replica serving this stream '
                    b"failed (" + _short(e).encode() + b'); retry the request", '
                    b'"type": "server_error", "code": 503}}\n\n'
                )
        finally:
            stream.cancel()
            self.router.finished(replica, text, ok)

    async def metrics_text(self) -> str:
        async def one(i: int) -> str | None:
            try:
                return await asyncio.wait_for(
                    self.engines[i].metrics.remote(), timeout=METRICS_TIMEOUT_S
                )
            except Exception:
                return None

        texts = await asyncio.gather(*(one(i) for i in range(len(self.engines))))
        merged = merge_metrics({str(i): t for i, t in enumerate(texts) if t is not None})
        lines = [
            "# HELP ttscale_replica_up Whether the replica answered this scrape",
            "# TYPE ttscale_replica_up gauge",
            *(
                f'ttscale_replica_up{{replica="{i}"}} {int(t is not None)}'
                for i, t in enumerate(texts)
            ),
            "# HELP ttscale_router_requests Requests routed, by replica and reason",
            "# TYPE ttscale_router_requests counter",
            *(
                f'ttscale_router_requests_total{{replica="{r}",outcome="{o}"}} {n}'
                for (r, o), n in sorted(self.outcomes.items())
            ),
            "# HELP ttscale_router_in_flight Requests in flight per replica",
            "# TYPE ttscale_router_in_flight gauge",
            *(
                f'ttscale_router_in_flight{{replica="{i}"}} {n}'
                for i, n in enumerate(self.router.in_flight)
            ),
        ]
        return merged + "\n".join(lines) + "\n"


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


def build_app(
    worker: WorkerConfig,
    server: ServerConfig,
    config: RayServeConfig,
    routing: RoutingConfig | None = None,
) -> Any:
    """The Serve application (not yet running): N engine deployments and the router."""
    serve = require_serve()
    engine = serve.deployment(EngineReplica)
    engines = [
        engine.options(
            name=f"{ENGINE_PREFIX}{i}",
            num_replicas=1,
            ray_actor_options={"num_cpus": config.cpus_per_replica},
            max_ongoing_requests=MAX_ONGOING,
            health_check_period_s=config.health_check_period_s,
            max_constructor_retry_count=config.max_constructor_retry_count,
        ).bind(worker, server, i)
        for i in range(config.replicas)
    ]
    router = serve.deployment(Router).options(
        name="ttscale-router",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=MAX_ONGOING,
    )
    return router.bind(engines, server, routing or RoutingConfig())


def deploy(
    worker: WorkerConfig,
    server: ServerConfig,
    config: RayServeConfig,
    routing: RoutingConfig | None = None,
) -> str:
    """Joins the cluster, checks it can hold the replicas, starts Serve's HTTP proxy on
    ``config.host:port`` and deploys; returns the base URL once every replica has loaded the
    model. Raises RayClusterError (replicas that do not fit, a model that does not load)."""
    serve = require_serve()
    for _ in range(2):  # before a slow start (local cluster), and once connected
        check_cpus(
            config.replicas, config.cpus_per_replica, "replicas", "--replicas", config.address
        )
        connect(config.address)
    serve.start(http_options={"host": config.host, "port": config.port})
    app = build_app(worker, server, config, routing)
    t0 = time.monotonic()
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    except RuntimeError as e:  # DEPLOY_FAILED: a replica's constructor raised
        cause = _deployment_failure(serve) or cause_line(str(e))
        serve.delete(APP_NAME)
        raise RayClusterError(
            f"an engine replica failed to start: {cause}; check --model (every node needs "
            "the file at that path) and --kv-cache-gb"
        ) from None
    log.info("deployed %d replicas in %.1f s", config.replicas, time.monotonic() - t0)
    return f"http://{config.host}:{config.port}"


def _deployment_failure(serve: Any) -> str | None:
    """The exception line of the first failed engine deployment (serve.run's own error only
    says that deploying failed)."""
    try:
        app = serve.status().applications[APP_NAME]
    except Exception:
        return None
    for name, status in app.deployments.items():
        if name.startswith(ENGINE_PREFIX) and status.message:
            return cause_line(status.message)
    return None


def shutdown() -> None:
    serve = require_serve()
    serve.delete(APP_NAME)


__all__ = [
    "APP_NAME",
    "EngineReplica",
    "RayServeConfig",
    "Router",
    "build_app",
    "deploy",
    "shutdown",
]
