"""A bounded load test: 240 concurrent mixed requests against a live server on loopback.

Chat and completions, streaming and not, n from 1 to 16, 4-16 tokens each, ~10% of them
abandoned mid-stream. Every accepted request that was not abandoned must complete correctly,
and afterwards the KV pool must be full again with its integrity check passing.
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
from tests.test_server import MODEL, serve_in_thread, tiny_llm

NUM_REQUESTS = 240


@dataclass
class Spec:
    chat: bool
    stream: bool
    n: int
    max_tokens: int
    abort: bool  # close the stream after the first couple of events
    seed: int

    def body(self) -> dict:
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
            body |= {"prompt": f"Sample {self.seed} of the quick brown fox", "logprobs": 0}
        return body


def make_specs(seed: int = 0) -> list[Spec]:
    rng = random.Random(seed)
    specs = []
    for i in range(NUM_REQUESTS):
        abort = rng.random() < 0.1
        specs.append(
            Spec(
                chat=rng.random() < 0.5,
                stream=abort or rng.random() < 0.5,
                n=rng.choice([1, 1, 1, 2, 3, 4, 8, 16]),
                max_tokens=rng.randint(4, 16),
                abort=abort,
                seed=i,
            )
        )
    return specs


def token_counts(spec: Spec, choice: dict) -> int:
    lp = choice.get("logprobs") or {}
    return len(lp.get("content") or []) if spec.chat else len(lp.get("tokens") or [])


def check_choices(spec: Spec, finish: dict[int, str], tokens: dict[int, int]) -> None:
    assert sorted(finish) == list(range(spec.n)), finish
    for i in range(spec.n):
        assert finish[i] in ("stop", "length")
        assert 1 <= tokens[i] <= spec.max_tokens
        if finish[i] == "length":  # ("stop" may also land on the last allowed token)
            assert tokens[i] == spec.max_tokens


async def run_one(client: httpx.AsyncClient, spec: Spec) -> str:
    path = "/v1/chat/completions" if spec.chat else "/v1/completions"
    if not spec.stream:
        r = await client.post(path, json=spec.body())
        if r.status_code == 429:
            return "rejected"
        assert r.status_code == 200, r.text
        reply = r.json()
        finish = {c["index"]: c["finish_reason"] for c in reply["choices"]}
        assert len(reply["choices"]) == spec.n
        tokens = {c["index"]: token_counts(spec, c) for c in reply["choices"]}
        check_choices(spec, finish, tokens)
        assert reply["usage"]["completion_tokens"] == sum(tokens.values())
        return "ok"

    finish, tokens = {}, dict.fromkeys(range(spec.n), 0)
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


def test_concurrent_mixed_load(load_server):
    live = load_server
    specs = make_specs()
    assert len(specs) >= 200 and sum(s.abort for s in specs) >= 10

    async def main() -> list[str]:
        limits = httpx.Limits(max_connections=NUM_REQUESTS, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=live.url, limits=limits, timeout=60) as client:
            return await asyncio.gather(*(run_one(client, s) for s in specs))

    t0 = time.monotonic()
    outcomes = asyncio.run(main())
    elapsed = time.monotonic() - t0
    counts = {k: outcomes.count(k) for k in ("ok", "aborted", "rejected")}
    print(f"\n{NUM_REQUESTS} requests in {elapsed:.1f} s: {counts}")
    assert counts["ok"] + counts["aborted"] >= 200  # max_waiting is above the request count
    assert counts["aborted"] == sum(s.abort for s in specs)
    live.wait_pool_full(timeout=10)
    assert elapsed < 50
