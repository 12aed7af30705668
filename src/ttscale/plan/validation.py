"""Held-out validation: run a plan on problems the pilot did not see and compare achieved with
predicted accuracy and cost, per bin and overall."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ttscale.eval.metrics import wilson_interval
from ttscale.eval.store import jsonable
from ttscale.plan.costs import TimeModel, plan_time_model
from ttscale.plan.pilot_run import run_wave
from ttscale.plan.probe import agreement
from ttscale.sampling.params import SamplingParams
from ttscale.strategy_spec import parse_strategy_spec
from ttscale.tts.votes import majority_vote

if TYPE_CHECKING:
    from ttscale.llm import LLM
    from ttscale.plan.planner import Plan
    from ttscale.strategies.base import StrategyResult
    from ttscale.tasks import Task
    from ttscale.tts.hygiene import Hygiene

# The continuation after a probe samples with another seed: the engine seeds sample i of a
# request by (seed, i), so the same seed would repeat the probe's samples.
CONTINUATION_SEED_OFFSET = 1_000_003


@dataclass
class ValidationRecord:
    problem_id: str
    bin: int
    strategy: str
    answer: str | None
    correct: bool
    agreement: int | None  # the probe's agreement (None without a probe)
    probe_seconds: float  # wall
    strategy_seconds: float  # wall, after the probe
    model_seconds: float  # the plan's cost model applied to the tokens actually used
    prompt_tokens: int  # prefilled (computed), probe included
    generated_tokens: int

    @property
    def seconds(self) -> float:
        return self.probe_seconds + self.strategy_seconds


@dataclass
class BinValidation:
    index: int | None  # None: overall
    name: str
    strategy: str | None
    n: int
    share: float
    predicted_share: float
    accuracy: float | None
    accuracy_lo: float
    accuracy_hi: float
    predicted_accuracy: float | None
    seconds: float | None  # achieved wall s/problem
    model_seconds: float | None  # the cost model on the actual tokens, s/problem
    predicted_seconds: float | None


@dataclass
class Validation:
    n_problems: int
    routing: str
    bins: list[BinValidation]
    overall: BinValidation
    budget_seconds: float  # the plan's budget scaled to these problems
    total_seconds: float  # achieved wall time, all problems
    total_model_seconds: float  # the plan's cost model on the tokens actually used
    achieved_seconds: float  # in the plan's unit: wall, or roofline for an analytic plan
    within_budget: bool
    records: list[ValidationRecord]
    cost_unit: str
    analytic: bool = False  # the plan was priced by the analytic model (budget in roofline s)

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))


def _unseen(task: Task, ids: set[str], questions: set[str], n_problems: int, seed: int) -> list:
    pool = task.problems(n_problems + len(ids), seed)
    return [p for p in pool if p.id not in ids and p.question not in questions][:n_problems]


def held_out_problems(task: Task, plan: Plan, n_problems: int, seed_offset: int = 0) -> list:
    """``n_problems`` problems the pilot did not see: the task's problems at seed ``pilot seed +
    seed_offset``, minus the pilot's (by id and by question)."""
    ids, questions = set(plan.pilot["problem_ids"]), set(plan.pilot["questions"])
    return _unseen(task, ids, questions, n_problems, plan.pilot["seed"] + seed_offset)


def fresh_problems(task: Task, pilot_problems: Sequence[Any], n_problems: int, seed: int) -> list:
    """What :func:`held_out_problems` will find for a pilot of ``pilot_problems`` at ``seed``,
    known before the pilot runs (so a task too small to validate on fails before it)."""
    ids = {p.id for p in pilot_problems}
    questions = {p.question for p in pilot_problems}
    return _unseen(task, ids, questions, n_problems, seed)


def validate(
    llm: LLM,
    task: Task,
    plan: Plan,
    n_problems: int = 12,
    seed_offset: int = 0,
    *,
    concurrency: int | None = None,
    log: Callable[[str], None] | None = None,
    hygiene: Hygiene | None = None,
) -> Validation:
    """Runs the plan on ``n_problems`` new problems and compares predicted with achieved
    accuracy and cost, per bin and overall.

    Probe plans: a first wave of ``majority@m`` on every problem (its cost counted), whose
    agreement picks the bin; then each problem's bin strategy (``majority@k`` continues with
    ``k - m`` fresh samples and votes over all ``k``; other strategies start over), all in one
    wave so different strategies batch together. Uniform plans: the one strategy. Times are
    wall-clock, each chunk's time split over its problems by engine time, with the pilot's
    sampling settings and concurrency. The oracle judges the final answers only.
    """
    if plan.routing == "oracle":
        raise ValueError("an oracle-routed plan needs true difficulty labels: it cannot be run")
    if n_problems < 1:
        raise ValueError("validation needs at least 1 problem")
    say = log or (lambda _msg: None)
    problems = held_out_problems(task, plan, n_problems, seed_offset)
    if not problems:
        raise ValueError(
            f"task {task.name!r} has no problems beyond the pilot's "
            f"{len(plan.pilot['problem_ids'])}"
        )
    params = SamplingParams(**plan.pilot["params"])
    scorer = plan.pilot.get("scorer", "logprob")
    conc = concurrency or plan.pilot.get("concurrency", 8)
    model = plan_time_model(plan.cost_model, _shape_of(llm))
    n = len(problems)
    probe_runs: list[tuple[StrategyResult, float] | None] = [None] * n
    levels: list[int | None] = [None] * n
    llm.engine.reset_prefix_cache()
    if plan.routing == "probe":
        assert plan.probe is not None
        m = plan.probe.samples
        say(f"validate: probe majority@{m} on {n} problems")
        # The prefix cache is kept after the probe: a deployment would reuse the prompt's KV.
        probe_runs = run_wave(  # type: ignore[assignment]
            llm,
            task,
            problems,
            [f"majority@{m}"] * n,
            params,
            scorer=scorer,
            concurrency=conc,
            hygiene=hygiene,
        )
        levels = [agreement([c.answer for c in r.candidates]) for r, _ in probe_runs]  # type: ignore[misc]
        bins = [plan.probe.bin_of(j) for j in levels]  # type: ignore[arg-type]
        strategies = [plan.choice_for(b) for b in bins]
    else:
        bins = [-1] * n  # difficulty unknown: one group
        strategies = [plan.choice_for(0)] * n

    # What runs after the probe: a majority continuation samples k - m more, with another seed.
    cont_params = dataclasses.replace(
        params, seed=None if params.seed is None else params.seed + CONTINUATION_SEED_OFFSET
    )
    todo: list[tuple[int, str, SamplingParams]] = []
    for i, spec in enumerate(strategies):
        parsed = parse_strategy_spec(spec)
        name, k = parsed.name, parsed.n
        if probe_runs[i] is not None and name in ("majority", "sample"):
            extra = (k or 1) - len(probe_runs[i][0].candidates)  # type: ignore[index]
            if extra > 0:
                todo.append((i, f"majority@{extra}", cont_params))
        else:
            todo.append((i, spec, params))
    say(f"validate: strategies on {len(todo)} problems")
    wave = run_wave(
        llm,
        task,
        [problems[i] for i, _, _ in todo],
        [s for _, s, _ in todo],
        [p for _, _, p in todo],
        scorer=scorer,
        concurrency=conc,
        hygiene=hygiene,
    )
    runs = {i: (p is cont_params, res) for (i, _, p), res in zip(todo, wave, strict=True)}

    records = []
    for i, p in enumerate(problems):
        answers: list[str | None] = []
        used: list[StrategyResult] = []  # the probe's run and / or the strategy's
        probe_wall = s_wall = 0.0
        if probe_runs[i] is not None:
            r, probe_wall = probe_runs[i]  # type: ignore[misc]
            answers = [c.answer for c in r.candidates]
            used.append(r)
        answer = majority_vote(answers)[0]  # the probe's vote, if nothing runs after it
        if i in runs:
            continuation, (r, s_wall) = runs[i]
            used.append(r)
            if continuation:  # vote over the probe's and the new samples
                answer = majority_vote(answers + [c.answer for c in r.candidates])[0]
            else:
                answer = r.answer
        records.append(
            ValidationRecord(
                problem_id=p.id,
                bin=bins[i],
                strategy=strategies[i],
                answer=answer,
                correct=task.is_correct(p, answer),
                agreement=levels[i],
                probe_seconds=probe_wall,
                strategy_seconds=s_wall,
                model_seconds=sum((_model_seconds(model, r) for r in used), 0.0),
                prompt_tokens=sum(r.stats.computed_prompt_tokens for r in used),
                generated_tokens=sum(r.stats.generated_tokens for r in used),
            )
        )
    return _summarize_validation(plan, records, model.unit)


def _model_seconds(model: TimeModel, r: StrategyResult) -> float:
    """The plan's cost model applied to the tokens a run actually used."""
    s = r.stats
    return model.seconds(s.computed_prompt_tokens, s.generated_tokens, max(1, len(r.candidates)))


def _shape_of(llm: LLM) -> dict[str, Any] | None:
    try:
        return llm.engine.cost_meter.shape.to_dict()
    except AttributeError:
        return None


def _bin_validation(
    index: int | None,
    name: str,
    strategy: str | None,
    recs: Sequence[ValidationRecord],
    total: int,
    predicted_share: float,
    predicted_accuracy: float | None,
    predicted_seconds: float | None,
) -> BinValidation:
    k = sum(r.correct for r in recs)
    lo, hi = wilson_interval(k, len(recs))
    return BinValidation(
        index=index,
        name=name,
        strategy=strategy,
        n=len(recs),
        share=len(recs) / total if total else 0.0,
        predicted_share=predicted_share,
        accuracy=k / len(recs) if recs else None,
        accuracy_lo=lo,
        accuracy_hi=hi,
        predicted_accuracy=predicted_accuracy,
        seconds=sum(r.seconds for r in recs) / len(recs) if recs else None,
        model_seconds=sum(r.model_seconds for r in recs) / len(recs) if recs else None,
        predicted_seconds=predicted_seconds,
    )


def _summarize_validation(plan: Plan, records: list[ValidationRecord], unit: str) -> Validation:
    n = len(records)
    bins = []
    if plan.routing == "probe":
        for b in plan.bins:
            recs = [r for r in records if r.bin == b.index]
            bins.append(
                _bin_validation(
                    b.index,
                    b.name,
                    b.chosen or (plan.choice_for(b.index) if recs else None),
                    recs,
                    n,
                    b.share,
                    b.predicted_accuracy,
                    b.predicted_seconds,
                )
            )
    overall = _bin_validation(
        None,
        "all",
        None if plan.routing == "probe" else records[0].strategy,
        records,
        n,
        1.0,
        plan.predicted_accuracy,
        plan.predicted_seconds,
    )
    total = sum(r.seconds for r in records)
    total_model = sum(r.model_seconds for r in records)
    analytic = plan.cost_model.get("kind") == "analytic"
    achieved = total_model if analytic else total
    budget = plan.budget_seconds * n / plan.n_problems
    return Validation(
        n_problems=n,
        routing=plan.routing,
        bins=bins,
        overall=overall,
        budget_seconds=budget,
        total_seconds=total,
        total_model_seconds=total_model,
        achieved_seconds=achieved,
        within_budget=achieved <= budget,
        records=records,
        cost_unit=unit,
        analytic=analytic,
    )


__all__ = [
    "BinValidation",
    "Validation",
    "ValidationRecord",
    "fresh_problems",
    "held_out_problems",
    "validate",
]
