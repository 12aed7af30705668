"""The `probe` scorer inside strategies, on a tiny model: its scores equal the probe applied
to a full pass over each candidate (the training features), whether the rows were kept while
generating or embedded afterwards; strategies run with it; a probe for another model is
refused before any sampling.

Tolerance: 1e-4 on probabilities (fp32; the rows come from decode steps vs one prefill).
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny_model
from ttscale import LLM, SamplingParams
from ttscale.errors import ProbeError
from ttscale.scorers import load_scorer
from ttscale.scorers.base import ScoreContext
from ttscale.scorers.probe import ProbeScorer
from ttscale.strategies.api import make_query, solve_many
from ttscale.strategies.base import SearchConfig
from ttscale.tts.hygiene import Hygiene
from ttscale.tts.session import Session, drive
from ttscale.verifier.probe import FeatureSpec, Probe, model_hash
from ttscale.verifier.train import ProbeHead

PARAMS = SamplingParams(temperature=1.0, max_tokens=10, seed=4, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("probe_a"), tmp_path_factory.mktemp("probe_b")
    make_tiny_model(a, seed=0)
    make_tiny_model(b, seed=1)
    return a, b


@pytest.fixture(scope="module")
def llm(model_dirs):
    return LLM(model_dirs[0], kv_cache_gb=0.01, block_size=4)


def make_probe(model_dir, pooling: str, out) -> str:
    torch.manual_seed(0)
    head = ProbeHead(2 * 64, "mlp", hidden=8)
    head.mean.normal_()
    card = {
        "model": {"id": "tiny", "hash": model_hash(model_dir)},
        "features": {"pooling": pooling, "layers": [1, 2]},
        "head": {"type": "mlp", "dim": 128, "hidden": 8},
    }
    Probe(head, FeatureSpec(pooling, (1, 2)), card).save(out)
    return str(out)


@pytest.mark.parametrize("pooling", ["last", "mean", "answer"])
@pytest.mark.parametrize("kept", [True, False], ids=["kept-while-generating", "embedded"])
def test_scores_equal_the_probe_on_a_full_pass(llm, model_dirs, tmp_path, pooling, kept):
    scorer = load_scorer(f"probe:{make_probe(model_dirs[0], pooling, tmp_path)}", llm.source)
    prompt = llm.tokenizer.encode("1 + 2 =")
    session = Session(llm.engine, prompt)
    layers = scorer.needs(partial_paths=True)[1] if kept else None
    branches = drive(llm.engine, [session.sample(4, PARAMS, retain=kept, hidden_layers=layers)])[0]
    ctx = ScoreContext("1 + 2 =", session)
    got = drive(llm.engine, [scorer.score(ctx, branches)])[0]
    session.close()
    logits = scorer.probe.score(llm, prompt, [b.token_ids[len(prompt) :] for b in branches])
    want = torch.tensor(logits).sigmoid()
    assert (torch.tensor(got) - want).abs().max() < 1e-4
    llm.engine.check_integrity()
    assert llm.engine.kv_stats()["num_used_blocks"] == 0


def test_strategies_run_with_the_probe(llm, model_dirs, tmp_path):
    scorer = load_scorer(f"probe:{make_probe(model_dirs[0], 'answer', tmp_path)}", llm.source)
    query = make_query(llm, "1 + 2 =", params=PARAMS, scorer=scorer, hygiene=Hygiene(enabled=False))
    for spec in ("bon@4", "weighted@4", "beam@4/2", "tree@4"):
        result = solve_many(llm, [query], spec)[0]
        scores = [c.score for c in result.candidates]
        assert all(s is not None and 0 <= s <= 1 for s in scores)
        if spec == "bon@4":
            assert result.text == max(result.candidates, key=lambda c: c.score).text
    assert llm.engine.kv_stats()["num_used_blocks"] == 0


def test_a_probe_for_another_model_is_refused(llm, model_dirs, tmp_path):
    other = make_probe(model_dirs[1], "last", tmp_path)
    with pytest.raises(ProbeError, match="trained for model"):
        load_scorer(f"probe:{other}", llm.source)
    with pytest.raises(ProbeError, match="not found"):
        ProbeScorer.load(tmp_path / "nowhere", llm.source)


def make_answer_probe(model_dir, out) -> Probe:
    torch.manual_seed(1)
    head = ProbeHead(2 * 64 + 1, "mlp", hidden=8)
    head.mean.normal_()
    card = {
        "model": {"id": "tiny", "hash": model_hash(model_dir)},
        "features": {"input": "answer", "pooling": "mean", "layers": [1, 2]},
        "head": {"type": "mlp", "dim": 129, "hidden": 8},
    }
    Probe(head, FeatureSpec("mean", (1, 2), "answer"), card).save(out)
    return Probe.load(out)


def _last_char(text: str) -> str | None:
    return text.strip()[-1:] or None


def test_an_answer_probe_scores_each_distinct_answer_once(llm, model_dirs, tmp_path):
    """Branches with one answer share its score; the score is the head on the restatement's
    hidden states over the prompt plus the answer's log vote count; partial paths go to the
    paired text probe, and without one they are refused."""
    from ttscale.verifier.answers import restatement

    probe = make_answer_probe(model_dirs[0], tmp_path / "a")
    scorer = ProbeScorer(probe)
    assert scorer.needs(partial_paths=False) == (False, None)  # nothing kept while sampling
    prompt = llm.tokenizer.encode("1 + 2 =")
    session = Session(llm.engine, prompt)
    branches = drive(llm.engine, [session.sample(6, PARAMS)])[0]
    ctx = ScoreContext("1 + 2 =", session, _last_char)
    got = drive(llm.engine, [scorer.score(ctx, branches)])[0]
    session.close()
    answers = [_last_char(b.text) for b in branches]
    counts = {a: answers.count(a) for a in answers}
    for a in counts:
        tokens = restatement(
            lambda t: llm.tokenizer.encode(t, add_special_tokens=False), a, probe.features.template
        )
        h = llm.hidden_states([prompt + tokens], [1, 2], start=len(prompt))[0]
        want = torch.tensor(probe.score_answers([h], [counts[a]])).sigmoid().item()
        for b_answer, s in zip(answers, got, strict=True):
            if b_answer == a:
                assert s == pytest.approx(want, abs=1e-4)
    assert llm.engine.kv_stats()["num_used_blocks"] == 0

    text = Probe.load(make_probe(model_dirs[0], "last", tmp_path / "t"))
    paired = ProbeScorer(probe, partial=text)
    assert paired.needs(partial_paths=True) == (True, (1, 2))
    query = make_query(llm, "1 + 2 =", params=PARAMS, scorer=paired, hygiene=Hygiene(enabled=False))
    for spec in ("weighted@4", "bon@4", "beam@4/2", "tree@4"):
        result = solve_many(llm, [query], spec)[0]
        assert all(c.score is not None and 0 <= c.score <= 1 for c in result.candidates)
    steps = SearchConfig(max_step_tokens=3)  # 10 tokens: every path has unfinished steps
    alone = make_query(
        llm, "1 + 2 =", params=PARAMS, scorer=scorer, search=steps, hygiene=Hygiene(enabled=False)
    )
    with pytest.raises(ProbeError, match="partial paths"):
        solve_many(llm, [alone], "beam@4/2")
    with pytest.raises(ProbeError, match="must read text"):
        ProbeScorer(probe, partial=probe)
