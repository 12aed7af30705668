"""Run events (`ttscale.tts.events`, `ttscale.tts.watch`): a watched strategy run reports a
tree that matches what the strategy did, and watching changes nothing in its result."""

from __future__ import annotations

import pytest

from tests.conftest import assert_pool_full, make_tiny_model, tiny_llm
from ttscale import SamplingParams
from ttscale.scorers import MeanLogprobScorer
from ttscale.strategies import SearchConfig, make_strategy
from ttscale.strategies.api import make_query
from ttscale.tts.events import Event
from ttscale.tts.hygiene import Hygiene
from ttscale.tts.session import Session, drive, run_prompts
from ttscale.tts.watch import Watch


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_model(path, "qwen2")
    return tiny_llm(path)


def _query(llm):
    params = SamplingParams(temperature=1.0, max_tokens=16, seed=5)
    search = SearchConfig(step_delimiter=" ", max_step_tokens=4, max_depth=3)
    return make_query(
        llm,
        "12 + 30 =",
        params=params,
        search=search,
        scorer=MeanLogprobScorer(),
        hygiene=Hygiene(enabled=False),
    )


class HiddenStateScorer:
    """Scores from hidden states over the branches' KV (as the probe does): its embedding
    rows are engine sequences of the same requests, but not branches of the tree."""

    name = "hidden"

    def score(self, ctx, branches):
        states = yield from ctx.session.embed_last(branches, [0])
        return [0.0 if h is None else float(h.float().mean()) for h in states]


def _run(llm, spec: str, watched: bool, scorer=None):
    q = _query(llm)
    if scorer is not None:
        q.scorer = scorer
    events: list[Event] = []
    watch = Watch(events.append, llm.engine.held_blocks) if watched else None
    session = Session(llm.engine, q.prompt_token_ids, observer=watch)
    gen = make_strategy(spec).solve(session, q)
    if watch is not None:
        gen = watch.run(gen)
    (result,) = drive(llm.engine, [gen])
    assert_pool_full(llm)
    return result, [e.to_dict() for e in events]


def test_beam_events_describe_the_tree(llm):
    result, events = _run(llm, "beam@4/2", watched=True)
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "request" and events[0]["n"] == 4 and events[0]["retain"]
    assert kinds[-3:] == ["finished", "vote", "cost"]
    # Every fork's children share blocks with their parent and later report their step.
    nodes = {e["seq"]: e for e in events if e["kind"] == "step"}
    forks = [e for e in events if e["kind"] == "fork"]
    assert forks, "beam@4/2 at depth 3 forks"
    for f in forks:
        assert f["shared_blocks"] > 0 and f["parent"] in nodes
        for child in f["children"]:
            assert nodes[child]["parent"] == f["parent"]
            assert nodes[child]["depth"] == nodes[f["parent"]]["depth"] + 1
    roots = [n for n in nodes.values() if n["parent"] is None]
    assert len(roots) == 4 and all(r["shared_blocks"] > 0 for r in roots)
    # Each step was scored; pruned branches are reported dropped.
    scored = {e["seq"] for e in events if e["kind"] == "score"}
    assert scored == set(nodes)
    dropped = {s for e in events if e["kind"] == "drop" for s in e["seqs"]}
    assert dropped == set(nodes)  # at the end every branch has been released
    # The text reported token by token adds up to each step's text.
    streamed: dict[int, str] = {}
    for e in events:
        if e["kind"] == "tokens":
            streamed[e["seq"]] = streamed.get(e["seq"], "") + e["delta"]
    assert any(streamed.values())
    # The candidates name tree nodes; the vote and cost are the result's.
    finished = events[-3]
    assert [c["seq_id"] for c in finished["candidates"]] == [c.seq_id for c in result.candidates]
    assert all(c["seq_id"] in nodes for c in finished["candidates"])
    assert events[-2]["answer"] == result.answer
    assert events[-1]["stats"]["generated_tokens"] == result.stats.generated_tokens


def test_majority_events_and_vote_histogram(llm):
    result, events = _run(llm, "majority@4", watched=True)
    steps = [e for e in events if e["kind"] == "step"]
    assert len(steps) == 4 and all(s["parent"] is None for s in steps)
    done = next(e for e in events if e["kind"] == "request_done")
    assert done["computed_prompt_tokens"] + done["cached_prompt_tokens"] > 0
    assert events[-2]["votes"] == result.votes
    tokens = [e for e in events if e["kind"] == "tokens"]
    assert {e["seq"] for e in tokens} >= {s["seq"] for s in steps}


class JudgeLikeScorer:
    """Scores with separate engine requests of the same session (as the LLM judge does)."""

    name = "judge-like"

    def score(self, ctx, branches):
        params = SamplingParams(max_tokens=3, temperature=0.0)
        prompts = [[5, 6, 7, 8]] * len(branches)
        seqs = yield from run_prompts(ctx.session.engine, prompts, params, "jl", ctx.session)
        return [float(len(s.token_ids)) for s in seqs]


@pytest.mark.parametrize("scorer", [HiddenStateScorer(), JudgeLikeScorer()])
def test_scorer_work_is_not_reported_as_branches(llm, scorer):
    _, events = _run(llm, "beam@4/2", watched=True, scorer=scorer)
    steps = {e["seq"] for e in events if e["kind"] == "step"}
    forked = {c for e in events if e["kind"] == "fork" for c in e["children"]}
    progressed = {e["seq"] for e in events if e["kind"] == "tokens"}
    assert progressed and progressed <= steps | forked


@pytest.mark.parametrize("spec", ["beam@4/2", "majority@4"])
def test_watching_changes_nothing(llm, spec):
    plain, _ = _run(llm, spec, watched=False)
    watched, _ = _run(llm, spec, watched=True)
    assert [c.text for c in plain.candidates] == [c.text for c in watched.candidates]
    assert plain.answer == watched.answer and plain.votes == watched.votes
