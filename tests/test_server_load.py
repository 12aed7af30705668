"""A bounded load test: 500 mixed requests, 64 at a time, against a live server on loopback.

Chat and completions, streaming and not, n from 1 to 16, 4-16 tokens each; among them
strategy jobs (majority@2-4), batched completions prompts, hostile bodies, and ~10% of
clients that leave (mid-stream, or before a whole reply). Every accepted request that was not
abandoned must complete correctly, none may get a 5xx or hang, and afterwards the KV pool
must be full again with its integrity check passing. Latency percentiles and the process's
RSS growth are printed (docs/SERVER.md quotes them).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

import httpx
import pytest
import torch

from tests.conftest import make_tiny_model
from tests.test_server import CHAT, MODEL, serve_in_thread, tiny_llm

NUM_REQUESTS = 500
CONCURRENCY = 64
HOSTILE = [
    {"model": MODEL, "prompt": "Hi", "n": 10**9},
    {"model": MODEL, "prompt": "Hi", "max_tokens": 10**9},
    {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "seed": 2**64 + 5},
    {"model": MODEL, "prompt": "Hi", "ttscale": {"strategy": "majority@100000"}},
    {"model": MODEL, "prompt": "Hi", "guided_regex": "(unclosed"},
    {"model": "gpt-4", "prompt": "Hi"},
]


@dataclass
class Spec:
    chat: bool
    stream: bool
    n: int
    max_tokens: int
    abort: bool  # close the stream after the first couple of events, or leave early
    seed: int
    kind: str = "plain"  # plain | strategy | batch | hostile

    def body(self) -> dict:
        if self.kind == "hostile":
            return HOSTILE[self.seed % len(HOSTILE)]
        if self.kind == "strategy":
            return {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"Job {self.seed}: 2 + 2?"}],
                "max_tokens": self.max_tokens,
                "temperature": 1.0,
                "seed": self.seed,
                "ttscale": {"strategy": f"majority@{self.n}", "hygiene": False},
            }
        body: dict = {
            "model": MODEL,
            "n": self.n,
            "max_tokens": self.max_tokens,
            "temperature": 1.0,
            "seed": self.seed,
            "stream": self.stream,
        }
        if self.chat:
            content = f"Request {self.seed}: how do votes work?"
            body |= {"messages": [{"role": "user", "content": content}], "logprobs": True}
        else:
            prompt = f"Sample {self.seed} of the quick brown fox"
            if self.kind == "batch":
                prompt = [prompt, f"Another {self.seed}"]
            body |= {"prompt": prompt, "logprobs": 0}
        return body

    @property
    def num_choices(self) -> int:
        return 2 * self.n if self.kind == "batch" else self.n


def make_specs(seed: int = 0) -> list[Spec]:
    rng = random.Random(seed)
    specs = []
    for i in range(NUM_REQUESTS):
        kind = rng.choices(["plain", "strategy", "batch", "hostile"], [82, 6, 6, 6])[0]
        abort = kind in ("plain", "strategy") and rng.random() < 0.1
        chat = kind == "strategy" or (kind == "plain" and rng.random() < 0.5)
        specs.append(
            Spec(
                chat=chat,
                stream=kind in ("plain", "batch") and (abort or rng.random() < 0.5),
                n=rng.choice([2, 3, 4])
                if kind == "strategy"
                else rng.choice(
                    [1, 1, 1, 2, 3, 4, 8] if kind == "batch" else [1, 1, 1, 2, 3, 4, 8, 16]
                ),
                max_tokens=rng.randint(4, 16),
                abort=abort,
                seed=i,
                kind=kind,
            )
        )
    return specs


def token_counts(spec: Spec, choice: dict) -> int:
    lp = choice.get("logprobs") or {}
    return len(lp.get("content") or []) if spec.chat else len(lp.get("tokens") or [])


def check_choices(spec: Spec, finish: dict[int, str], tokens: dict[int, int]) -> None:
    assert sorted(finish) == list(range(spec.num_choices)), finish
    for i in range(spec.num_choices):
        assert finish[i] in ("stop", "length")
        assert 1 <= tokens[i] <= spec.max_tokens
        if finish[i] == "length":  # ("stop" may also land on the last allowed token)
            assert tokens[i] == spec.max_tokens


async def run_one(client: httpx.AsyncClient, spec: Spec) -> str:
    path = "/v1/chat/completions" if spec.chat else "/v1/completions"
    if spec.kind == "hostile":
        r = await client.post(path if "messages" not in spec.body() else CHAT, json=spec.body())
        assert 400 <= r.status_code < 500, r.text
        return "refused"
    if spec.abort and not spec.stream:
        try:  # leave before the whole reply: the server must notice and free the KV
            await client.post(path, json=spec.body(), timeout=0.05)
        except httpx.TimeoutException:
            return "aborted"
        return "ok"  # it was faster than the client's patience
    if not spec.stream:
        r = await client.post(path, json=spec.body())
        if r.status_code == 429:
            return "rejected"
        assert r.status_code == 200, r.text
        reply = r.json()
        if spec.kind == "strategy":
            assert len(reply["ttscale"]["candidates"]) == spec.n
            return "ok"
        finish = {c["index"]: c["finish_reason"] for c in reply["choices"]}
        assert len(reply["choices"]) == spec.num_choices
        tokens = {c["index"]: token_counts(spec, c) for c in reply["choices"]}
        check_choices(spec, finish, tokens)
        assert reply["usage"]["completion_tokens"] == sum(tokens.values())
        return "ok"

    finish, tokens = {}, dict.fromkeys(range(spec.num_choices), 0)
    events = 0
    async with client.stream("POST", path, json=spec.body()) as r:
        if r.status_code == 429:
            return "rejected"
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            events += 1
            if spec.abort and events == 2:
                return "aborted"  # leaving the block closes the connection mid-stream
            data = line[len("data: ") :]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            for c in chunk["choices"]:
                tokens[c["index"]] += token_counts(spec, c)
                if c["finish_reason"]:
                    assert c["index"] not in finish
                    finish[c["index"]] = c["finish_reason"]
    check_choices(spec, finish, tokens)
    return "ok"


@pytest.fixture(scope="module")
def load_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-load")
    make_tiny_model(path, "llama")
    threads = torch.get_num_threads()
    with serve_in_thread(tiny_llm(path, kv_cache_gb=0.05), max_n=16, max_waiting=256) as live:
        yield live
    torch.set_num_threads(threads)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_concurrent_mixed_load(load_server):
    live = load_server
    specs = make_specs()
    assert len(specs) >= 500 and sum(s.abort for s in specs) >= 30
    assert {s.kind for s in specs} == {"plain", "strategy", "batch", "hostile"}
    latencies: list[float] = []

    async def timed(client: httpx.AsyncClient, gate: asyncio.Semaphore, spec: Spec) -> str:
        async with gate:
            t0 = time.monotonic()
            outcome = await run_one(client, spec)
            if outcome == "ok":
                latencies.append(time.monotonic() - t0)
            return outcome

    async def main() -> list[str]:
        gate = asyncio.Semaphore(CONCURRENCY)
        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=live.url, limits=limits, timeout=60) as client:
            return await asyncio.gather(*(timed(client, gate, s) for s in specs))

    rss0 = rss_mb()
    t0 = time.monotonic()
    outcomes = asyncio.run(main())
    elapsed = time.monotonic() - t0
    live.wait_pool_full(timeout=10)
    growth = rss_mb() - rss0
    counts = {k: outcomes.count(k) for k in ("ok", "aborted", "rejected", "refused")}
    latencies.sort()
    p50, p95 = (latencies[int(q * (len(latencies) - 1))] for q in (0.5, 0.95))
    print(
        f"\n{NUM_REQUESTS} requests, {CONCURRENCY} at a time, in {elapsed:.1f} s: {counts}; "
        f"latency p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms; RSS +{growth:.0f} MB"
    )
    assert sum(counts.values()) == NUM_REQUESTS  # every request ended one of these ways
    assert counts["rejected"] == 0  # max_waiting is above the concurrency
    assert counts["refused"] == sum(s.kind == "hostile" for s in specs)
    assert counts["ok"] + counts["aborted"] == sum(s.kind != "hostile" for s in specs)
    assert live.engine_loop.snapshot["jobs_running"] == 0
    assert growth < 500
    assert elapsed < 60
