"""Admission control by resources (issue 14): n and strategy N/M against --max-n, worst-case
KV against the pool, strategy jobs in the waiting queue and within their KV share (so small
requests are not starved), jobs cancelled when their client leaves, and /metrics seeing jobs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.test_server import (
    CHAT,
    COMPLETIONS,
    HELLO,
    MODEL,
    LiveServer,
    engine_blocked,
    engine_slowed,
    model_dir,  # noqa: F401  (the module's fixture)
    post,
    serve_in_thread,
    tiny_llm,
)
from ttscale.server.admission import (
    Footprint,
    Pool,
    check_fits,
    kv_blocks,
    largest_max_tokens,
    max_gen_that_fits,
    strategy_footprint,
)
from ttscale.server.errors import APIError

# ---- the arithmetic ----------------------------------------------------------------------------


def test_kv_blocks_worst_case():
    assert kv_blocks(10, 1, 6, 4) == 4  # 16 tokens, one sequence
    # n > 1: the prompt once (3 blocks), then per sample its 2 blocks + 1 copied partial block.
    assert kv_blocks(10, 4, 6, 4) == 3 + 4 * 3
    for prompt, n in [(10, 1), (10, 4), (1, 8), (64, 3)]:
        gen = max_gen_that_fits(prompt, n, 100, 4)
        assert kv_blocks(prompt, n, gen, 4) <= 100 < kv_blocks(prompt, n, gen + 4, 4)


def test_strategy_footprint_bounds_and_limits():
    fp = strategy_footprint("majority@16", 20, 50, 512, 64)
    assert (fp.width, fp.gen) == (16, 50)
    # Step-level search: one step may overshoot the budget; max_depth steps at most.
    fp = strategy_footprint("beam@8/2", 20, 200, 512, 64)
    assert (fp.width, fp.gen) == (8, 200 + 96 - 1)
    assert strategy_footprint("tree@4", 20, 10, 512, 64).gen == 10 + 10 - 1
    assert strategy_footprint("dvts@4/2", 20, 5000, 512, 64).gen == 512 - 20  # the context
    for spec, field in [("majority@100000", "N=100000"), ("beam@128/2", "N=128")]:
        with pytest.raises(APIError) as e:
            strategy_footprint(spec, 20, 10, 512, 64)
        assert e.value.param == "ttscale.strategy" and field in e.value.message
    with pytest.raises(APIError) as e:
        check_fits(Footprint(20, 64, 400), 1000, 4, "this strategy", "ttscale.strategy")
    assert "at most 56 tokens per sample fit" in e.value.message
    pool = Pool(1000, 4)
    mt = largest_max_tokens("beam@8/2", 20, 10_000, 10_000, 64, pool, 500)
    assert strategy_footprint("beam@8/2", 20, mt, 10_000, 64).blocks(4) <= 500
    assert strategy_footprint("beam@8/2", 20, mt + 1, 10_000, 64).blocks(4) > 500


# ---- a live server with a small pool -------------------------------------------------------------

POOL_BLOCKS = 96  # blocks of 4 tokens: 384 tokens, so max_model_len is 384 too


@pytest.fixture(scope="module")
def tight(model_dir) -> Iterator[LiveServer]:  # noqa: F811
    # kv_cache_gb sized for ~POOL_BLOCKS blocks of the tiny model (2 KiB per block).
    llm = tiny_llm(model_dir, kv_cache_gb=POOL_BLOCKS * 2048 / 2**30)
    with serve_in_thread(llm, max_n=8, max_waiting=3) as live:
        yield live


@pytest.fixture(autouse=True)
def _pool_full_after(request):
    yield
    if "tight" in request.fixturenames:
        request.getfixturevalue("tight").wait_pool_full()


def tts(strategy: str, **body) -> dict:
    return {
        "model": MODEL,
        "messages": HELLO,
        "temperature": 1.0,
        "seed": 1,
        "ttscale": {"strategy": strategy, "hygiene": False},
        **body,
    }


def test_pool_size(tight):
    blocks = tight.on_engine(lambda e: e.kv_stats()["num_blocks"])
    assert abs(blocks - POOL_BLOCKS) <= 4
    assert tight.llm.engine.max_model_len == blocks * 4


def test_the_oom_request_is_refused_at_once(tight):
    """issue 14: `majority@100000` grew the server to 20 GB and the OOM killer; N > max_n."""
    t0 = time.monotonic()
    r = post(tight, CHAT, tts("majority@100000", max_tokens=2))
    assert r.status_code == 400 and time.monotonic() - t0 < 2
    error = r.json()["error"]
    assert error["param"] == "ttscale.strategy" and "--max-n" in error["message"]
    for spec in ("majority@9", "beam@16/4", "adaptive@65"):
        r = post(tight, CHAT, tts(spec, max_tokens=2))
        assert r.status_code == 400 and r.json()["error"]["param"] == "ttscale.strategy", spec


def test_worst_case_kv_beyond_the_pool_is_refused_saying_what_fits(tight):
    # 8 samples of 100 tokens: 8 x 26 blocks > 96.
    r = post(tight, COMPLETIONS, {"model": MODEL, "prompt": "Hi", "n": 8, "max_tokens": 100})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "n" and error["code"] == "kv_cache_exceeded"
    assert "tokens per sample fit" in error["message"]
    # A strategy gets half the pool: majority@8 of 40 tokens (8 x 11 blocks) does not fit.
    r = post(tight, CHAT, tts("majority@8", max_tokens=40))
    assert r.status_code == 400 and r.json()["error"]["param"] == "ttscale.strategy"
    assert "tokens per sample fit" in r.json()["error"]["message"]
    # What fits runs.
    r = post(tight, COMPLETIONS, {"model": MODEL, "prompt": "Hi", "n": 8, "max_tokens": 20})
    assert r.status_code == 200 and len(r.json()["choices"]) == 8


def test_default_max_tokens_shrinks_to_what_fits(tight):
    """Chat's default (the rest of the context) is never refused: it is cut to what the
    samples can hold together."""
    r = post(tight, CHAT, {"model": MODEL, "messages": HELLO, "n": 8, "ignore_eos": True})
    assert r.status_code == 200, r.text
    reply = r.json()
    assert len(reply["choices"]) == 8
    assert reply["usage"]["completion_tokens"] <= 8 * (POOL_BLOCKS * 4 // 8)
    r = post(tight, CHAT, tts("majority@4", max_tokens=None, ignore_eos=True))
    assert r.status_code == 200, r.text
    tokens = [c["tokens"] for c in r.json()["ttscale"]["candidates"]]
    prompt = r.json()["usage"]["prompt_tokens"]
    assert kv_blocks(prompt, 4, max(tokens), 4) <= POOL_BLOCKS // 2


def test_max_tokens_beyond_the_context_is_400(tight):
    ctx = tight.llm.engine.max_model_len
    for path, body, param in [
        (COMPLETIONS, {"prompt": "Hi", "max_tokens": 10**9}, "max_tokens"),
        (COMPLETIONS, {"prompt": "Hi", "max_tokens": ctx, "ignore_eos": True}, "max_tokens"),
        (CHAT, {"messages": HELLO, "max_tokens": ctx}, "max_tokens"),
        (CHAT, {"messages": HELLO, "max_completion_tokens": 10**6}, "max_completion_tokens"),
        (CHAT, {**tts("majority@2"), "max_tokens": 10**9}, "max_tokens"),
    ]:
        r = post(tight, path, {"model": MODEL, **body})
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["code"] == "context_length_exceeded"


def test_strategy_jobs_count_against_the_waiting_queue(tight):
    results: list[int] = []

    def send(i: int) -> None:
        body = {"model": MODEL, "prompt": f"Hi {i}", "max_tokens": 2}
        results.append(post(tight, COMPLETIONS, body).status_code)

    def job() -> None:
        results.append(post(tight, CHAT, tts("majority@2", max_tokens=2)).status_code)

    with engine_blocked(tight) as release:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        threads.append(threading.Thread(target=job))
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while tight.engine_loop.num_waiting < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = post(tight, CHAT, tts("majority@2", max_tokens=2))  # the queue holds 3
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        release.set()
        for t in threads:
            t.join(30)
    assert results == [200, 200, 200]


def test_jobs_beyond_the_share_wait_for_room(tight):
    """Two jobs that each fit the share but not together run one after the other."""
    body = tts("majority@4", max_tokens=30, ignore_eos=True)  # 4 x 9 blocks: 37 of 48
    peak = []

    def watch(stop: threading.Event) -> None:
        while not stop.is_set():
            peak.append(tight.engine_loop.snapshot["jobs_running"])
            time.sleep(0.002)

    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(stop,))
    watcher.start()
    codes: list[int] = []
    threads = [
        threading.Thread(target=lambda: codes.append(post(tight, CHAT, body).status_code))
        for _ in range(2)
    ]
    with engine_slowed(tight, 0.002):
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    stop.set()
    watcher.join()
    assert codes == [200, 200] and max(peak) == 1


def test_strategy_job_abandoned_by_its_client_is_cancelled_and_frees_kv(tight):
    loop = tight.engine_loop
    cancelled = loop.num_jobs_cancelled
    body = tts("majority@4", max_tokens=30, ignore_eos=True)
    with engine_slowed(tight, 0.03):  # 30 tokens then take >= 0.9 s: the cancel frees
        with pytest.raises(httpx.ReadTimeout):
            post(tight, CHAT, body, timeout=0.3)
        assert tight.wait_pool_full(timeout=1.0) < 1.0
    assert loop.num_jobs_cancelled == cancelled + 1
    assert loop.snapshot["jobs_running"] == 0 and loop.snapshot["job_kv_blocks_reserved"] == 0


def test_engine_failure_during_a_job_is_500_and_frees_its_kv(tight):
    def patch(engine):
        step = type(engine).step
        calls = []

        def failing_step():
            calls.append(1)
            if len(calls) == 3:  # mid-generation: the job's branches hold KV
                del engine.step
                step(engine)
                raise RuntimeError("injected engine bug")
            return step(engine)

        engine.step = failing_step

    tight.on_engine(patch)
    r = post(tight, CHAT, tts("majority@4", max_tokens=20, ignore_eos=True))
    assert r.status_code == 500 and "injected engine bug" in r.json()["error"]["message"]
    tight.wait_pool_full()
    assert tight.engine_loop.snapshot["jobs_running"] == 0
    assert post(tight, CHAT, tts("majority@2", max_tokens=4)).status_code == 200


def metric_values(live: LiveServer) -> dict[str, float]:
    text = httpx.get(live.url + "/metrics").text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_metrics_see_strategy_jobs_preemptions_and_queue_time(tight):
    before = metric_values(tight)
    r = post(tight, CHAT, tts("majority@4", max_tokens=8))
    assert r.status_code == 200
    generated = r.json()["usage"]["completion_tokens"]
    tight.wait_pool_full()
    after = metric_values(tight)
    finished = 'ttscale_strategy_jobs_finished_total{outcome="finished"}'
    assert after[finished] == before.get(finished, 0) + 1
    gained = after["ttscale_generation_tokens_total"] - before["ttscale_generation_tokens_total"]
    assert gained >= generated > 0
    assert after["ttscale_queue_time_seconds_count"] > before["ttscale_queue_time_seconds_count"]
    for name in (
        "ttscale_preemptions_total",
        "ttscale_strategy_jobs_running",
        "ttscale_strategy_jobs_waiting",
        "ttscale_strategy_jobs_kv_blocks_reserved",
        "ttscale_time_to_first_token_seconds_count",
        "ttscale_inter_token_latency_seconds_count",
    ):
        assert name in after


def test_preemptions_are_counted(tight):
    """Four requests whose worst cases each fit, but not all at once: the engine preempts."""
    before = metric_values(tight)["ttscale_preemptions_total"]
    body = {"model": MODEL, "n": 4, "max_tokens": 60, "ignore_eos": True, "temperature": 1.0}
    codes: list[int] = []

    def send(i: int) -> None:
        # The waiting queue holds 3: if all four arrive before the engine admits one, the
        # last is told 429 and retries, as a client honouring Retry-After would.
        for _ in range(100):
            r = post(tight, COMPLETIONS, {**body, "prompt": f"Go {i}"})
            if r.status_code != 429:
                break
            time.sleep(0.05)
        codes.append(r.status_code)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert codes == [200] * 4
    assert metric_values(tight)["ttscale_preemptions_total"] > before


def test_small_request_is_not_starved_by_a_large_job(model_dir):  # noqa: F811
    """A 2-token request sent while a majority@8 job of 300 tokens each runs is served within
    a few engine steps, not after the job (issue 14: 60 s behind majority@2000)."""
    with serve_in_thread(tiny_llm(model_dir), max_n=8) as live:
        job_done = threading.Event()
        job_codes: list[int] = []
        job_tokens: list[int] = []

        def job() -> None:
            r = post(live, CHAT, tts("majority@8", max_tokens=300, ignore_eos=True), timeout=120)
            job_codes.append(r.status_code)
            job_tokens.append(r.json()["usage"]["completion_tokens"])
            job_done.set()

        with engine_slowed(live, 0.005):  # >= 1.5 s of job, whatever the machine
            threading.Thread(target=job).start()
            deadline = time.monotonic() + 10
            while live.engine_loop.snapshot["jobs_running"] == 0:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            time.sleep(0.2)  # the job is decoding
            t0 = time.monotonic()
            r = post(live, COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": 2})
            latency = time.monotonic() - t0
            assert r.status_code == 200
            assert not job_done.is_set(), "the job ended first: nothing was measured"
            print(f"\n2-token request during majority@8 x 300 tokens: {latency * 1000:.0f} ms")
            assert latency < 1.0
        job_done.wait(120)
        assert job_codes == [200] and job_tokens == [8 * 300]
        live.wait_pool_full()
