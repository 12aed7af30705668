"""The probe verifier: data labels, features, training, metrics, files and refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ttscale.errors import ProbeError
from ttscale.tasks import Problem, Task
from ttscale.verifier.data import (
    Candidate,
    ProblemSamples,
    build_dataset,
    check_task_has_checker,
    read_dataset,
    sample_problems,
)
from ttscale.verifier.features import answer_start, pool
from ttscale.verifier.fit import FeatureTable, search, within_auroc
from ttscale.verifier.metrics import ProblemView, auroc, evaluate, mcnemar, select
from ttscale.verifier.pipeline import VerifierRun, default_layers
from ttscale.verifier.probe import FeatureSpec, Probe, model_hash
from ttscale.verifier.train import (
    ProbeHead,
    TrainConfig,
    cross_val_scores,
    group_folds,
    train_head,
    within_pairs,
)

from .conftest import make_tiny_model


class EchoTask(Task):
    """Numeric problems whose answer is always "7" (any completion that says 7 is right)."""

    name = "echo"
    family = "numeric"

    def __init__(self, answer: str = "7") -> None:
        self.answer = answer

    def problems(self, n: int, seed: int = 0) -> list[Problem]:
        return [Problem(f"echo:s{seed}:{i}", f"Say {i}", self.answer) for i in range(n)]


# ---- synthetic data ---------------------------------------------------------------------------


def synthetic(n_problems=60, k=8, dim=16, seed=0, difficulty_scale=3.0):
    """Features = problem difficulty (shared by its candidates, dominant) + a weak per-candidate
    correctness direction. Pooled, difficulty explains most labels; within a problem only the
    correctness direction ranks."""
    rng = np.random.default_rng(seed)
    labels, groups, rows = [], [], []
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    for g in range(n_problems):
        ease = rng.normal()
        p = 1 / (1 + np.exp(-2 * ease))
        for _ in range(k):
            y = rng.random() < p
            x = rng.normal(size=dim) + difficulty_scale * ease * np.eye(dim)[0]
            x += (2.5 if y else -2.5) * direction
            labels.append(y)
            groups.append(g)
            rows.append(x)
    return torch.tensor(np.array(rows), dtype=torch.float32), np.array(labels), np.array(groups)


def test_auroc_known_values_and_ties():
    assert auroc([0.1, 0.9], [False, True]) == 1.0
    assert auroc([0.9, 0.1], [False, True]) == 0.0
    assert auroc([0.5, 0.5, 0.5], [False, True, True]) == 0.5
    assert auroc([1, 2, 3], [True, True, True]) is None


@pytest.mark.parametrize("head", ["logreg", "mlp"])
@pytest.mark.parametrize("loss", ["bce", "pairwise", "both", "listwise"])
def test_training_recovers_a_separable_signal(head, loss):
    # Listwise learns from problems with both kinds of candidates only: give it more problems.
    x, y, g = synthetic(n_problems=200 if loss == "listwise" else 60, seed=1)
    model = train_head(x, y, g, TrainConfig(head=head, loss=loss, epochs=200, seed=0))
    xt, yt, gt = synthetic(seed=2)
    with torch.no_grad():
        s = model(xt).numpy()
    if loss == "listwise":
        # Softmax mass on the correct rows is a top-1 objective (one correct answer among a
        # problem's distinct answers): it need not order the other correct rows, so check the
        # top row of each problem that has both kinds.
        mixed = [p for p in np.unique(gt) if 0 < yt[gt == p].sum() < (gt == p).sum()]
        top_right = [yt[gt == p][np.argmax(s[gt == p])] for p in mixed]
        assert np.mean(top_right) > 0.8  # every loss gets 0.87-0.89 here (noise)
        return
    assert auroc(s, yt) > 0.9
    assert within_auroc(yt, gt, s) > 0.9


def test_training_is_deterministic():
    x, y, g = synthetic(seed=3)
    cfg = TrainConfig(head="mlp", loss="both", epochs=50, seed=5)
    a, b = train_head(x, y, g, cfg), train_head(x, y, g, cfg)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_within_pairs_stay_inside_a_problem():
    y = np.array([True, False, False, True, True, False])
    g = np.array([0, 0, 0, 1, 1, 2])
    pairs = within_pairs(y, g).tolist()
    assert sorted(pairs) == [[0, 1], [0, 2]]  # problem 1 all right, problem 2 all wrong


def test_group_folds_never_leak_a_problem():
    _, _, g = synthetic(n_problems=37, seed=4)
    folds = group_folds(g, 4, seed=0)
    flat = np.concatenate(folds)
    assert sorted(flat.tolist()) == list(range(37))  # every problem in exactly one fold
    seen_val = np.zeros(len(g), dtype=int)
    for fold in folds:
        val = np.isin(g, fold)
        seen_val += val
        assert not set(g[val]) & set(g[~val])
    assert (seen_val == 1).all()
    with pytest.raises(ValueError, match="folds"):
        group_folds(np.array([0, 0, 1]), 3)


def test_cross_val_scores_come_from_heads_that_never_saw_the_problem():
    x, y, g = synthetic(n_problems=40, seed=5)
    # Memorizable labels: a feature that is the problem index would leak if splits mixed.
    folds = group_folds(g, 4)
    s = cross_val_scores(x, y, g, TrainConfig(epochs=100), folds)
    assert s.shape == (len(y),) and np.isfinite(s).all()
    assert within_auroc(y, g, s) > 0.85


# ---- metrics ----------------------------------------------------------------------------------


def test_selection_rules_on_one_problem():
    view = ProblemView(
        answers=["3", "3", "5", "5", "5", None],
        correct=[True, True, False, False, False, False],
        scores=[4.0, 3.0, -4.0, -4.0, -4.0, 9.0],
        finished=[True, True, True, True, True, False],
        greedy_correct=False,
    )
    raw = select(view)
    assert raw == {
        "greedy": False,
        "majority": False,
        "top1": False,
        "weighted": True,
        "weighted_softmax": True,
        "pass": True,
    }
    clean = select(view, hygiene=True)  # the cut-off candidate no longer wins top-1
    assert clean["top1"] is True


def test_mcnemar_and_evaluate_shapes():
    t = mcnemar([True] * 10 + [False] * 5, [False] * 10 + [False] * 5)
    assert t["wins"] == 10 and t["losses"] == 0 and t["p_value"] < 0.01
    views = [
        ProblemView(["1", "2"], [True, False], [1.0, 0.0], [True, True], g % 2 == 0)
        for g in range(20)
    ]
    rep = evaluate(views)
    assert rep["accuracy"]["top1"]["accuracy"] == 1.0
    assert rep["accuracy"]["greedy"]["accuracy"] == 0.5
    assert rep["within_auroc"] == 1.0 and rep["mixed_problems"] == 20
    lo, hi = rep["accuracy"]["greedy"]["lo"], rep["accuracy"]["greedy"]["hi"]
    assert 0.2 < lo < 0.5 < hi < 0.8


# ---- features ---------------------------------------------------------------------------------


def test_answer_start_and_pooling():
    pieces = {1: "2 + 3", 2: " = 5.", 3: "\nAnswer", 4: ":", 5: " 5", 6: ""}
    ids = [1, 2, 3, 4, 5, 6]
    assert answer_start(pieces.__getitem__, ids) == 2
    assert answer_start(pieces.__getitem__, [1, 2]) == 1  # no marker: the last token
    h = torch.arange(7 * 2 * 3, dtype=torch.float32).reshape(7, 2, 3)  # 3 prompt + 4 answer rows
    out = pool(h, prompt_len=3, span_start=2, poolings=("last", "mean", "answer"))
    assert out.shape == (3, 2, 3)
    assert torch.equal(out[0], h[-1])
    assert torch.equal(out[1], h[3:].mean(0))
    assert torch.equal(out[2], h[5:].mean(0))
    with pytest.raises(ValueError, match="pooling"):
        pool(h, 3, 0, ("max",))


def _table(n_problems=30, k=6, layers=(1, 2), seed=0) -> FeatureTable:
    x, y, g = synthetic(n_problems, k, dim=8, seed=seed)
    items = []
    for p in range(n_problems):
        cands = [
            Candidate([1], "x", "1" if y[i] else "2", bool(y[i]), "stop", -1.0)
            for i in np.flatnonzero(g == p)
        ]
        items.append(ProblemSamples(f"p{p}", f"q{p}", "1", [0], cands[0], cands))
    # Layer 2 carries the signal, layer 1 is noise; poolings are copies.
    noise = torch.randn(len(y), 8, generator=torch.Generator().manual_seed(seed))
    per_layer = {1: noise, 2: x}
    feats = torch.stack([torch.stack([per_layer[layer] for layer in layers], 1)] * 3, 1).to(
        torch.float16
    )
    return FeatureTable(items, feats, ("last", "mean", "answer"), layers)


def test_search_prefers_the_informative_layer():
    trials = search(
        _table(),
        TrainConfig(epochs=60),
        folds=3,
        log=lambda s: None,
        heads=("logreg",),
        losses=("pairwise",),
    )
    assert 2 in trials[0].spec.layers
    assert trials[0].within_auroc > 0.8
    assert min(t.within_auroc for t in trials if t.spec.layers == (1,)) < 0.7


# ---- probe files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("model_a"), tmp_path_factory.mktemp("model_b")
    make_tiny_model(a, seed=0)
    make_tiny_model(b, seed=1)
    return a, b


def _probe(model_dir, head="mlp") -> Probe:
    torch.manual_seed(0)
    h = ProbeHead(2 * 64, head, hidden=8)
    h.mean.normal_()
    card = {
        "model": {"id": "tiny", "hash": model_hash(model_dir)},
        "features": {"pooling": "last", "layers": [1, 2]},
        "head": {"type": head, "dim": 128, "hidden": 8},
    }
    return Probe(h, FeatureSpec("last", (1, 2)), card)


def test_model_hash_tells_models_apart(two_models, tmp_path):
    a, b = two_models
    assert model_hash(a) == model_hash(a)
    assert model_hash(a) != model_hash(b)
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    assert model_hash(copy) == model_hash(a)  # content, not location


def test_probe_round_trip_and_refusals(two_models, tmp_path):
    a, b = two_models
    probe = _probe(a)
    probe.save(tmp_path / "p")
    hidden = [torch.randn(9, 2, 64) for _ in range(3)]
    loaded = Probe.load(tmp_path / "p", model_source=a)
    assert loaded.score_hidden(hidden, 4, [0, 1, 2]) == probe.score_hidden(hidden, 4, [0, 1, 2])
    assert loaded.card == probe.card

    with pytest.raises(ProbeError, match="trained for model 'tiny'"):
        Probe.load(tmp_path / "p", model_source=b)

    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "p", bad)
    (bad / "probe.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(ProbeError, match="not a readable safetensors"):
        Probe.load(bad)
    (bad / "card.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ProbeError, match="not a valid probe card"):
        Probe.load(bad)
    card = json.loads((tmp_path / "p" / "card.json").read_text())
    card["head"]["dim"] = 7
    shutil.copy(tmp_path / "p" / "probe.safetensors", bad / "probe.safetensors")
    (bad / "card.json").write_text(json.dumps(card))
    with pytest.raises(ProbeError, match="does not match its card"):
        Probe.load(bad)
    with pytest.raises(ProbeError, match="not found"):
        Probe.load(tmp_path / "missing")


# ---- data and bad input -----------------------------------------------------------------------


def test_a_task_without_references_is_refused():
    task = EchoTask(answer="")
    with pytest.raises(ValueError, match="no checker"):
        check_task_has_checker(task, task.problems(3))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("n_problems", 5, "too few"),
        ("samples", 1, "samples"),
        ("temperature", 0.0, "temp"),
        ("test_problems", 2, "test-problems"),
    ],
)
def test_run_settings_are_validated(field, value, match, tmp_path):
    kwargs = dict(task="arithmetic", n_problems=100, samples=8, temperature=0.7, out=tmp_path)
    kwargs[field] = value
    with pytest.raises(ValueError, match=match):
        VerifierRun(**kwargs)
    ok = VerifierRun(task="arithmetic", n_problems=100, samples=8, temperature=0.7, out=tmp_path)
    hard = VerifierRun(
        task="basic_arithmetic", n_problems=100, samples=8, temperature=0.7, out=tmp_path,
        difficulty="medium",
    )  # fmt: skip
    assert "--task basic_arithmetic --difficulty medium" in hard.command()
    assert "--difficulty" not in ok.command()
    assert "--n-problems 100" in ok.command()


def test_default_layers():
    assert default_layers(30) == (10, 13, 16, 19, 22, 25, 28, 30)
    assert default_layers(2)[-1] == 2


def test_sampling_labels_candidates_with_the_checker(llm, tmp_path):
    task = EchoTask()
    items = sample_problems(
        llm, task, task.problems(2), samples=3, temperature=1.0, max_tokens=6, seed=1
    )
    assert [len(it.candidates) for it in items] == [3, 3]
    for it in items:
        for c in [it.greedy, *it.candidates]:
            assert c.answer == task.extract_answer(c.text)
            assert c.correct == task.is_correct(Problem("x", "q", "7"), c.answer)
            assert 1 <= len(c.token_ids) <= 6
    # Cached and resumable: the second call samples nothing and reads the same data.
    path = tmp_path / "d.jsonl"
    first = build_dataset(llm, task, 3, 2, 1.0, path, max_tokens=5, seed=1, log=lambda s: None)
    again = build_dataset(llm, task, 3, 2, 1.0, path, max_tokens=5, seed=1, log=lambda s: None)
    assert [x.to_dict() for x in first] == [x.to_dict() for x in again]
    assert len(read_dataset(path)[1]) == 3
    with pytest.raises(ValueError, match="other settings"):
        build_dataset(llm, task, 3, 2, 0.5, path, max_tokens=5, seed=1, log=lambda s: None)


def test_features_and_probe_scores_come_from_the_engine(llm, model_dir, tmp_path):
    from ttscale.verifier.features import extract_features

    task = EchoTask()
    items = sample_problems(
        llm, task, task.problems(2), samples=3, temperature=1.0, max_tokens=6, seed=2
    )
    feats = extract_features(llm, items, [1, 2], ("last", "mean"), log=lambda s: None)
    assert feats.shape == (6, 2, 2, 64) and feats.dtype == torch.float16
    # The last pooled row equals the engine's own hidden state of the full sequence.
    it, c = items[1], items[1].candidates[2]
    h = llm.hidden_states([it.prompt_token_ids + c.token_ids], [1, 2])[0]
    torch.testing.assert_close(feats[5, 0].float(), h[-1].float(), atol=2e-3, rtol=2e-3)

    probe = _probe(model_dir, head="logreg")
    probe.save(tmp_path / "p")
    loaded = Probe.load(tmp_path / "p", model_source=llm.source)
    scores = loaded.score(llm, it.prompt_token_ids, [x.token_ids for x in it.candidates])
    direct = loaded.head(feats[3:6, 0].float().reshape(3, -1)).tolist()
    assert scores == pytest.approx(direct, abs=1e-2)


def test_step_cuts_and_prefix_rows():
    from ttscale.verifier.features import prefix_rows
    from ttscale.verifier.process import step_cuts

    pieces = {1: "2 + 3", 2: " = 5.\n", 3: "So", 4: "\n", 5: "Answer: 5", 6: "\n"}
    assert step_cuts(pieces.__getitem__, [1, 2, 3, 4, 5, 6]) == [2, 4]  # not the full one
    assert step_cuts(pieces.__getitem__, [1, 2, 3, 4, 5, 6], max_steps=1) == [4]
    h = torch.randn(6, 2, 3)
    assert torch.equal(prefix_rows(h, [2, 4]), h[[1, 3]])


def test_process_labels_are_rollout_success_rates(llm):
    from ttscale.verifier.process import process_labels

    task = EchoTask()
    problems = task.problems(2)
    items = sample_problems(llm, task, problems, samples=2, temperature=1.0, max_tokens=12, seed=3)
    labels = process_labels(llm, task, problems, items, rollouts=3, max_tokens=12)
    for lab in labels:
        assert lab.rollouts == 3 and lab.value in (0.0, 1 / 3, 2 / 3, 1.0)
        assert (
            1
            <= lab.cut
            < len(items[int(lab.problem_id.split(":")[-1])].candidates[lab.candidate].token_ids)
        )
    with pytest.raises(ValueError, match="does not match"):
        process_labels(llm, task, problems[::-1], items)


def test_soft_targets_train():
    x, y, g = synthetic(seed=6)
    soft = np.where(y, 0.8, 0.1)
    model = train_head(x, soft, g, TrainConfig(loss="bce", epochs=100))
    with torch.no_grad():
        assert auroc(model(x).numpy(), y) > 0.9


def test_heads_are_calibrated_whatever_the_loss():
    from ttscale.verifier.metrics import calibration

    x, y, g = synthetic(seed=7)
    for loss in ("pairwise", "bce"):
        model = train_head(x, y, g, TrainConfig(loss=loss, epochs=100))
        with torch.no_grad():
            p = torch.sigmoid(model(x)).numpy()
        assert abs(p.mean() - y.mean()) < 0.03  # the base rate, not 0.5 or a balanced one
        assert calibration(model(x).detach().numpy(), y)["ece"] < 0.08


def test_train_verifier_refuses_bad_input_before_loading_a_model(monkeypatch, tmp_path):
    import typer
    from typer.testing import CliRunner

    import ttscale.llm
    from ttscale.verifier.cli import train_verifier

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(ttscale.llm, "LLM", no_model)
    app = typer.Typer()
    app.command()(train_verifier)
    runner = CliRunner()
    jsonl = tmp_path / "qs.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(300))
    )
    cases = [
        (["--task", "no_such_task"], "unknown task"),
        (["--task", "arithmetic", "--n-problems", "5"], "too few"),
        (["--task", str(jsonl), "--n-problems", "100", "--test-problems", "50"], "same problems"),
        (["--task", str(jsonl), "--n-problems", "400"], "too few problems to hold out"),
    ]
    for args, message in cases:
        result = runner.invoke(app, [*args, "--out", str(tmp_path / "p")])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split())


def test_answer_groups_follow_candidate_hygiene():
    from ttscale.verifier.answers import answer_groups
    from ttscale.verifier.data import Candidate, ProblemSamples

    def cand(answer, finish="stop"):
        return Candidate([1], "t", answer, answer == "4", finish, -1.0)

    item = ProblemSamples(
        "p",
        "q",
        "4",
        [1],
        cand("4"),
        [cand("4"), cand("5", "length"), cand(None), cand("3"), cand("4")],
    )
    # Cut-off and answerless candidates take no part; first-seen order.
    assert answer_groups(item) == {"4": [0, 4], "3": [3]}
    # Unless every candidate was cut off.
    item.candidates = [cand("5", "length"), cand("6", "length"), cand("5", "length")]
    assert answer_groups(item) == {"5": [0, 2], "6": [1]}


def test_answer_probe_search_and_test_on_a_synthetic_table():
    """A table whose layer 2 tells the correct answer apart (layer 1 is noise): the search
    picks layer 2 and the probe's top answer beats the vote count on held-out problems."""
    from ttscale.verifier.answer_fit import fit_and_test_answers, search_answer_probe
    from ttscale.verifier.answers import AnswerTable

    def table(seed, n=40, k=5, h=8):
        rng = np.random.default_rng(seed)
        rows, labels, groups = [], [], []
        for g in range(n):
            good = rng.integers(k)
            for a in range(k):
                y = a == good
                noise, signal = rng.normal(size=h), rng.normal(size=h)
                signal[0] += 3.0 if y else 0.0
                count = rng.integers(1, 4)  # the vote count says nothing here
                rows.append(np.concatenate([noise, signal, [np.log(count)]]))
                labels.append(y)
                groups.append(g)
        feats = torch.tensor(np.array(rows), dtype=torch.float16)
        return AnswerTable(feats, np.array(labels), np.array(groups), (1, 2), h)

    base = TrainConfig(epochs=150)
    trials = search_answer_probe(table(0), 40, base, folds=4, log=lambda s: None)
    assert 2 in trials[0].layers
    _, report = fit_and_test_answers(table(1), table(2), 40, trials[0].layers, trials[0].config)
    assert report["probe"]["accuracy"] > 0.8 > report["majority"]["accuracy"] + 0.3
    assert report["probe_vs_majority"]["wins"] > report["probe_vs_majority"]["losses"]


def test_folds_keep_a_repeated_question_together():
    groups = np.arange(12)
    questions = [f"q{i % 5}" for i in range(12)]  # q0..q4, asked 3, 3, 2, 2, 2 times
    folds = group_folds(groups, 3, seed=0, same=questions)
    assert sorted(np.concatenate(folds).tolist()) == list(range(12))
    for fold in folds:
        asked = {questions[i] for i in fold}
        others = {questions[i] for f in folds if f is not fold for i in f}
        assert not asked & others
    with pytest.raises(ValueError, match="distinct problems"):
        group_folds(groups, 6, same=questions)


def test_test_problems_that_ask_a_training_question_are_left_out():
    from ttscale.verifier.data import Candidate, ProblemSamples
    from ttscale.verifier.pipeline import _keep_problems, _unseen_test_problems

    def item(q, k=2):
        c = Candidate([1], "t", "1", True, "stop", -1.0)
        return ProblemSamples(q, q, "1", [1], c, [c] * k)

    train = [item("a"), item("b")]
    test = [item(q) for q in ("a", "c", "d", "b", "e", "f", "g", "h", "i", "j", "k", "l")]
    keep = _unseen_test_problems({"train": (train, None), "test": (test, None)}, lambda s: None)
    assert [test[i].question for i in keep] == list("cdefghijkl")
    feats = torch.arange(24, dtype=torch.float16).reshape(24, 1, 1, 1)
    table = _keep_problems(FeatureTable(test, feats, ("last",), (1,)), keep)
    assert [it.question for it in table.items] == list("cdefghijkl")
    assert table.feats[:2].flatten().tolist() == [2.0, 3.0]  # problem "c": rows 2 and 3
    with pytest.raises(ValueError, match="too few to hold out"):
        _unseen_test_problems({"train": (test, None), "test": (test, None)}, lambda s: None)
