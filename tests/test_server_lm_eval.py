"""lm-evaluation-harness against the live server: the client the eval ecosystem points at
OpenAI-compatible servers. Its `local-completions` model runs two tiny tasks shipped in
tests/data/lm_eval (YAML + JSONL, no hub access) on a tiny random model:

* `tiny_arith_gen` (generate_until, batch_size 4: batched completions prompts, stop strings);
* `tiny_capitals_mc` (multiple_choice: loglikelihoods from `echo` + `logprobs` + `max_tokens 1`).

Both must produce a score, and what lm-eval read must be what the engine computes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_server import (
    MODEL,
    LiveServer,
    model_dir,  # noqa: F401  (the module's fixture)
    serve_in_thread,
    tiny_llm,
)
from ttscale import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests" / "data" / "lm_eval"


@pytest.fixture(scope="module")
def live(model_dir) -> Iterator[LiveServer]:  # noqa: F811
    with serve_in_thread(tiny_llm(model_dir), max_n=8) as server:
        yield server


def run_lm_eval(live: LiveServer, tokenizer: Path, tasks: list[str]) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = (
        f"model={MODEL},base_url={live.base_url}/completions,tokenizer_backend=huggingface,"
        f"tokenizer={tokenizer},max_retries=1,timeout=60"
    )
    return lm_eval.simple_evaluate(
        model="local-completions",
        model_args=args,
        tasks=tasks,
        batch_size=4,
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        log_samples=True,
    )


@pytest.mark.slow
def test_lm_eval_generate_until_and_multiple_choice(live, model_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(ROOT)  # the YAML names its JSONL relative to the repository
    # No hub: datasets and transformers read local files only (the task files, the tokenizer).
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    out = run_lm_eval(live, model_dir, ["tiny_arith_gen", "tiny_capitals_mc"])
    print(f"\nlm-eval scores: {out['results']}")
    results = out["results"]
    gen = results["tiny_arith_gen"]["exact_match,none"]
    acc = results["tiny_capitals_mc"]["acc,none"]
    assert 0.0 <= gen <= 1.0 and 0.0 <= acc <= 1.0

    # generate_until: each answer is the engine's own greedy continuation, cut at a stop.
    samples = out["samples"]["tiny_arith_gen"]
    assert len(samples) == 8
    tok = live.llm.tokenizer
    for s in samples:
        prompt = s["arguments"][0][0]
        (want,) = live.llm.generate(
            [tok.encode(prompt)], SamplingParams(temperature=0, max_tokens=4, stop=["\n", "="])
        )
        assert s["resps"][0][0] == want.outputs[0].text

    # multiple_choice: a finite log-likelihood per choice, from the server's echoed logprobs.
    samples = out["samples"]["tiny_capitals_mc"]
    assert len(samples) == 8
    for s in samples:
        lls = [float(r[0][0]) for r in s["resps"]]
        assert len(lls) == 4 and all(math.isfinite(x) and x < 0 for x in lls)
    live.wait_pool_full()
