"""The `likelihood` scorer and the likelihood probe on a tiny random model.

Reference: transformers' own forward on the same weights. The scorer's log P(answer | bare
question), computed by the engine over cached prefix blocks, must equal the sum of HF's
log-softmax over the answer tokens after the question within 1e-4 (fp32). Branches with one
answer share a score; a branch without an answer scores 0; partial paths are refused before
sampling; a likelihood probe is its logistic head on the log-likelihood and
hands partial paths to the text probe its card names.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_model, tiny_llm
from ttscale import SamplingParams
from ttscale.errors import ProbeError
from ttscale.scorers import load_scorer
from ttscale.scorers.base import ScoreContext
from ttscale.scorers.likelihood import ANSWER_TEMPLATE, AnswerLikelihoodScorer
from ttscale.strategies.api import make_query, solve_many
from ttscale.strategies.base import SearchConfig
from ttscale.tts.hygiene import Hygiene
from ttscale.tts.session import Session, drive
from ttscale.verifier.probe import FeatureSpec, Probe, model_hash
from ttscale.verifier.train import ProbeHead

QUESTION = "1 + 2 = 3 and 4 + 4 ="  # over one 4-token block: the prefix is shared from cache
PARAMS = SamplingParams(temperature=1.0, max_tokens=6, seed=3, ignore_eos=True)


@pytest.fixture(scope="module")
def hf_and_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lik")
    return make_tiny_model(path), path


@pytest.fixture(scope="module")
def llm(hf_and_dir):
    return tiny_llm(hf_and_dir[1])


def _last_char(text: str) -> str | None:
    return text.strip()[-1:] or None


def hf_loglik(hf, tok, question: str, answer: str) -> float:
    prefix = tok.encode(question)
    cont = tok.encode(ANSWER_TEMPLATE.format(answer=answer), add_special_tokens=False)
    with torch.no_grad():
        logits = hf(torch.tensor([prefix + cont])).logits[0].float()
    logp = torch.log_softmax(logits[len(prefix) - 1 : -1], -1)
    return float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum())


def sample(llm, n=8):
    session = Session(llm.engine, llm.tokenizer.encode(QUESTION))
    branches = drive(llm.engine, [session.sample(n, PARAMS)])[0]
    return session, branches


def test_scores_are_the_policys_answer_likelihood(llm, hf_and_dir):
    hf, _ = hf_and_dir
    session, branches = sample(llm)
    ctx = ScoreContext(QUESTION, session, _last_char)
    got = drive(llm.engine, [AnswerLikelihoodScorer().score(ctx, branches)])[0]
    session.close()
    answers = [_last_char(b.text) for b in branches]
    assert len(set(answers)) > 1  # several distinct answers: the shared prefix is exercised
    for a, s in zip(answers, got, strict=True):
        assert math.log(s) == pytest.approx(hf_loglik(hf, llm.tokenizer, QUESTION, a), abs=1e-4)
    assert llm.engine.kv_stats()["num_used_blocks"] == 0


def test_branches_without_an_answer_score_zero_and_partial_paths_are_refused(llm):
    session, branches = sample(llm, 3)
    ctx = ScoreContext(QUESTION, session, lambda text: None)
    assert drive(llm.engine, [AnswerLikelihoodScorer().score(ctx, branches)])[0] == [0.0] * 3
    session.close()
    with pytest.raises(ProbeError, match="partial paths"):
        AnswerLikelihoodScorer().needs(partial_paths=True)
    query = make_query(
        llm,
        QUESTION,
        params=PARAMS,
        scorer=load_scorer("likelihood"),
        search=SearchConfig(max_step_tokens=2),
        hygiene=Hygiene(enabled=False),
    )
    with pytest.raises(ProbeError, match="partial paths"):
        solve_many(llm, [query], "beam@4/2")
    for spec in ("weighted@4", "bon@4"):
        query = make_query(
            llm, QUESTION, params=PARAMS, scorer=load_scorer("likelihood"), hygiene=Hygiene(False)
        )
        result = solve_many(llm, [query], spec)[0]
        assert all(0 <= c.score <= 1 for c in result.candidates)


def make_likelihood_probe(model_dir, out, partial: str | None = None) -> Probe:
    head = ProbeHead(1, "logreg")
    with torch.no_grad():
        head.net[0].weight.fill_(0.7)
        head.net[0].bias.fill_(0.2)
        head.mean.fill_(-5.0)
        head.std.fill_(2.0)
    card = {
        "model": {"id": "tiny", "hash": model_hash(model_dir)},
        "features": {"input": "likelihood", "template": ANSWER_TEMPLATE, "pooling": "mean"},
        "head": {"type": "logreg", "dim": 1, "hidden": 64},
    }
    card["features"]["layers"] = [2]
    if partial is not None:
        card["partial_probe"] = partial
    probe = Probe(head, FeatureSpec("mean", (2,), "likelihood", ANSWER_TEMPLATE), card)
    probe.save(out)
    return probe


def make_text_probe(model_dir, out) -> None:
    head = ProbeHead(64, "logreg")
    card = {
        "model": {"id": "tiny", "hash": model_hash(model_dir)},
        "features": {"pooling": "last", "layers": [1]},
        "head": {"type": "logreg", "dim": 64, "hidden": 64},
    }
    Probe(head, FeatureSpec("last", (1,)), card).save(out)


def test_a_likelihood_probe_calibrates_likelihood_and_votes(llm, hf_and_dir, tmp_path):
    hf, model_dir = hf_and_dir
    make_text_probe(model_dir, tmp_path / "text")
    probe = make_likelihood_probe(model_dir, tmp_path / "lik", partial="text")
    scorer = load_scorer(f"probe:{tmp_path / 'lik'}", llm.source)
    assert scorer.text_probe is not None  # the card's partial probe, from the sibling folder
    assert scorer.needs(partial_paths=False) == (False, None)
    assert scorer.needs(partial_paths=True) == (True, (1,))
    session, branches = sample(llm)
    ctx = ScoreContext(QUESTION, session, _last_char)
    got = drive(llm.engine, [scorer.score(ctx, branches)])[0]
    # Finished branches none of which has an answer: all score 0 (no head over no rows).
    no_answers = ScoreContext(QUESTION, session, lambda text: None, lambda b: True)
    assert drive(llm.engine, [scorer.score(no_answers, branches)])[0] == [0.0] * len(branches)
    session.close()
    answers = [_last_char(b.text) for b in branches]
    for a, s in zip(answers, got, strict=True):
        ll = hf_loglik(hf, llm.tokenizer, QUESTION, a)
        want = torch.tensor(probe.score_likelihoods([ll])).sigmoid()
        assert s == pytest.approx(float(want), abs=1e-4)
    for spec in ("weighted@4", "beam@4/2", "tree@4"):
        query = make_query(llm, QUESTION, params=PARAMS, scorer=scorer, hygiene=Hygiene(False))
        result = solve_many(llm, [query], spec)[0]
        assert all(c.score is not None and 0 <= c.score <= 1 for c in result.candidates)
    assert llm.engine.kv_stats()["num_used_blocks"] == 0


def test_a_likelihood_table_search_fits_a_logistic_head():
    """One number per answer (the table's count column feeds the majority baseline only): the
    search tries logistic heads only and, where the likelihood tells the correct answer apart
    and the vote does not, beats the vote on new problems."""
    from ttscale.verifier.answer_fit import fit_and_test_answers, search_answer_probe
    from ttscale.verifier.answers import AnswerTable
    from ttscale.verifier.train import TrainConfig

    def table(seed, n=60, k=4):
        rng = np.random.default_rng(seed)
        rows, labels, groups = [], [], []
        for g in range(n):
            good = rng.integers(k)
            for a in range(k):
                loglik = rng.normal(-6, 1) + (2.5 if a == good else 0.0)
                rows.append([loglik, np.log(rng.integers(1, 5))])
                labels.append(a == good)
                groups.append(g)
        return AnswerTable(torch.tensor(rows), np.array(labels), np.array(groups), (), 0)

    trials = search_answer_probe(table(0), 60, TrainConfig(epochs=150), log=lambda s: None)
    assert {t.config.head for t in trials} == {"logreg"} and all(t.layers == () for t in trials)
    _, report = fit_and_test_answers(table(1), table(2), 60, (), trials[0].config)
    assert report["probe"]["accuracy"] > report["majority"]["accuracy"] + 0.3


def test_train_verifier_searches_the_template_and_saves_a_loadable_probe(llm, tmp_path):
    """End to end on the tiny model (its answers are noise: this checks the plumbing): every
    template is tried on the training problems, the card names the chosen one, and the saved
    probe loads and scores with it."""
    from ttscale.tasks import load_task
    from ttscale.verifier.likelihood import LIKELIHOOD_TEMPLATES
    from ttscale.verifier.pipeline import VerifierRun, train_verifier

    run = VerifierRun(
        task="arithmetic",
        n_problems=20,
        samples=4,
        temperature=1.0,
        out=tmp_path / "probe",
        test_problems=10,
        max_tokens=8,
        input="likelihood",
        data_dir=tmp_path / "data",
        epochs=20,
    )
    _, card = train_verifier(llm, load_task("arithmetic"), run, log=lambda s: None)
    assert set(card["search"]["templates"]) == set(LIKELIHOOD_TEMPLATES)
    assert card["features"]["input"] == "likelihood"
    assert card["features"]["template"] in LIKELIHOOD_TEMPLATES
    assert card["head"]["dim"] == 1 and "--input likelihood" in card["command"]
    loaded = load_scorer(f"probe:{tmp_path / 'probe'}", llm.source)
    assert loaded.probe.features.template == card["features"]["template"]
