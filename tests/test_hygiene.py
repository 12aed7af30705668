"""Candidate hygiene: cut-off and looping candidates neither vote nor get selected; ties are
reported and broken by the documented rule (score, then earliest to reach the maximum)."""

from __future__ import annotations

import itertools

import pytest

from tests.conftest import make_tiny_model
from ttscale import LLM, SamplingParams
from ttscale.scorers import MeanLogprobScorer
from ttscale.strategies import SearchConfig
from ttscale.strategies.api import make_query, solve_many
from ttscale.tts.hygiene import Hygiene, drop_counts, is_degenerate, judge
from ttscale.tts.votes import vote_with_ties


def test_repetition_loops_are_degenerate():
    loop = [5, 6] * 40  # "no, no, no, ..."
    assert is_degenerate([1, 2, 3, *loop])
    assert is_degenerate([7, 8, 9, 10] * 20)
    assert not is_degenerate(list(range(100)))
    assert not is_degenerate([5, 6] * 10)  # too short to call it a loop


def test_cut_off_text_gives_no_answer_unless_asked():
    def extract(text):
        return text.split()[-1]

    on = Hygiene()
    assert judge("x = 2", [1, 2, 3], truncated=True, extract=extract, hygiene=on).dropped == (
        "truncated"
    )
    asked = Hygiene(extract_from_truncated=True)
    assert judge("x = 2", [1, 2, 3], True, extract, asked).answer == "2"
    off = Hygiene(enabled=False)
    assert judge("no no", [5, 6] * 40, True, extract, off).answer == "no"
    assert judge("no no", [5, 6] * 40, False, extract, on).dropped == "degenerate"
    none = judge("x", [1], False, lambda t: None, on)
    assert none.dropped == "no_answer" and none.answer is None
    verdicts = [judge("a", [1], True, extract, on), judge("a", [1], False, extract, on)]
    assert drop_counts(verdicts) == {"truncated": 1}


def test_ties_are_reported_and_broken_by_score_then_earliest():
    winner, totals, tied = vote_with_ties(["a", "b", "b", "a"])
    assert (winner, tied, totals) == ("b", ["a", "b"], {"a": 2.0, "b": 2.0})
    winner, _, tied = vote_with_ties(["a", "b", "b", "a"], scores=[0.9, 0.1, 0.2, 0.3])
    assert (winner, tied) == ("a", ["a", "b"])
    winner, _, tied = vote_with_ties(["a", "a", "b"])
    assert (winner, tied) == ("a", ["a"])
    assert vote_with_ties([None, None]) == (None, {}, [])


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-hygiene")
    make_tiny_model(path, "llama")
    return LLM(path, kv_cache_gb=0.01, block_size=4)


def test_nothing_finished_means_no_answer_and_says_so(llm):
    """The tiny model never finishes in 12 tokens: every candidate is cut off, so no strategy
    answers, each says why, and the old behaviour is one switch away."""
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=1, ignore_eos=True)
    search = SearchConfig(step_delimiter="\n\n", max_step_tokens=6, max_depth=2)

    def q(**kw):
        return make_query(
            llm,
            "1 + 1 =",
            params=params,
            search=search,
            extract=lambda t: "7",
            scorer=MeanLogprobScorer(),
            **kw,
        )

    for spec in ("greedy", "majority@4", "adaptive@8", "beam@4/2"):
        r = solve_many(llm, [q()], spec)[0]
        assert r.answer is None and r.extra["no_finished"] is True
        assert r.extra["dropped"] == {"truncated": len(r.candidates)}
        assert all(c.dropped == "truncated" and c.answer is None for c in r.candidates)
    old = solve_many(llm, [q(hygiene=Hygiene(enabled=False))], "majority@4")[0]
    assert old.answer == "7" and "no_finished" not in old.extra


def test_finished_candidates_vote_and_ties_are_reported(llm):
    """Stop tokens that cover most of the vocabulary make candidates finish; answers
    alternate so the vote ties, and the result names the tied answers."""
    stops = list(range(64, 320))
    params = SamplingParams(
        temperature=1.0, max_tokens=24, seed=2, stop_token_ids=stops, ignore_eos=True
    )
    counter = itertools.count()
    query = make_query(llm, "1 + 1 =", params=params, extract=lambda t: "ab"[next(counter) % 2])
    r = solve_many(llm, [query], "majority@4")[0]
    finished = [c for c in r.candidates if c.finish_reason == "stop"]
    assert finished, "the stop string should end some samples"
    kept = [c for c in r.candidates if c.dropped is None]
    assert len(kept) == len(finished)
    assert sum(r.votes.values()) == len(kept)
    # Answers alternate a, b, a, ... over the kept candidates: an even count ties.
    assert r.extra.get("tie", False) == (len(kept) % 2 == 0)
    if len(kept) % 2 == 0:
        assert r.extra["tied"] == ["a", "b"] and r.answer == "a"  # a reached the maximum first
