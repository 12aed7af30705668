"""ttscale on Ray: routing and metrics merging (pure), then one local cluster for the module
(``ray.init(num_cpus=2)``): eval over 2 engine actors x 1 thread against the single-process
run, a worker killed mid-eval, bad input, and 2 engine replicas behind Ray Serve (requests,
n > 1, streaming, a strategy job, prefix routing, merged metrics, a killed replica).

Everything runs on the tiny random model. Ray start-up is the slow part (a cluster, actors
that import torch, Serve's controller and proxy), so the cluster is shared by the module and
each group of tests shares its actors.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from ttscale import SamplingParams  # noqa: E402
from ttscale.eval.harness import run_eval as run_eval_local  # noqa: E402
from ttscale.eval.store import RECORDS_FILE  # noqa: E402
from ttscale.ray import EnginePool, RayClusterError, WorkerConfig, run_eval  # noqa: E402
from ttscale.ray.cluster import probe_address  # noqa: E402
from ttscale.ray.prom import merge_metrics  # noqa: E402
from ttscale.ray.routing import PrefixRouter, RoutingConfig, routing_text  # noqa: E402
from ttscale.tasks import JsonlTask  # noqa: E402
from ttscale.tts.hygiene import Hygiene  # noqa: E402

from .conftest import tiny_llm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARAMS = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=10, seed=3)
ENGINE = dict(kv_cache_gb=0.01, block_size=4)
PROBLEMS = [
    {
        "question": f"Problem {i}: Tom has {i} apples and buys {i + 2} more.",
        "answer": f"#### {i % 3}",
    }
    for i in range(6)
]
# Fields that depend on which problems shared an engine (each actor computes the shared chat
# prefix once) or on timing: everything else of the summary must be equal.
ENGINE_DEPENDENT = ("time", "computed_prompt", "cached_prompt", "prompt_cache", "flops", "bytes")


class LengthModTask(JsonlTask):
    """The tiny model's text is noise: its 'answer' is the text's length mod 3."""

    def extract_answer(self, completion: str) -> str | None:
        return str(len(completion) % 3)


class CrashOnceTask(LengthModTask):
    """Kills the process running it the first time it judges ``crash_on`` (a marker file
    makes it once per test, across the restart)."""

    def __init__(self, path: Path, marker: Path, crash_on: str) -> None:
        super().__init__(path)
        self.marker, self.crash_on = str(marker), crash_on

    def is_correct(self, problem, answer) -> bool:  # type: ignore[no-untyped-def]
        if problem.id == self.crash_on and not os.path.exists(self.marker):
            Path(self.marker).write_text("crashed")
            os._exit(1)
        return super().is_correct(problem, answer)


# ---- pure parts: routing and metrics ----------------------------------------------------------


def test_routing_keeps_a_prefix_on_its_replica_and_balances() -> None:
    router = PrefixRouter(2, RoutingConfig(chunk_chars=8, balance_slack=1))
    system = "You are a careful assistant. " * 3
    first = router.choose(system + "Q1")
    assert first.reason == "least_loaded"
    router.started(first.replica)
    router.finished(first.replica, system + "Q1", ok=True)
    # Same system prompt, another question: the replica that cached it.
    again = router.choose(system + "Q2 is different")
    assert again.replica == first.replica and again.reason == "prefix"
    assert again.matched_chars >= len(system) - 8
    # Unrelated prompt: the least loaded (the other one, fewer routed so far).
    other = router.choose("Something else entirely, long enough")
    assert other.replica != first.replica and other.reason == "least_loaded"
    # The prefix's replica far busier than the other: balance wins.
    for _ in range(3):
        router.started(first.replica)
    busy = router.choose(system + "Q3")
    assert busy.replica != first.replica and busy.reason == "balance"
    # A failed replica is skipped and forgets its prefixes.
    router.mark_down(first.replica)
    assert router.choose(system + "Q4").replica != first.replica
    assert router.stats()["prefix_entries"] == 0
    with pytest.raises(LookupError):
        router.choose("x", exclude=[0, 1])


def test_routing_text_reads_chats_and_prompts() -> None:
    turn1 = [{"role": "user", "content": "hi"}]
    turn2 = [*turn1, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "?"}]
    t1 = routing_text("/v1/chat/completions", json.dumps({"messages": turn1}).encode())
    t2 = routing_text("/v1/chat/completions", json.dumps({"messages": turn2}).encode())
    assert t2.startswith(t1) and t1  # the next turn extends the conversation's prefix
    assert routing_text("/v1/completions", b'{"prompt": "abc"}') == "abc"
    assert routing_text("/v1/completions", b'{"prompt": ["abc", "d"]}') == "abc"
    assert routing_text("/v1/completions", b"not json") == ""


def test_merge_metrics_labels_every_replica() -> None:
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    texts = {}
    for replica, n in (("0", 3), ("1", 5)):
        r = CollectorRegistry()
        Counter("ttscale_generation_tokens", "tokens", registry=r).inc(n)
        Histogram("ttscale_latency_seconds", "latency", registry=r).observe(0.1 * n)
        texts[replica] = generate_latest(r).decode()
    merged = merge_metrics(texts)
    assert merged.count("# TYPE ttscale_generation_tokens counter") == 1
    assert 'ttscale_generation_tokens_total{replica="0"} 3.0' in merged
    assert 'ttscale_generation_tokens_total{replica="1"} 5.0' in merged
    assert 'ttscale_latency_seconds_count{replica="1"} 1.0' in merged
    assert "_created" not in merged


def test_unreachable_address_fails_fast() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(RayClusterError, match=r"cannot reach a Ray cluster.*ray start --head"):
        probe_address(f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 5


def test_cli_without_ray_names_the_extra(tmp_path) -> None:
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps(PROBLEMS[0]) + "\n")
    code = f"""
import sys
sys.modules["ray"] = None
from ttscale.cli import app
app(["eval", "--ray", "--task", {str(task)!r}, "-n", "1", "-s", "greedy", "-o", {str(tmp_path)!r}])
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'ttscale[ray]'" in " ".join(proc.stderr.split())


# ---- one local cluster ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test tasks
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("task") / "gsm.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS), encoding="utf-8")
    return path


def worker_config(model_dir: Path) -> WorkerConfig:
    return WorkerConfig(str(model_dir), num_threads=1, engine_options=ENGINE)


def strip(rows: list[dict]) -> list[dict]:
    return [
        {k: v for k, v in row.items() if not any(part in k for part in ENGINE_DEPENDENT)}
        for row in rows
    ]


def same_results(record: dict) -> tuple:
    cands = [(c["text"], c["answer"], c["tokens"], c["correct"]) for c in record["candidates"]]
    return (record["answer"], record["correct"], record["votes"], cands, record["generated_tokens"])


def load(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / RECORDS_FILE).read_text().splitlines()]


@pytest.fixture(scope="class")
def pool(cluster, model_dir):
    """Two engine actors x 1 CPU: the whole cluster, given back when the class ends."""
    with EnginePool(worker_config(model_dir), 2, max_restarts=2) as pool:
        yield pool


class TestEval:
    def test_two_workers_match_one_process(self, pool, model_dir, task_file, tmp_path) -> None:
        task = LengthModTask(task_file)
        specs = ["greedy", "majority@4"]
        options = dict(params=PARAMS, hygiene=Hygiene(enabled=False), concurrency=2)
        local = run_eval_local(
            tiny_llm(model_dir, num_threads=2), task, specs, 6, tmp_path / "one", progress=False,
            **options,
        )  # fmt: skip
        dist = run_eval(pool, task, specs, 6, tmp_path / "ray", progress=False, **options)
        assert strip(dist["strategies"]) == strip(local["strategies"])
        assert dist["settings"] == local["settings"]
        one = {(r["strategy"], r["problem_id"]): r for r in load(tmp_path / "one")}
        two = {(r["strategy"], r["problem_id"]): r for r in load(tmp_path / "ray")}
        assert one.keys() == two.keys() and len(one) == 12
        for key, r in two.items():
            assert same_results(r) == same_results(one[key]), key
            assert r["flops"] > 0 and r["bytes"] > 0 and r["amortized_time"] > 0
        # Both workers ran problems; the summary's totals add every worker's cost.
        per_worker = dist["cluster"]["per_worker"]
        assert len(per_worker) == 2 and all(w["problems"] > 0 for w in per_worker.values())
        for row in dist["strategies"]:
            rs = [r for r in two.values() if r["strategy"] == row["strategy"]]
            assert row["total_flops"] == pytest.approx(sum(r["flops"] for r in rs))
        assert sum(w["flops"] for w in per_worker.values()) == pytest.approx(
            sum(r["flops"] for r in two.values())
        )
        # Resuming a finished run sends nothing and changes nothing.
        again = run_eval(pool, task, specs, 6, tmp_path / "ray", progress=False, **options)
        assert strip(again["strategies"]) == strip(dist["strategies"])
        assert len(load(tmp_path / "ray")) == 12

    def test_killed_worker_reruns_its_chunk(self, pool, task_file, tmp_path) -> None:
        problems = LengthModTask(task_file).problems(6)
        task = CrashOnceTask(task_file, tmp_path / "crashed", crash_on=problems[3].id)
        summary = run_eval(
            pool, task, ["greedy"], 6, tmp_path / "out", params=PARAMS,
            hygiene=Hygiene(enabled=False), concurrency=1, progress=False,
        )  # fmt: skip
        assert (tmp_path / "crashed").exists()  # a worker did die
        records = load(tmp_path / "out")
        assert sorted(r["problem_id"] for r in records) == sorted(p.id for p in problems)
        assert summary["strategies"][0]["n"] == 6
        # The pool goes on with the restarted actor; an error of the work itself is raised
        # as itself, not retried.
        assert len(pool.solve_many(["a", "b", "c"], "majority@2", params=PARAMS)) == 3
        with pytest.raises(ValueError, match="pass a scorer"):
            pool.solve_many(["a"], "bon@2", params=PARAMS, scorer=None)


def test_eval_bad_input_fails_at_start(cluster, model_dir, tmp_path) -> None:
    with pytest.raises(RayClusterError, match="need 3 CPUs but the cluster has 2"):
        EnginePool(worker_config(model_dir), 3)
    with pytest.raises(RayClusterError, match=r"failed to load the model.*does not exist"):
        EnginePool(WorkerConfig(str(tmp_path / "missing")), 1, ready_timeout_s=120)


def test_eval_cli_with_ray(cluster, model_dir, task_file, tmp_path) -> None:
    """`ttscale eval --ray` end to end (one worker: the class's pool is gone), then a rerun
    that finds every result and starts no worker."""
    from typer.testing import CliRunner

    from ttscale.cli import app

    args = [
        "eval", "--ray", "--workers", "1", "--task", str(task_file), "-n", "2", "-s", "greedy",
        "-m", str(model_dir), "--kv-cache-gb", "0.01", "--max-tokens", "6", "-o", str(tmp_path),
        "--json",
    ]  # fmt: skip
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["strategies"][0]["n"] == 2 and summary["cluster"]["workers"] == 1
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "nothing to run" in " ".join(again.output.split())
    wrong = CliRunner().invoke(app, ["eval", "--workers", "3"])
    assert wrong.exit_code == 2 and "only apply with --ray" in " ".join(wrong.output.split())


# ---- serving ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_port() -> int:
    """One port for the module: Serve's proxy keeps the port it started with."""
    return free_port()


def test_serve_replica_that_cannot_load_fails_at_start(cluster, serve_port, tmp_path) -> None:
    """Runs before the served class, whose deployment then reuses the Serve controller."""
    from ttscale.ray.serving import RayServeConfig, deploy
    from ttscale.server.config import ServerConfig

    config = RayServeConfig(replicas=1, port=serve_port)
    with pytest.raises(RayClusterError, match=r"replica failed to start.*does not exist"):
        deploy(WorkerConfig(str(tmp_path / "missing")), ServerConfig(), config)


@pytest.fixture(scope="class")
def served(cluster, model_dir, serve_port):
    """2 engine replicas x 1 CPU behind the router; an httpx client on Serve's proxy."""
    import httpx
    from ray import serve

    from ttscale.ray.serving import RayServeConfig, deploy, shutdown
    from ttscale.server.config import ServerConfig

    config = RayServeConfig(replicas=2, port=serve_port, health_check_period_s=1.0)
    url = deploy(worker_config(model_dir), ServerConfig(model_names=("tiny",)), config)
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client
    shutdown()
    serve.shutdown()


def engine_actor(index: int):
    from ttscale.ray.serving import ENGINE_PREFIX

    for a in ray.util.list_named_actors(all_namespaces=True):
        if f"#{ENGINE_PREFIX}{index}#" in a["name"]:
            return ray.get_actor(a["name"], namespace=a["namespace"])
    raise LookupError(index)


CHAT = [
    {"role": "system", "content": "You are a helpful assistant who answers in a few words."},
    {"role": "user", "content": "Tell me about apples, pears and plums."},
]


class TestServe:
    def test_requests_streaming_strategy_and_prefix_routing(self, served) -> None:
        first = served.post(
            "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 6, "n": 3, "seed": 1}
        )
        assert first.status_code == 200, first.text
        body = first.json()
        assert len(body["choices"]) == 3 and body["usage"]["completion_tokens"] > 0
        replica = first.headers["x-ttscale-replica"]
        # The conversation's next turn goes where its prefix is cached, and hits the cache.
        turn2 = [*CHAT, body["choices"][0]["message"], {"role": "user", "content": "And figs?"}]
        second = served.post("/v1/chat/completions", json={"messages": turn2, "max_tokens": 4})
        assert second.status_code == 200, second.text
        assert second.headers["x-ttscale-replica"] == replica
        assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        # Streaming, through the router.
        with served.stream(
            "POST", "/v1/completions", json={"prompt": "abc", "max_tokens": 4, "stream": True}
        ) as stream:
            assert stream.status_code == 200
            lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and len(lines) >= 3
        # A strategy job (the ttscale extension) and a validation error, unchanged.
        job = served.post(
            "/v1/chat/completions",
            json={"messages": CHAT, "max_tokens": 6, "ttscale": {"strategy": "majority@3"}},
        )
        assert job.status_code == 200, job.text
        assert len(job.json()["ttscale"]["candidates"]) == 3
        bad = served.post("/v1/chat/completions", json={"messages": []})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
        # /metrics: both replicas, each labelled; the tokens add up to what was generated.
        metrics = served.get("/metrics").text
        assert 'ttscale_replica_up{replica="0"} 1' in metrics
        assert 'ttscale_replica_up{replica="1"} 1' in metrics
        tokens = [
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("ttscale_generation_tokens_total{")
        ]
        assert len(tokens) == 2 and sum(tokens) >= body["usage"]["completion_tokens"] + 4

    def test_killed_replica_is_retried_or_503(self, served) -> None:
        ray.kill(engine_actor(0), no_restart=False)
        for _ in range(3):
            t0 = time.monotonic()
            r = served.post("/v1/completions", json={"prompt": "hello there", "max_tokens": 3})
            elapsed = time.monotonic() - t0
            assert r.status_code in (200, 503), r.text
            if r.status_code == 503:
                assert "no engine replica" in r.json()["error"]["message"]
            assert elapsed < 30  # never a hang: 2 replicas x accept timeout at most
        assert r.status_code == 200  # the survivor (or the restarted one) serves


def test_serve_more_replicas_than_cpus(cluster, model_dir) -> None:
    from ttscale.ray.serving import RayServeConfig, deploy
    from ttscale.server.config import ServerConfig

    with pytest.raises(RayClusterError, match=r"3 replicas x 1 CPU need 3 CPUs.*--replicas 2"):
        deploy(worker_config(model_dir), ServerConfig(), RayServeConfig(replicas=3))
