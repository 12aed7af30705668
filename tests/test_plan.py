"""The compute-optimal planner: knapsack, difficulty bins, maj@k curves, saturation, the probe,
and pilot -> plan -> validate on a tiny random model (plus the CLI).

The tiny model's completions are noise, so the test task judges them by a property of the text
(its length mod 4) and accepts a per-problem set of residues: problems accepting more residues
are easier, so pilot pass rates vary from 0 to 1.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ttscale import SamplingParams
from ttscale.plan import (
    InfeasibleBudget,
    Pilot,
    PilotProblem,
    TokenTimeModel,
    difficulty_thresholds,
    knapsack,
    make_plan,
    pilot,
    plan_table,
    saturation_n,
    validate,
    validation_table,
)
from ttscale.plan.bins import bin_of
from ttscale.plan.cli import make_app
from ttscale.plan.curves import (
    maj_at_k_fair,
    marginal_pass_gain,
    parse_candidates,
    pass_at_k_ext,
    plugin_maj_at_k,
)
from ttscale.plan.probe import calibrate_probe, simulate_probe
from ttscale.tasks import JsonlTask
from ttscale.tts.hygiene import Hygiene
from ttscale.tts.votes import majority_vote

# ---- the knapsack -----------------------------------------------------------------------------


def brute_force(bins, budget):
    """Best (accuracy, cost) over every combination within the budget, or None."""
    best = None
    live = [(s, opts) for s, opts in bins if s > 0]
    for combo in itertools.product(*(range(len(opts)) for _, opts in live)):
        acc = sum(s * opts[j][0] for (s, opts), j in zip(live, combo, strict=True))
        cost = sum(s * opts[j][1] for (s, opts), j in zip(live, combo, strict=True))
        if cost <= budget + 1e-12 and (best is None or acc > best[0] + 1e-12):
            best = (acc, cost)
    return best


def test_knapsack_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        n_bins = rng.randint(1, 4)
        shares = [rng.random() for _ in range(n_bins)]
        shares = [s / sum(shares) for s in shares]
        bins = [
            (s, [(rng.random(), rng.uniform(0.1, 5.0)) for _ in range(rng.randint(1, 5))])
            for s in shares
        ]
        budget = rng.uniform(0.0, 4.0)
        got = knapsack(bins, budget)
        want = brute_force(bins, budget)
        if want is None:
            assert got is None
            continue
        choices, acc, cost = got
        assert acc == pytest.approx(want[0], abs=1e-9)
        assert cost <= budget + 1e-9
        # The reported totals are those of the reported choices.
        assert acc == pytest.approx(
            sum(s * o[j][0] for (s, o), j in zip(bins, choices, strict=True))
        )
        assert cost == pytest.approx(
            sum(s * o[j][1] for (s, o), j in zip(bins, choices, strict=True))
        )


# Hand-made curves: (accuracy, seconds) of greedy, majority@4, majority@16 per bin.
EASY = [(0.90, 1.0), (0.97, 3.0), (0.98, 9.0)]
MEDIUM = [(0.40, 1.0), (0.60, 3.0), (0.75, 9.0)]
HARD = [(0.05, 1.0), (0.06, 3.0), (0.07, 9.0)]
CURVES = [(0.3, HARD), (0.4, MEDIUM), (0.3, EASY)]


def test_knapsack_tight_loose_and_infeasible():
    # Tight: only greedy everywhere fits.
    choices, acc, cost = knapsack(CURVES, 1.0)
    assert choices == [0, 0, 0] and cost == pytest.approx(1.0)
    assert acc == pytest.approx(0.3 * 0.05 + 0.4 * 0.40 + 0.3 * 0.90)
    # A little more: the spare compute goes where it buys most, the medium bin.
    choices, _, cost = knapsack(CURVES, 1.8)
    assert choices == [0, 1, 0] and cost == pytest.approx(1.8)
    # Loose: more samples everywhere that gains.
    choices, _, _ = knapsack(CURVES, 100.0)
    assert choices == [2, 2, 2]
    assert knapsack(CURVES, 0.99) is None
    # Equal accuracy: the cheaper option; a bin with no problems picks nothing.
    choices, _, cost = knapsack([(1.0, [(0.5, 2.0), (0.5, 1.0)]), (0.0, [(1.0, 1.0)])], 10)
    assert choices == [1, None] and cost == pytest.approx(1.0)


# ---- a hand-made pilot ------------------------------------------------------------------------

# answers, reference: p = 1, 1/2, 1/4, 0.
HAND = [
    (["a", "a", "a", "a"], "a"),
    (["a", "b", "a", "c"], "a"),
    (["b", "b", "a", "c"], "a"),
    (["b", "c", "d", None], "a"),
]


def hand_pilot(direct_greedy: list[bool] | None = None) -> Pilot:
    """Every sample 10 tokens, prompts 10 tokens, 0.5 s per problem: 0.01 s per token, so
    majority@k costs 0.1 + 0.1 k."""
    problems = []
    for i, (answers, ref) in enumerate(HAND):
        p = PilotProblem(
            id=f"hand:{i}",
            question=f"q{i}",
            answers=list(answers),
            correct=[a == ref for a in answers],
            tokens=[10] * 4,
            prompt_tokens=10,
            computed_prompt_tokens=10,
            measured_time=0.25,
            wall_time=0.5,
        )
        problems.append(p)
    return Pilot(
        problems=problems,
        n_samples=4,
        seed=0,
        params={"temperature": 1.0, "max_tokens": 10, "seed": 0},
        task={"name": "hand"},
        model="none",
    )


def test_thresholds_and_bins():
    assert difficulty_thresholds([], 3) == pytest.approx([1 / 3, 2 / 3])
    assert [bin_of(p, [1 / 3, 2 / 3]) for p in (0.0, 0.25, 1 / 3, 0.5, 2 / 3, 1.0)] == [
        0, 0, 1, 1, 2, 2,
    ]  # fmt: skip
    # Quantiles: 9 problems, 3 per bin; ties stay together, so fewer edges when they collide.
    ps = [0, 0, 0.25, 0.5, 0.5, 0.75, 1, 1, 1]
    assert difficulty_thresholds(ps, 3, "quantile") == [0.5, 1.0]
    assert difficulty_thresholds([0, 0, 0, 0, 1], 3, "quantile") == [1.0]
    assert difficulty_thresholds(ps, 1) == []
    with pytest.raises(ValueError, match="binning"):
        difficulty_thresholds(ps, 3, "kmeans")


def test_maj_at_k_by_hand():
    # Problem 1 (a b a c, right: a). Pairs: {a,a} wins; {a,b} {a,c} (4 pairs) tie, half; {b,c}
    # loses -> (1 + 4 * 1/2) / 6. Triples: aba, aac win; abc, bac three-way ties -> 1/3 each.
    answers, right = HAND[1][0], {"a"}
    assert maj_at_k_fair(answers, right, 1) == pytest.approx(0.5)
    assert maj_at_k_fair(answers, right, 2) == pytest.approx(0.5)
    assert maj_at_k_fair(answers, right, 3) == pytest.approx((1 + 1 / 3 + 1 + 1 / 3) / 4)
    assert maj_at_k_fair(answers, right, 4) == 1.0
    # Problem 2 (b b a c): pairs {b,a} x2 and {a,c} tie -> 1.5 / 6; the full vote is b.
    assert maj_at_k_fair(HAND[2][0], {"a"}, 2) == pytest.approx(0.25)
    assert maj_at_k_fair(HAND[2][0], {"a"}, 4) == 0.0
    # None never votes: the all-None pair is wrong, the two others vote a.
    assert maj_at_k_fair([None, None, "a"], {"a"}, 2) == pytest.approx(2 / 3)
    # Even tie splitting = majority_vote averaged over sample orders (brute force).
    rng = random.Random(1)
    for _ in range(20):
        ans = [rng.choice("abc") for _ in range(5)]
        k = rng.randint(1, 5)
        total = count = 0
        for sub in itertools.combinations(range(5), k):
            for order in itertools.permutations(sub):
                total += majority_vote([ans[i] for i in order])[0] == "a"
                count += 1
        assert maj_at_k_fair(ans, {"a"}, k) == pytest.approx(total / count)


def test_extrapolation():
    assert plugin_maj_at_k(["a"] * 4, {"a"}, 9) == 1.0
    assert plugin_maj_at_k(["b"] * 4, {"a"}, 9) == 0.0
    # Three draws from {a, b} with equal odds: a wins with 2 or 3 of them -> 1/2.
    assert plugin_maj_at_k(["a", "b"], {"a"}, 3) == pytest.approx(0.5, abs=0.03)
    assert pass_at_k_ext(4, 1, 8) == pytest.approx(1 - 0.75**8)
    assert pass_at_k_ext(4, 1, 2) == pytest.approx(0.5)
    cands = parse_candidates("majority@16,greedy", 4, measured=["greedy"])
    assert cands[0].extrapolated and cands[1].measured and cands[1].samples == 1
    with pytest.raises(ValueError, match="extrapolates"):
        parse_candidates("majority@17", 4)
    with pytest.raises(ValueError, match="directly"):
        parse_candidates("beam@4/2", 4)
    with pytest.raises(ValueError):
        parse_candidates("majority@x", 4)


def test_saturation_by_hand():
    # p (1-p)^N < 0.01: p = 1/2 -> 2^-(N+1) < 0.01 -> N = 6; p = 0.1 -> 0.9^N < 0.1 -> N = 22.
    assert saturation_n([0.5]) == 6
    assert saturation_n([0.1]) == 22
    assert saturation_n([1.0]) == 1  # one sample is enough
    assert saturation_n([0.0]) == 0  # nothing to gain
    assert saturation_n([0.5, 0.0]) == 5  # mean gain 2^-(N+2) < 0.01
    assert saturation_n([0.5, 0.0], weights=[0, 0]) is None
    assert saturation_n([0.5], epsilon=0.1) == 3  # gains 0.5, 0.25, 0.125, then 0.0625
    # The gain is the step of pass@N = 1 - (1-p)^N.
    for p in (0.1, 0.5, 0.9):
        for n in (1, 3, 7):
            step = (1 - (1 - p) ** (n + 1)) - (1 - (1 - p) ** n)
            assert marginal_pass_gain(p, n) == pytest.approx(step)


def test_plan_curves_by_hand():
    pl = hand_pilot()
    assert TokenTimeModel.fit(pl).sec_per_token == pytest.approx(0.01)
    cands = "majority@1,majority@2,majority@4"
    # Oracle bins (true pilot difficulty): easy = {0}, medium = {1}, hard = {2, 3}.
    plan = make_plan(pl, 0.35 * 8, 8, cands, routing="oracle")
    hard, medium, easy = plan.bins
    assert [b.share for b in plan.bins] == [0.5, 0.25, 0.25]
    assert hard.pass_rate == pytest.approx(0.125) and easy.pass_rate == 1.0
    acc = {b.name: {o.spec: o.accuracy for o in b.options} for b in plan.bins}
    assert acc["medium"] == pytest.approx({"majority@1": 0.5, "majority@2": 0.5, "majority@4": 1})
    assert acc["hard"] == pytest.approx(
        {"majority@1": 0.125, "majority@2": 0.125, "majority@4": 0.0}
    )
    assert acc["easy"] == pytest.approx({"majority@1": 1, "majority@2": 1, "majority@4": 1})
    sec = {o.spec: o.seconds for o in medium.options}
    assert sec == pytest.approx({"majority@1": 0.2, "majority@2": 0.3, "majority@4": 0.5})
    ceiling = {o.spec: o.ceiling for o in hard.options}  # pass@k: (1 - C(3,k)/C(4,k) + 0) / 2
    assert ceiling == pytest.approx({"majority@1": 0.125, "majority@2": 0.25, "majority@4": 0.5})
    assert hard.maj_at_k == pytest.approx({"1": 0.125, "2": 0.125, "4": 0.0})
    assert medium.pass_at_k == pytest.approx({"1": 0.5, "2": 5 / 6, "4": 1.0})
    assert [b.saturation_n for b in plan.bins] == [
        saturation_n([0.25, 0.0]), saturation_n([0.5]), 1,
    ]  # fmt: skip
    # 0.35 s/problem: easy and hard stay at one sample (more does not help), medium votes.
    assert [b.chosen for b in plan.bins] == ["majority@1", "majority@4", "majority@1"]
    assert plan.predicted_accuracy == pytest.approx(0.5 * 0.125 + 0.25 + 0.25)
    assert plan.predicted_seconds == pytest.approx(0.5 * 0.2 + 0.25 * 0.5 + 0.25 * 0.2)
    assert plan.predicted_total_seconds <= plan.budget_seconds
    # At the floor: one sample everywhere; below it, no plan.
    tight = make_plan(pl, 0.2 * 8, 8, cands, routing="oracle")
    assert {b.chosen for b in tight.bins} == {"majority@1"}
    with pytest.raises(InfeasibleBudget, match=r"cheapest plan, 0\.2 s/problem"):
        make_plan(pl, 0.19 * 8, 8, cands, routing="oracle")
    # The best uniform strategy at 0.35 s/problem: majority@2 and @1 tie at 0.4375 -> @1.
    uniform = make_plan(pl, 0.35 * 8, 8, cands, routing="uniform")
    assert {b.chosen for b in uniform.bins} == {"majority@1"}
    assert uniform.predicted_accuracy == pytest.approx((1 + 0.5 + 0.25 + 0) / 4)
    with pytest.raises(ValueError, match="probe_samples"):
        make_plan(pl, 10, 8, cands, probe_samples=5)


def test_probe_by_hand():
    # Problem 0 always agrees 4/4, problem 3 (b c d None) at most 1.
    sim0 = simulate_probe(hand_pilot().problems[0], 4, [])
    assert set(sim0.level) == {4} and sim0.hits[4].mean() == 1.0
    sim3 = simulate_probe(hand_pilot().problems[3], 2, [4])
    assert set(sim3.level) <= {0, 1} and sim3.hits[4].mean() == 0.0
    # Prefix votes of simulated orders agree with majority_vote.
    sim1 = simulate_probe(hand_pilot().problems[1], 2, [3, 4], draws=200)
    assert sim1.hits[2].mean() == pytest.approx(0.5, abs=0.1)
    assert sim1.hits[4].mean() == 1.0
    # Calibration: level 2 came from the p = 1 problem, level 1 from the p = 0 one; level 0,
    # never seen, borrows from its nearest seen level.
    probe = calibrate_probe([1.0, 0.0], [[0, 0, 1], [0, 1, 0]], 2, [1 / 3, 2 / 3])
    assert probe.calibration == [0.0, 0.0, 1.0]
    assert [probe.bin_of(j) for j in range(3)] == [0, 0, 2]
    # Probe plans price the probe in: 2 samples of 10 tokens + the prompt = 0.3 s/problem.
    pl = hand_pilot()
    plan = make_plan(pl, 0.6 * 8, 8, "majority@2,majority@4", probe_samples=2, routing="probe")
    assert plan.routing == "probe" and plan.probe is not None
    assert plan.probe_seconds == pytest.approx(0.3)
    assert sum(b.share for b in plan.bins) == pytest.approx(1.0)
    assert plan.predicted_seconds <= 0.6 + 1e-9
    for b in plan.bins:
        if b.share > 0:
            cont = next(o for o in b.options if o.spec == "majority@4")
            assert cont.seconds == pytest.approx(0.2) and cont.continues_probe
    with pytest.raises(InfeasibleBudget):
        make_plan(pl, 0.29 * 8, 8, "majority@2,majority@4", probe_samples=2, routing="probe")


def test_pilot_round_trip():
    pl = hand_pilot()
    assert Pilot.from_dict(json.loads(json.dumps(pl.to_dict()))) == pl


# ---- the tiny model ---------------------------------------------------------------------------

ACCEPT = ["x", "0", "0,1", "0,1,2", "0,1,2,3", "1,2,3", "2", "1,3"]


class ResidueTask(JsonlTask):
    """The answer of a completion is its length mod 4; a problem accepts the residues listed
    in its reference ('x': none)."""

    def extract_answer(self, completion: str) -> str | None:
        return str(len(completion) % 4)

    def is_correct(self, problem, answer) -> bool:
        return answer is not None and answer in problem.answer.split(",")


PARAMS = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=8, seed=1)
NO_HYGIENE = Hygiene(enabled=False)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("task") / "residue.jsonl"
    rows = [
        {"question": f"Q{i}: what is {i} plus {7 * i}?", "answer": ACCEPT[i % len(ACCEPT)]}
        for i in range(24)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_pilot(llm, task_file) -> Pilot:
    task = ResidueTask(task_file, family="text")
    # The tiny model's answers are cut off (8 tokens): hygiene off, so they still vote.
    return pilot(
        llm, task, 8, 4, params=PARAMS, measure=["greedy"], concurrency=4, hygiene=NO_HYGIENE
    )


def test_pilot_records(tiny_pilot, task_file):
    task = ResidueTask(task_file, family="text")
    problems = task.problems(8)
    assert [p.id for p in tiny_pilot.problems] == [p.id for p in problems]
    for p, pp in zip(problems, tiny_pilot.problems, strict=True):
        assert len(pp.answers) == len(pp.correct) == len(pp.tokens) == 4
        assert pp.correct == [task.is_correct(p, a) for a in pp.answers]
        assert pp.wall_time > 0 and pp.prompt_tokens > 0 and sum(pp.tokens) > 0
        assert set(pp.direct) == {"greedy"} and pp.direct["greedy"].n_candidates == 1
    rates = tiny_pilot.pass_rates
    assert min(rates) == 0.0 and max(rates) == 1.0  # 'x' and '0,1,2,3' problems
    assert tiny_pilot.measured == ["greedy"]
    assert sum(pp.wall_time for pp in tiny_pilot.problems) <= tiny_pilot.wall_seconds


def assert_fits_100_columns(table) -> None:
    """No cell cut to an ellipsis, no line past 100 columns (the default, not --wide)."""
    import io

    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=100).print(table)
    text = out.getvalue()
    assert "…" not in text and max(map(len, text.splitlines())) <= 100, text


@pytest.mark.parametrize("routing", ["probe", "uniform"])
def test_pilot_plan_validate(llm, task_file, tiny_pilot, routing):
    task = ResidueTask(task_file, family="text")
    cands = "greedy,majority@2,majority@4,majority@8"
    floor = make_plan(tiny_pilot, 1e6, 6, cands, probe_samples=2, routing=routing)
    budget = 2 * floor.predicted_total_seconds  # a feasible budget, not the unlimited one
    plan = make_plan(tiny_pilot, budget, 6, cands, probe_samples=2, routing=routing)
    assert plan.routing == routing
    assert plan.predicted_total_seconds <= budget * (1 + 1e-9)
    assert sum(b.share for b in plan.bins) == pytest.approx(1.0)
    assert {b.chosen for b in plan.bins if b.share > 0} <= {*cands.split(","), "majority@2"}
    assert 0 <= plan.predicted_accuracy <= 1 and plan.oracle_ceiling >= 0
    json.dumps(plan.to_dict())
    assert plan_table(plan).row_count >= len(plan.bins) + 1
    assert_fits_100_columns(plan_table(plan))

    val = validate(llm, task, plan, 6, hygiene=NO_HYGIENE)
    ids = {r.problem_id for r in val.records}
    assert len(val.records) == 6 and not ids & set(plan.pilot["problem_ids"])
    assert val.overall.n == 6
    assert val.total_seconds == pytest.approx(sum(r.seconds for r in val.records))
    assert val.budget_seconds == pytest.approx(budget)
    assert val.within_budget == (val.achieved_seconds <= val.budget_seconds)
    for r in val.records:
        assert r.correct == task.is_correct(next(p for p in task.problems(24) if p.id ==
                                                 r.problem_id), r.answer)  # fmt: skip
        assert r.seconds > 0 and r.generated_tokens > 0
    if routing == "probe":
        assert sum(b.n for b in val.bins) == 6
        for r in val.records:  # every problem paid for its probe
            assert r.probe_seconds > 0 and r.agreement in (0, 1, 2)
            assert r.bin == plan.probe.bin_of(r.agreement)
            assert r.strategy == plan.choice_for(r.bin)
    else:
        assert val.bins == [] and {r.strategy for r in val.records} == {val.overall.strategy}
        assert all(r.probe_seconds == 0 for r in val.records)
    json.dumps(val.to_dict())
    assert validation_table(val).row_count >= 1
    assert_fits_100_columns(validation_table(val))


def test_budget_shapes_the_plan(tiny_pilot):
    cands = "majority@1,majority@2,majority@4,majority@8"
    loose = make_plan(tiny_pilot, 1e6, 8, cands, routing="uniform")
    cheapest = min(o.seconds for b in loose.bins for o in b.options if b.share > 0)
    tight = make_plan(tiny_pilot, cheapest * 8 * 1.01, 8, cands, routing="uniform")
    assert tight.predicted_seconds <= loose.predicted_seconds
    assert {b.chosen for b in tight.bins if b.chosen} == {"majority@1"}
    with pytest.raises(InfeasibleBudget):
        make_plan(tiny_pilot, cheapest * 8 * 0.5, 8, cands, routing="uniform")
    # Analytic pricing: roofline seconds on an H100, much smaller than this CPU's.
    h100 = make_plan(tiny_pilot, 1.0, 8, cands, routing="oracle", hardware="h100")
    assert "h100" in h100.cost_unit.lower() and h100.predicted_seconds < cheapest
    assert all(math.isfinite(o.seconds) for b in h100.bins for o in b.options)


# ---- CLI --------------------------------------------------------------------------------------


def test_cli(model_dir, task_file, tmp_path):
    runner = CliRunner()
    app = make_app()
    out = tmp_path / "plan"
    common = ["--model", str(model_dir), "--max-tokens", "8", "--kv-cache-gb", "0.01"]
    args = ["plan", "--task", str(task_file), "--pilot-problems", "4", "--pilot-samples", "4",
            "--holdout", "3", "--probe-samples", "2", *common]  # fmt: skip
    result = runner.invoke(app, [*args, "--budget-seconds", "100", "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["plan"]["budget_seconds"] == 100 and data["plan"]["n_problems"] == 3
    assert data["validation"]["n_problems"] == 3
    assert data["plan"]["predicted_total_seconds"] <= 100
    for name in ("pilot.json", "plan.json", "validation.json"):
        assert (out / name).is_file()
    assert json.loads((out / "plan.json").read_text()) == data["plan"]

    def one_line_error(res, text):
        assert res.exit_code == 2 and "Traceback" not in res.output
        assert len(res.stderr.strip().splitlines()) == 1 and text in res.stderr

    one_line_error(runner.invoke(app, [*args, "--budget-seconds", "0"]), "budget")
    one_line_error(runner.invoke(app, [*args, "-b", "5", "-c", "majority@x"]), "majority@x")
    one_line_error(runner.invoke(app, [*args, "-b", "5", "--probe-samples", "9"]), "probe")
    missing = [*args[:2], str(tmp_path / "missing.jsonl"), *args[3:], "-b", "5"]
    one_line_error(runner.invoke(app, missing), "not found")
    # Too small a budget: the pilot ran, so its file is kept; one line says how much is needed.
    tiny = runner.invoke(app, [*args, "-b", "1e-9", "--out", str(tmp_path / "t")])
    assert tiny.exit_code == 2 and "cheapest plan" in tiny.stderr
    assert "error" in tiny.stderr.splitlines()[-1]
    assert (tmp_path / "t" / "pilot.json").is_file()
    plain = runner.invoke(app, [*args, "-b", "100", "--holdout", "0"])
    assert plain.exit_code == 0 and "plan (" in plain.stdout
    # A temperature sweep: one pilot per temperature, the plan with the best prediction kept.
    swept = tmp_path / "swept"
    sweep = [*args, "-b", "100", "--holdout", "0", "--temperatures", "0.3,1.0", "--json"]
    res = runner.invoke(app, [*sweep, "--out", str(swept)])
    assert res.exit_code == 0, res.output
    assert (swept / "pilot.t0.3.json").is_file() and (swept / "pilot.t1.json").is_file()
    assert "chosen: temperature" in res.stderr
    chosen = json.loads(res.stdout)["plan"]
    assert chosen["pilot"]["params"]["temperature"] in (0.3, 1.0)
    one_line_error(runner.invoke(app, [*args, "-b", "5", "--temperatures", "hot"]), "temperatures")


def test_module_help():
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "ttscale.plan.cli", "plan", "--help"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0 and "--budget-seconds" in res.stdout


def test_vote_simulation_matches_majority_vote():
    from ttscale.plan.curves import _vote_hits

    rng = np.random.default_rng(0)
    seqs = rng.integers(-1, 3, size=(300, 6))
    good = np.array([True, False, False])
    hits = _vote_hits(seqs, good, [1, 3, 6], block=64)
    for d in range(300):
        for k in (1, 3, 6):
            answers = [None if x < 0 else int(x) for x in seqs[d, :k]]
            assert hits[k][d] == (majority_vote(answers)[0] == 0)


def test_cli_problem_counts_are_checked_before_the_model_loads(tmp_path, monkeypatch):
    """A 3-problem file: a 3-problem pilot leaves nothing to validate on, which is refused
    before any model load (the load is made to fail); a pilot asking for more says so."""
    import ttscale.llm

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ttscale.llm.LLM, "__init__", refuse)
    path = tmp_path / "three.jsonl"
    rows = [{"question": f"what is {i} + {i}?", "answer": f"#### {2 * i}"} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    runner = CliRunner()
    args = ["plan", "--task", str(path), "-b", "10", "--pilot-samples", "2", "--probe-samples", "2"]
    res = runner.invoke(make_app(), [*args, "--pilot-problems", "3", "--holdout", "2"])
    assert res.exit_code == 2 and "no problems beyond the pilot's 3" in res.stderr
    assert "Traceback" not in res.output
    res = runner.invoke(make_app(), [*args, "--pilot-problems", "5", "--holdout", "0"])
    assert res.exit_code != 0 and "has 3 problems, not --pilot-problems 5" in " ".join(
        res.stderr.split()
    )
    assert isinstance(res.exception, AssertionError)  # it got as far as loading, then stopped
