"""The dashboard in a real browser: headless Chromium (the OS package, `make setup` installs it)
driven by Playwright, against a live server on a loopback port with a tiny random model.

Each page is loaded, a playground question runs a beam search until its tree, candidates and
vote appear, the Engine page's numbers are seen to change, the Runs page draws a Pareto plot
and compares two eval folders, and the offline app (`ttscale ui`) serves the same pages.
Screenshots go to the test's tmp dir. The browser console must stay free of errors.

A missing Chromium or Playwright fails these tests (it never skips them): CI installs both.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from tests.conftest import make_tiny_model, tiny_llm
from tests.test_server import serve_app
from ttscale.eval.summary import summarize_records
from ttscale.server.app import create_app
from ttscale.server.config import ServerConfig
from ttscale.ui.offline import create_offline_app

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def _chromium() -> str:
    for name in CHROMIUM:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        "no Chromium on PATH: the dashboard tests need the OS package "
        "(`make setup` installs it as root: apt-get install -y chromium)"
    )


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: pip install -e '.[dev]'")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, tmp_path):
    """A page whose console errors and uncaught exceptions fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.set_default_timeout(30_000)
    pg.console_errors = errors  # a test that provokes an expected error removes it here
    yield pg
    context.close()
    assert not errors, f"browser console errors: {errors}"


# ---- eval folders ----------------------------------------------------------------------------


def _records(strategy: str, n: int, right: set[int], k: int, seconds: float) -> list[dict]:
    out = []
    for i in range(n):
        ok = i in right
        cands = [
            {"answer": "42" if ok and j == 0 else str(j), "correct": ok and j == 0}
            for j in range(k)
        ]
        out.append(
            {
                "strategy": strategy,
                "problem_id": f"p{i}",
                "correct": ok,
                "candidates": cands,
                "n_candidates": k,
                "generated_tokens": 20 * k,
                "prompt_tokens": 30,
                "computed_prompt_tokens": 30,
                "cached_prompt_tokens": 0,
                "forks": k - 1,
                "peak_kv_blocks": 4 + k,
                "wall_time": seconds,
                "amortized_time": seconds,
                "flops": 1e9 * k,
                "bytes": 1e8 * k,
            }
        )
    return out


def _write_run(folder: Path, records: list[dict], with_summary: bool) -> None:
    folder.mkdir(parents=True)
    settings = {
        "model": "/m/tiny.gguf",
        "task": {"name": "arithmetic"},
        "params": {"max_tokens": 64},
    }
    (folder / "run.json").write_text(json.dumps({"settings": settings}))
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if with_summary:
        n = len({r["problem_id"] for r in records})
        summary = {"settings": settings, "n_problems": n, "strategies": summarize_records(records)}
        (folder / "summary.json").write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    _write_run(
        root / "a",
        _records("greedy", 8, {0, 1}, 1, 0.5) + _records("majority@4", 8, {0, 1, 2}, 4, 1.5),
        with_summary=True,
    )
    _write_run(  # no summary.json: an eval still running
        root / "b",
        _records("greedy", 8, {0, 1, 3}, 1, 0.4)
        + _records("majority@4", 8, {0, 1, 2, 3, 4}, 4, 1.2),
        with_summary=False,
    )
    return root


# ---- live servers ----------------------------------------------------------------------------


@dataclass
class Live:
    url: str
    app: FastAPI

    def on_engine(self, fn, timeout: float = 10):
        return self.app.state.engine_loop.call(fn).result(timeout)

    def wait_pool_full(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left, kv = self.on_engine(lambda e: (len(e.requests), e.kv_stats()))
            if left == 0 and kv["num_free_blocks"] == kv["num_blocks"]:
                break
            assert time.monotonic() < deadline, f"{left} requests left, {kv}"
            time.sleep(0.02)
        self.on_engine(lambda e: e.check_integrity())


@pytest.fixture(scope="module")
def server(tmp_path_factory, runs_dir) -> Iterator[Live]:
    path = tmp_path_factory.mktemp("tiny-ui")
    make_tiny_model(path, "llama")
    llm = tiny_llm(path)
    app = create_app(llm, ServerConfig(model_names=("tiny",), max_n=8))
    app.state.ui_runs_dir = runs_dir
    with serve_app(app) as url:
        yield Live(url, app)


def _events(live: Live, body: dict, timeout: float = 60) -> list[dict]:
    events = []
    with httpx.stream("POST", live.url + "/v1/ttscale/runs", json=body, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert event["kind"] == kind
                events.append(event)
    return events


BEAM = {
    "question": "What is 2 + 3?",
    "strategy": "beam@4/2",
    "scorer": "logprob",
    "max_tokens": 16,
    "temperature": 1.0,
    "step_delimiter": " ",
    "max_step_tokens": 4,
    "max_depth": 3,
}


# ---- the routes, without a browser -----------------------------------------------------------


def test_playground_run_streams_the_search_as_sse(server):
    events = _events(server, BEAM)
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "run" and kinds[-1] == "done"
    assert {
        "request",
        "tokens",
        "step",
        "fork",
        "score",
        "drop",
        "finished",
        "vote",
        "cost",
    } <= set(kinds)
    assert kinds[-4:-1] == ["finished", "vote", "cost"]
    steps = {e["seq"] for e in events if e["kind"] == "step"}
    assert all(c["seq_id"] in steps for c in events[-4]["candidates"])
    server.wait_pool_full()


def test_playground_majority_reports_votes(server):
    events = _events(server, {**BEAM, "strategy": "majority@4", "max_tokens": 8})
    vote = next(e for e in events if e["kind"] == "vote")
    assert sum(vote["votes"].values()) <= 4
    assert len([e for e in events if e["kind"] == "step"]) == 4
    server.wait_pool_full()


@pytest.mark.parametrize(
    "spec", ["greedy", "sample", "weighted@4", "bon@4", "dvts@4/2", "tree@4", "adaptive@8"]
)
def test_every_strategy_streams_a_whole_run(server, spec):
    events = _events(server, {**BEAM, "strategy": spec, "max_tokens": 8})
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "run" and kinds[-4:] == ["finished", "vote", "cost", "done"]
    nodes = {e["seq"] for e in events if e["kind"] == "step"}
    assert nodes and all(c["seq_id"] in nodes for c in events[-4]["candidates"])
    assert {e["seq"] for e in events if e["kind"] == "tokens"} <= nodes
    server.wait_pool_full()


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"strategy": "beam@8/3"}, "strategy"),  # N not a multiple of M
        ({"strategy": "majority@64"}, "strategy"),  # past the server's max_n
        ({"scorer": "rm:/etc"}, "scorer"),  # no files from requests
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"question": ""}, "question"),
    ],
)
def test_bad_runs_are_refused_before_any_work(server, change, param):
    steps = server.on_engine(lambda e: e.stats["steps"])
    r = httpx.post(server.url + "/v1/ttscale/runs", json={**BEAM, **change}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert server.on_engine(lambda e: e.stats["steps"]) == steps


def test_engine_view_lists_requests_with_their_cost(server):
    from ttscale.sampling.params import SamplingParams
    from ttscale.server.ui_routes import engine_view

    def add_and_look(engine):
        engine.add_request("ui-view", [5, 6, 7, 8, 9], SamplingParams(max_tokens=4, n=2))
        try:
            return engine_view(engine)
        finally:
            engine.abort("ui-view")

    view = server.on_engine(add_and_look)
    (row,) = [r for r in view["live_requests"] if r["request_id"] == "ui-view"]
    assert row["prompt_tokens"] == 5 and row["tokens"] == 0 and row["flops"] == 0
    assert view["sequences"]["waiting"] >= 1
    server.wait_pool_full()


def test_engine_stats_picture_the_pool(server):
    s = httpx.get(server.url + "/v1/ttscale/engine", timeout=10).json()
    kv = s["kv"]
    assert len(kv["pool"]) == kv["total"] > 0
    assert kv["used"] + kv["cached"] + kv["free"] == kv["total"]
    assert s["model"] == "tiny" and "decode_tokens_per_s" in s and "preemptions" in s


def test_eval_runs_api(server, runs_dir):
    data = httpx.get(server.url + "/v1/ttscale/eval-runs", timeout=10).json()
    runs = {r["name"]: r for r in data["runs"]}
    assert set(runs) == {"a", "b"}
    assert runs["a"]["complete"] and not runs["b"]["complete"]
    assert runs["b"]["ceiling"]["coverage"] == pytest.approx(5 / 8)
    assert [s["strategy"] for s in runs["b"]["strategies"]] == ["greedy", "majority@4"]
    cmp = httpx.get(server.url + "/v1/ttscale/eval-runs/compare?a=a&b=b", timeout=30).json()
    row = next(r for r in cmp["strategies"] if r["strategy"] == "majority@4")
    assert row["diff"] == pytest.approx(2 / 8) and row["b_only"] == 2
    missing = httpx.get(server.url + "/v1/ttscale/eval-runs/detail?name=../a", timeout=10)
    assert missing.status_code == 404
    assert httpx.get(server.url + "/ui/..%2Fpages.py", timeout=10).status_code == 404


# ---- the pages, in Chromium ------------------------------------------------------------------


def test_engine_page_numbers_change(server, page, tmp_path):
    page.goto(server.url + "/ui#engine")
    page.wait_for_function("document.querySelector('#stat-steps').textContent !== '–'")
    steps = int(page.text_content("#stat-steps"))
    assert page.text_content("#model") == "tiny"
    assert not page.is_visible("#key-form")  # no --api-key: nothing to ask
    # Work arrives from elsewhere (a plain completion): the polled numbers move.
    r = httpx.post(
        server.url + "/v1/completions",
        json={"prompt": "hello", "max_tokens": 12, "n": 4, "temperature": 1.0},
        timeout=30,
    )
    assert r.status_code == 200
    page.wait_for_function(f"Number(document.querySelector('#stat-steps').textContent) > {steps}")
    page.wait_for_function("document.querySelector('#kv-summary').textContent.includes('blocks')")
    page.screenshot(path=str(tmp_path / "engine.png"), full_page=True)
    server.wait_pool_full()


def test_playground_grows_the_tree_and_shows_the_vote(server, page, tmp_path):
    page.goto(server.url + "/ui#playground")
    page.fill("#q", BEAM["question"])
    page.fill("#strategy", "beam@4/2")
    page.select_option("#scorer", "logprob")
    page.fill("#max-tokens", "16")
    page.fill("#temperature", "1")
    page.fill("#delimiter", " ")
    page.fill("#step-tokens", "4")
    page.click("#run")
    # The tree: the prompt, its forked branches, then scored candidates and a chosen one.
    page.wait_for_selector("#tree .node.root")
    page.wait_for_function("document.querySelectorAll('#tree .node').length > 4")
    page.wait_for_selector("#run-status:has-text('done')")
    assert page.locator("#tree .node.finished, #tree .node.excluded").count() >= 1
    assert page.locator("#tree .node.pruned").count() >= 1
    assert page.locator("#tree .shared").count() >= 1  # shared KV shown on the edges
    assert page.locator("#vote .bar, #vote p").count() >= 1
    assert "generated tokens" in page.text_content("#run-cost")
    page.screenshot(path=str(tmp_path / "playground-beam.png"), full_page=True)
    page.click("#tree .node.finished, #tree .node.excluded >> nth=0")
    assert "KV blocks" in page.text_content("#node-detail")
    # A vote: majority's histogram has one bar per answer, the winner marked.
    page.fill("#strategy", "majority@4")
    page.fill("#max-tokens", "8")
    page.uncheck("#hygiene")  # the random model never finishes: let cut-off answers vote
    page.click("#run")
    page.wait_for_selector("#run-status:has-text('done')")
    page.wait_for_selector("#vote .bar, #vote .vote-empty")
    assert page.locator("#tree .node").count() == 5  # the prompt and its 4 samples
    page.screenshot(path=str(tmp_path / "playground-majority.png"), full_page=True)
    server.wait_pool_full()


def test_playground_shows_a_refusal(server, page):
    page.goto(server.url + "/ui#playground")
    page.fill("#strategy", "beam@8/3")
    page.click("#run")
    page.wait_for_selector("#run-status.bad:has-text('refused')")
    assert "N must be a multiple of M" in page.text_content("#run-status")
    # Chromium logs the expected 400 as a failed resource load: not a script error.
    expected = "status of 400 (Bad Request)"
    assert any(expected in e for e in page.console_errors)
    page.console_errors[:] = [e for e in page.console_errors if expected not in e]


def test_runs_page_plots_and_compares(server, page, tmp_path):
    page.goto(server.url + "/ui#runs")
    page.wait_for_selector("#runs-table tbody tr")
    assert page.locator("#runs-table tbody tr").count() == 2
    page.click("#runs-table tbody tr[data-run='a']")
    page.wait_for_selector("#pareto .point")
    assert page.locator("#pareto .point").count() == 2
    assert page.locator("#pareto .ceiling").count() == 1
    assert "arithmetic" in page.text_content("#pareto .title")
    # Sorting: accuracy descending puts majority@4 first.
    page.click("#strategies-table th[data-key='accuracy']")
    assert page.text_content("#strategies-table tbody tr >> nth=0").startswith("majority@4")
    page.check("input[name=xaxis][value=mean_flops]")
    page.wait_for_selector("#pareto text:has-text('FLOPs per problem')")
    page.screenshot(path=str(tmp_path / "runs.png"), full_page=True)
    page.select_option("#cmp-a", "a")
    page.select_option("#cmp-b", "b")
    page.click("#compare-form button")
    page.wait_for_selector("#compare-table tbody tr")
    assert page.locator("#compare-table tbody tr").count() == 2
    page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)


def test_offline_dashboard_serves_runs_without_a_model(runs_dir, page, tmp_path):
    with serve_app(create_offline_app(runs_dir)) as url:
        page.goto(url + "/ui#engine")
        page.wait_for_selector("#engine-offline:not([hidden])")
        page.goto(url + "/ui#playground")
        page.wait_for_selector("#playground-offline", state="visible")
        assert not page.is_visible("#run-form")
        page.goto(url + "/ui#runs")
        page.wait_for_selector("#runs-table tbody tr")
        page.click("#runs-table tbody tr[data-run='b']")
        page.wait_for_selector("#pareto .point")
        assert "in progress" in page.text_content("#run-title")
        page.screenshot(path=str(tmp_path / "offline-runs.png"), full_page=True)
    with pytest.raises(ValueError, match="no such folder"):
        create_offline_app(runs_dir / "missing")


def test_a_client_that_leaves_cancels_the_run(server):
    body = {**BEAM, "strategy": "beam@8/2", "max_tokens": 96, "max_depth": 24}
    cancelled = server.app.state.engine_loop.num_jobs_cancelled
    with httpx.stream("POST", server.url + "/v1/ttscale/runs", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("event: fork"):
                break  # mid-search: branches hold KV now
    server.wait_pool_full()
    assert server.app.state.engine_loop.num_jobs_cancelled == cancelled + 1


def test_dashboard_with_an_api_key(tmp_path_factory, runs_dir, page):
    """The page loads without the key, asks for it, then sends it with every API call."""
    path = tmp_path_factory.mktemp("tiny-key")
    make_tiny_model(path, "llama")
    app = create_app(tiny_llm(path), ServerConfig(model_names=("tiny",), api_key="sekrit"))
    app.state.ui_runs_dir = runs_dir
    with serve_app(app) as url:
        assert httpx.get(url + "/v1/ttscale/engine", timeout=10).status_code == 401
        page.goto(url + "/ui#engine")
        page.wait_for_selector("#key-form", state="visible")
        page.fill("#api-key", "sekrit")
        page.click("#key-form button")
        page.wait_for_function("document.querySelector('#model').textContent === 'tiny'")
        page.wait_for_function("document.querySelector('#stat-steps').textContent !== '–'")
        page.goto(url + "/ui#runs")  # the key is kept for the session
        page.wait_for_selector("#runs-table tbody tr")
    expected = "status of 401 (Unauthorized)"
    assert any(expected in e for e in page.console_errors)
    page.console_errors[:] = [e for e in page.console_errors if expected not in e]
