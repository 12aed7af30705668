"""Load test of `ttscale serve` (issue 14): a real server process, mixed traffic, one report.

    python benchmarks/load_server.py                      # 500 requests, 64 at a time
    python benchmarks/load_server.py --requests 40 --concurrency 8 --job-n 8   # smoke test
    python benchmarks/load_server.py --model path/to/model --port 8123 --out runs/load.json

It starts `python -m ttscale.server.cli` (the embedded SmolLM2 unless `--model`), then:

1. **mixed load**: `--requests` requests, `--concurrency` at a time: chat and completions,
   n 1-8, streaming or not, batched completions prompts, structured outputs (a choice or a JSON
   schema), strategy jobs (majority@2-4), clients that leave (mid-stream, or before a whole
   reply) and hostile bodies (each must get a 4xx);
2. **small request under a big job**: the latency of 2-token requests sent one after the other
   while a `majority@{job-n}` job runs, against the same requests on the idle server.

Reported (stdout and `--out` JSON): outcomes, 5xx count, hangs (no answer within
`--timeout`), p50/p95 latency of completed requests, the server's KV blocks in use once idle
(from /metrics; 0 means everything was freed), and the server process's RSS before and after.
The lead runs it on a quiet machine; timings on a busy one are noise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer"}, "sure": {"type": "boolean"}},
    "required": ["answer", "sure"],
}
HOSTILE: list[tuple[str, dict | bytes]] = [
    (COMPLETIONS, {"prompt": "Hi", "n": 10**9}),
    (COMPLETIONS, {"prompt": "Hi", "max_tokens": 10**9}),
    (COMPLETIONS, {"prompt": "Hi", "seed": 2**64 + 5}),
    (COMPLETIONS, {"prompt": "Hi", "ttscale": {"strategy": "majority@100000"}}),
    (
        CHAT,
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            "ttscale": {"strategy": "majority@100000"},
        },
    ),
    (COMPLETIONS, {"prompt": "Hi", "stop": ["y" * 1000] * 1000}),
    (COMPLETIONS, {"prompt": "Hi", "guided_regex": "(unclosed"}),
    (COMPLETIONS, {"prompt": "Hi", "guided_grammar": "root ::= root"}),
    (COMPLETIONS, b'{"prompt": "Hi", "temperature": NaN}'),
    (COMPLETIONS, b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    (COMPLETIONS, b'{"prompt": "\xff\xfe", "max_tokens": 2}'),
    (CHAT, {"messages": [], "max_tokens": 2}),
]


@dataclass
class Spec:
    kind: str  # plain | batch | structured | strategy | hostile
    chat: bool
    stream: bool
    n: int
    max_tokens: int
    leave: bool  # the client leaves early
    seed: int

    def request(self, model: str) -> tuple[str, dict | bytes]:
        if self.kind == "hostile":
            path, body = HOSTILE[self.seed % len(HOSTILE)]
            return path, body if isinstance(body, bytes) else {"model": model, **body}
        body: dict = {"model": model, "max_tokens": self.max_tokens, "seed": self.seed}
        body |= {"temperature": 0.8, "stream": self.stream}
        if self.kind == "strategy":
            body["ttscale"] = {"strategy": f"majority@{self.n}"}
        else:
            body["n"] = self.n
        if self.kind == "structured":
            body |= {"guided_choice": ["yes", "no"]} if self.seed % 2 else {"guided_json": SCHEMA}
        question = f"Question {self.seed}: what is {self.seed % 17} + {self.seed % 5}?"
        if self.chat:
            return CHAT, body | {"messages": [{"role": "user", "content": question}]}
        prompt = [question, f"Another {self.seed}:"] if self.kind == "batch" else question
        return COMPLETIONS, body | {"prompt": prompt}


def make_specs(count: int, max_tokens: int, seed: int) -> list[Spec]:
    rng = random.Random(seed)
    specs = []
    for i in range(count):
        kind = rng.choices(
            ["plain", "batch", "structured", "strategy", "hostile"], [70, 6, 8, 6, 10]
        )[0]
        stream = kind in ("plain", "structured") and rng.random() < 0.5
        specs.append(
            Spec(
                kind=kind,
                chat=kind in ("strategy", "structured") or rng.random() < 0.5,
                stream=stream,
                n=rng.choice([2, 3, 4]) if kind == "strategy" else rng.choice([1, 1, 2, 4, 8]),
                max_tokens=rng.randint(max(2, max_tokens // 4), max_tokens),
                leave=kind in ("plain", "strategy") and rng.random() < 0.1,
                seed=i,
            )
        )
    return specs


@dataclass
class Tally:
    outcomes: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, outcome: str, detail: str = "") -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if detail and len(self.errors) < 20:
            self.errors.append(detail)


async def run_one(client: httpx.AsyncClient, spec: Spec, model: str, tally: Tally, timeout: float):
    path, body = spec.request(model)
    kwargs = {"content": body, "headers": {"Content-Type": "application/json"}}
    if isinstance(body, dict):
        kwargs = {"json": body}
    t0 = time.monotonic()
    try:
        if spec.leave and not spec.stream:
            try:  # leave before the whole reply: the server must notice and free the KV
                await client.post(path, timeout=0.1, **kwargs)
            except httpx.TimeoutException:
                return tally.add("left")
            return tally.add("ok")
        if spec.stream:
            async with client.stream("POST", path, timeout=timeout, **kwargs) as r:
                if r.status_code != 200:
                    return _status(tally, spec, r.status_code, (await r.aread())[:200])
                events = 0
                async for line in r.aiter_lines():
                    events += line.startswith("data: ")
                    if spec.leave and events == 2:
                        return tally.add("left")  # closing the stream mid-way
                    if '"error"' in line:
                        return tally.add("5xx", line[:200])
        else:
            r = await client.post(path, timeout=timeout, **kwargs)
            if r.status_code != 200:
                return _status(tally, spec, r.status_code, r.content[:200])
    except httpx.TimeoutException:
        return tally.add("hang", f"{spec}")
    except httpx.HTTPError as e:
        return tally.add("transport_error", f"{type(e).__name__}: {e}")
    tally.latencies.append(time.monotonic() - t0)
    tally.add("ok")


def _status(tally: Tally, spec: Spec, status: int, text: bytes) -> None:
    if status >= 500:
        tally.add("5xx", f"{status} {text!r}")
    elif status == 429:
        tally.add("429")
    elif spec.kind == "hostile":
        tally.add("refused")
    else:
        tally.add("unexpected_4xx", f"{status} {spec.kind} {text!r}")


async def mixed_load(url: str, model: str, specs: list[Spec], concurrency: int, timeout: float):
    tally = Tally()
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)

    async def one(client, spec):
        async with gate:
            await run_one(client, spec, model, tally, timeout)

    async with httpx.AsyncClient(base_url=url, limits=limits) as client:
        await asyncio.gather(*(one(client, s) for s in specs))
    return tally


def small_request_latency(url: str, model: str, count: int) -> list[float]:
    body = {"model": model, "prompt": "2 + 2 =", "max_tokens": 2, "temperature": 0}
    out = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for _ in range(count):
            t0 = time.monotonic()
            client.post(COMPLETIONS, json=body).raise_for_status()
            out.append(time.monotonic() - t0)
    return out


def under_big_job(url: str, model: str, job_n: int, job_tokens: int, count: int) -> dict:
    idle = small_request_latency(url, model, count)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "What is 12 + 30? End with 'Answer: <n>'."}],
        "max_tokens": job_tokens,
        "temperature": 0.8,
        "seed": 0,
        "ttscale": {"strategy": f"majority@{job_n}"},
    }
    with httpx.Client(base_url=url, timeout=600) as client:
        result: dict = {}

        def job():
            t0 = time.monotonic()
            r = client.post(CHAT, json=body)
            result.update(status=r.status_code, seconds=time.monotonic() - t0)

        thread = threading.Thread(target=job)
        thread.start()
        time.sleep(1.0)  # let the job's prompt and first samples in
        busy = []
        while thread.is_alive() and len(busy) < count:
            busy += small_request_latency(url, model, 1)
        thread.join()
    return {
        "job": f"majority@{job_n} x {job_tokens} tokens",
        "job_status": result.get("status"),
        "job_seconds": result.get("seconds"),
        "idle_ms": _ms(idle),
        "during_job_ms": _ms(busy),
        "samples_during_job": len(busy),
    }


def _ms(xs: list[float]) -> dict:
    if not xs:
        return {}
    xs = sorted(xs)
    return {
        "p50": round(1000 * xs[int(0.5 * (len(xs) - 1))], 1),
        "p95": round(1000 * xs[int(0.95 * (len(xs) - 1))], 1),
        "max": round(1000 * xs[-1], 1),
        "mean": round(1000 * statistics.fmean(xs), 1),
    }


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def wait_idle(url: str, timeout: float = 60) -> float:
    """KV blocks in use once no request runs or waits (or after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        busy = metric(url, "ttscale_requests_running") + metric(url, "ttscale_requests_waiting")
        busy += metric(url, "ttscale_strategy_jobs_running")
        used = metric(url, "ttscale_kv_cache_blocks_used")
        if (busy == 0 and used == 0) or time.monotonic() > deadline:
            return used
        time.sleep(0.2)


def start_server(args) -> tuple[subprocess.Popen, str, str]:
    cmd = [sys.executable, "-m", "ttscale.server.cli", "--port", str(args.port)]
    cmd += ["--max-n", str(max(64, args.job_n)), "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, env=os.environ.copy())
    url = f"http://127.0.0.1:{args.port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not start in 300 s")
        time.sleep(0.5)
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    return proc, url, model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded)")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32, help="per request, at most")
    p.add_argument("--timeout", type=float, default=300, help="seconds before a request hangs")
    p.add_argument("--job-n", type=int, default=64, help="the big job: majority@N")
    p.add_argument("--job-tokens", type=int, default=128)
    p.add_argument("--small", type=int, default=20, help="2-token requests per measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/load_server.json"))
    args = p.parse_args()

    proc, url, model = start_server(args)
    try:
        specs = make_specs(args.requests, args.max_tokens, args.seed)
        rss0 = rss_mb(proc.pid)
        t0 = time.monotonic()
        tally = asyncio.run(mixed_load(url, model, specs, args.concurrency, args.timeout))
        elapsed = time.monotonic() - t0
        kv_left = wait_idle(url)
        rss1 = rss_mb(proc.pid)
        big = under_big_job(url, model, args.job_n, args.job_tokens, args.small)
        kv_left_after_job = wait_idle(url)
        health = httpx.get(url + "/health", timeout=10).status_code
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    report = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "kinds": {k: sum(s.kind == k for s in specs) for k in {s.kind for s in specs}},
        "seconds": round(elapsed, 1),
        "outcomes": tally.outcomes,
        "num_5xx": tally.outcomes.get("5xx", 0),
        "hangs": tally.outcomes.get("hang", 0),
        "latency_ms": _ms(tally.latencies),
        "kv_blocks_used_when_idle": kv_left,
        "kv_blocks_used_after_big_job": kv_left_after_job,
        "server_rss_mb": {
            "before": round(rss0),
            "after": round(rss1),
            "growth": round(rss1 - rss0),
        },
        "small_request_under_big_job": big,
        "health_after": health,
        "errors": tally.errors,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    ok = not report["num_5xx"] and not report["hangs"] and kv_left == 0 and health == 200
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
