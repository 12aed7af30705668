"""The one strategy-spec grammar: every command accepts the same spellings, aliases resolve to
one canonical name, and near misses get a suggestion."""

from __future__ import annotations

import pytest

from ttscale.cost.analytic import strategy_cost_profile
from ttscale.errors import StrategySpecError
from ttscale.strategies import make_strategy
from ttscale.strategy_spec import STRATEGY_NAMES, StrategySpec, parse_strategy_spec


@pytest.mark.parametrize(
    ("spec", "canonical", "parsed"),
    [
        ("greedy", "greedy", StrategySpec("greedy", 1)),
        ("greedy@1", "greedy", StrategySpec("greedy", 1)),
        ("sample", "sample", StrategySpec("sample", 1)),
        ("sample@1", "sample", StrategySpec("sample", 1)),
        # N independent samples is what majority@N draws: the same strategy.
        ("sample@8", "majority@8", StrategySpec("majority", 8)),
        ("majority@16", "majority@16", StrategySpec("majority", 16)),
        ("MAJORITY@8", "majority@8", StrategySpec("majority", 8)),
        ("  Weighted@16 ", "weighted@16", StrategySpec("weighted", 16)),
        ("vote@4", "majority@4", StrategySpec("majority", 4)),
        ("bon@32", "bon@32", StrategySpec("bon", 32)),
        ("best-of@8", "bon@8", StrategySpec("bon", 8)),
        ("Best_Of@8", "bon@8", StrategySpec("bon", 8)),
        ("bestofn@8", "bon@8", StrategySpec("bon", 8)),
        ("beam@16/4", "beam@16/4", StrategySpec("beam", 16, 4)),
        ("beam@16", "beam@16", StrategySpec("beam", 16)),  # priced by `cost`, not runnable
        ("DVTS@16/4", "dvts@16/4", StrategySpec("dvts", 16, 4)),
        ("tree@8", "tree@8", StrategySpec("tree", 8)),
        ("adaptive@64", "adaptive@64", StrategySpec("adaptive", 64)),
    ],
)
def test_accepted_specs_and_their_canonical_form(spec, canonical, parsed) -> None:
    got = parse_strategy_spec(spec)
    assert got == parsed and got.canonical == canonical and str(got) == canonical
    assert parse_strategy_spec(canonical) == got  # canonical forms are fixed points


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("majorty@8", "did you mean majority@8?"),
        ("bean@16/4", "did you mean beam@16/4?"),
        ("best-off@4", "did you mean bon@4?"),
        ("nope@3", "unknown strategy 'nope'"),
        ("majority", "majority needs @N"),
        ("greedy@2", "greedy takes no @N"),
        ("bon@4/2", "takes no /M"),
        ("beam@4/8", "M must be in"),
        ("bon@0", "must be >= 1"),
        ("majority@x", "expected NAME"),
        ("", "expected NAME"),
        ("majority@16:x=0.5", "bad option 'x=0.5'"),
        ("majority@16:t=hot", "t must be a number"),
        ("majority@16:t=-1", "t must be in .0, 100."),
        ("bon@16:p=1.5", "p must be in .0, 1."),
        ("greedy:t=0.5", "greedy takes no sampling options"),
        ("majority@16:", "nothing after"),
    ],
)
def test_rejected_specs_say_why(spec, message) -> None:
    with pytest.raises(StrategySpecError, match=message.replace("?", r"\?")) as e:
        parse_strategy_spec(spec)
    assert isinstance(e.value, ValueError)  # callers that catch ValueError keep working


def test_every_name_has_a_runnable_example() -> None:
    for name in STRATEGY_NAMES:
        spec = {"beam": "beam@8/4", "dvts": "dvts@8/4"}.get(name, name)
        if name not in ("greedy", "sample", "beam", "dvts"):
            spec = f"{name}@8"
        assert make_strategy(spec).spec == spec
        assert strategy_cost_profile(spec).kind == name


def test_solve_and_cost_accept_the_same_spellings() -> None:
    for spec in ("MAJORITY@8", "sample@4", "best-of@8", "vote@2", "greedy@1", "Beam@16/4"):
        profile = strategy_cost_profile(spec)
        strategy = make_strategy(spec)
        assert strategy.spec == spec  # results stay labelled as written
        assert profile.spec == parse_strategy_spec(spec)
    # sample@4 runs (and is priced) as four samples with a vote.
    assert make_strategy("sample@4").n == 4 and make_strategy("sample@4").select == "majority"
    assert strategy_cost_profile("best-of@8").to_dict()["spec"] == "bon@8"


def test_what_only_a_runnable_search_needs_is_checked_when_built() -> None:
    assert strategy_cost_profile("beam@16").num_samples == 16
    with pytest.raises(StrategySpecError, match="needs @N/M"):
        make_strategy("beam@16")
    with pytest.raises(StrategySpecError, match="multiple of M"):
        make_strategy("dvts@6/4")


def test_sampling_options_are_part_of_the_spec() -> None:
    spec = parse_strategy_spec("Majority@16:T=0.5, p=0.9")
    assert (spec.name, spec.n, spec.temperature, spec.top_p) == ("majority", 16, 0.5, 0.9)
    assert spec.canonical == "majority@16:t=0.5,p=0.9"
    assert spec.sampling == {"temperature": 0.5, "top_p": 0.9}
    assert parse_strategy_spec("bon@8").sampling == {}
    strategy = make_strategy("bon@8:t=0.3")
    assert strategy.sampling_overrides == {"temperature": 0.3}
    assert strategy_cost_profile("bon@8:t=0.3").kind == "bon"  # the cost model ignores them
