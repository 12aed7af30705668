"""Prometheus metrics of the server, exposed at `GET /metrics`.

Each app owns its registry (several apps in one process, as in tests, must not collide in
prometheus_client's global one). Latencies and token counts are observed by the engine thread,
where the timing is exact; engine-state gauges are set from the snapshot that thread publishes
after each iteration, so a scrape never touches the (not thread-safe) engine.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_RATE_WINDOW_S = 10.0  # tokens/s is averaged over this trailing window


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests_running = Gauge(
            "ttscale_requests_running", "Requests with sequences in the running batch", registry=r
        )
        self.requests_waiting = Gauge(
            "ttscale_requests_waiting", "Accepted requests not yet admitted to a batch", registry=r
        )
        self.kv_blocks_used = Gauge(
            "ttscale_kv_cache_blocks_used", "KV blocks referenced by sequences", registry=r
        )
        self.kv_blocks_free = Gauge(
            "ttscale_kv_cache_blocks_free", "KV blocks allocatable (incl. evictable)", registry=r
        )
        self.kv_blocks_total = Gauge("ttscale_kv_cache_blocks_total", "KV pool size", registry=r)
        self.kv_bytes_per_token = Gauge(
            "ttscale_kv_cache_bytes_per_token",
            "KV bytes one token takes, all layers, K and V, scales of a quantized format included",
            registry=r,
        )
        self.prefix_cache_hit_rate = Gauge(
            "ttscale_prefix_cache_hit_rate",
            "Prompt tokens served by the prefix cache / prompt tokens looked up",
            registry=r,
        )
        self.spec_acceptance_rate = Gauge(
            "ttscale_spec_decode_acceptance_rate",
            "Speculative decoding: draft tokens kept / proposed, since start (0: none drafted)",
            registry=r,
        )
        self.spec_tokens_per_step = Gauge(
            "ttscale_spec_decode_tokens_per_step",
            "Speculative decoding: tokens a sequence gained per step that verified drafts",
            registry=r,
        )
        self.generation_tokens = Counter(
            "ttscale_generation_tokens",
            "Tokens generated (all samples, strategy jobs' branches included)",
            registry=r,
        )
        self.prompt_tokens = Counter("ttscale_prompt_tokens", "Prompt tokens accepted", registry=r)
        self.tokens_per_second = Gauge(
            "ttscale_generation_tokens_per_second",
            f"Generated tokens per second over the last {_RATE_WINDOW_S:g} s",
            registry=r,
        )
        self.requests_finished = Counter(
            "ttscale_requests_finished", "Requests ended", ["reason"], registry=r
        )
        self.requests_rejected = Counter(
            "ttscale_requests_rejected", "Requests refused with 429 (queue full)", registry=r
        )
        self.time_to_first_token = Histogram(
            "ttscale_time_to_first_token_seconds",
            "Submission to first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "ttscale_inter_token_latency_seconds",
            "Time between successive outputs of one request",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_latency = Histogram(
            "ttscale_request_latency_seconds",
            "Submission to end of request",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "ttscale_queue_time_seconds",
            "Submission to admission into the running batch (requests) or start (jobs)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.preemptions = Counter(
            "ttscale_preemptions", "Sequences preempted (KV freed, recomputed later)", registry=r
        )
        self.jobs_running = Gauge(
            "ttscale_strategy_jobs_running", "Strategy jobs (ttscale extension) running", registry=r
        )
        self.jobs_waiting = Gauge(
            "ttscale_strategy_jobs_waiting",
            "Strategy jobs accepted, waiting for their KV reservation",
            registry=r,
        )
        self.job_kv_blocks = Gauge(
            "ttscale_strategy_jobs_kv_blocks_reserved",
            "Worst-case KV blocks reserved by running strategy jobs",
            registry=r,
        )
        self.jobs_finished = Counter(
            "ttscale_strategy_jobs_finished",
            "Strategy jobs ended (finished | error | cancelled)",
            ["outcome"],
            registry=r,
        )
        self._lock = threading.Lock()
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per engine step
        self._start = time.monotonic()

    def record_tokens(self, n: int, now: float) -> None:
        if n <= 0:
            return
        self.generation_tokens.inc(n)
        with self._lock:
            self._recent.append((now, n))

    def set_engine_state(self, snapshot: dict[str, Any]) -> None:
        self.requests_running.set(snapshot["requests_running"])
        self.requests_waiting.set(snapshot["requests_waiting"])
        self.kv_blocks_used.set(snapshot["kv_blocks_used"])
        self.kv_blocks_free.set(snapshot["kv_blocks_free"])
        self.kv_blocks_total.set(snapshot["kv_blocks_total"])
        self.kv_bytes_per_token.set(snapshot["kv_bytes_per_token"])
        self.prefix_cache_hit_rate.set(snapshot["prefix_cache_hit_rate"])
        self.spec_acceptance_rate.set(snapshot.get("spec_acceptance_rate", 0.0))
        self.spec_tokens_per_step.set(snapshot.get("spec_tokens_per_step", 1.0))
        self.jobs_running.set(snapshot["jobs_running"])
        self.jobs_waiting.set(snapshot["jobs_waiting"])
        self.job_kv_blocks.set(snapshot["job_kv_blocks_reserved"])

    def render(self) -> bytes:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - _RATE_WINDOW_S:
                self._recent.popleft()
            tokens = sum(n for _, n in self._recent)
        span = min(_RATE_WINDOW_S, max(now - self._start, 1e-3))
        self.tokens_per_second.set(tokens / span)
        return generate_latest(self.registry)
