"""Command `plan`: a pilot run, a compute-optimal plan within a time budget (per-difficulty
strategy choice, Snell et al. 2024), and its validation on held-out problems. A plain function
so the main app can register it: ``app.command("plan")(plan_cmd)``; ``python -m
ttscale.plan.cli plan ...`` runs it standalone."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from ttscale.eval.cli import (
    DtypeOpt,
    JsonOpt,
    KvOpt,
    ModelOpt,
    QuantizeOpt,
    ScorerOpt,
    ThreadsOpt,
    WideOpt,
    _fail,
    check_max_tokens,
    check_scorer,
)

err = Console(stderr=True)

PILOT_FILE = "pilot.json"
PLAN_FILE = "plan.json"
VALIDATION_FILE = "validation.json"


def _write(out: Path | None, name: str, data: dict[str, Any]) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _check(
    budget_seconds: float,
    pilot_problems: int,
    pilot_samples: int,
    holdout: int,
    bins: int,
    binning: str,
    probe_samples: int,
    routing: str,
    epsilon: float,
    problems: int | None,
    candidates: str,
    hardware: str | None,
    concurrency: int,
) -> list[str]:
    """Everything checkable before loading a model; returns the specs the pilot must run."""
    from ttscale.plan.curves import needs_measurement, parse_candidates
    from ttscale.plan.planner import ROUTINGS

    if not (math.isfinite(budget_seconds) and budget_seconds > 0):
        _fail(f"--budget-seconds must be a positive number, not {budget_seconds}")
    if pilot_problems < 1:
        _fail("--pilot-problems must be >= 1")
    if holdout < 0:
        _fail("--holdout must be >= 0")
    if concurrency < 1:
        _fail("--concurrency must be >= 1")
    if pilot_samples < 2:
        _fail("--pilot-samples must be >= 2 (the probe and maj@k need several samples)")
    if bins < 1:
        _fail("--bins must be >= 1")
    if binning not in ("fixed", "quantile"):
        _fail(f"--binning must be fixed or quantile, not {binning!r}")
    if routing not in (*ROUTINGS, "auto"):
        _fail(f"--routing must be one of auto, {', '.join(ROUTINGS)}; not {routing!r}")
    if probe_samples < 0 or probe_samples == 1 or probe_samples > pilot_samples:
        _fail(f"--probe-samples must be 0 or in [2, --pilot-samples={pilot_samples}]")
    if not 0 < epsilon < 1:
        _fail(f"--epsilon must be in (0, 1), not {epsilon}")
    if problems is not None and problems < 1:
        _fail("--problems must be >= 1")
    try:
        measure = needs_measurement(candidates)
        parse_candidates(candidates, pilot_samples, measure)
        if hardware is not None:
            from ttscale.cost import load_hardware

            load_hardware(hardware)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    return measure


def _check_problems(task: Any, pilot_problems: int, holdout: int, seed: int, routing: str) -> int:
    """The problem counts, checked before the model loads (the pilot takes minutes): returns
    how many problems the pilot gets; refuses a validation with no problem left over."""
    from ttscale.plan.validation import fresh_problems

    pilot_set = task.problems(pilot_problems, seed)
    if not pilot_set:
        _fail(f"task {task.name!r} gave no problems")
    if len(pilot_set) < pilot_problems:
        err.print(
            f"[yellow]note:[/yellow] {escape(task.name)} has {len(pilot_set)} problems, not "
            f"--pilot-problems {pilot_problems}: the pilot runs {len(pilot_set)}",
            soft_wrap=True,
        )
    if holdout and routing != "oracle":
        fresh = fresh_problems(task, pilot_set, holdout, seed)
        if not fresh:
            _fail(
                f"task {task.name!r} has no problems beyond the pilot's {len(pilot_set)}: "
                "lower --pilot-problems, or --holdout 0 to skip the validation"
            )
        if len(fresh) < holdout:
            err.print(
                f"[yellow]note:[/yellow] only {len(fresh)} problems beyond the pilot's: the "
                f"validation runs {len(fresh)}, not --holdout {holdout}",
                soft_wrap=True,
            )
    return len(pilot_set)


class _Phases:
    """`plan`'s phases on stderr, numbered, each with the time the previous one took."""

    def __init__(self, total: int) -> None:
        self.total, self.index, self.t0 = total, 0, 0.0

    def _close(self) -> None:
        if self.index:
            err.print(f"[dim]  ({time.perf_counter() - self.t0:.1f} s)[/dim]")

    def start(self, what: str) -> None:
        self._close()
        self.index += 1
        self.t0 = time.perf_counter()
        err.print(f"[bold]phase {self.index}/{self.total}[/bold] {escape(what)}", soft_wrap=True)

    def done(self) -> None:
        self._close()
        self.index = 0


def _temperatures(spec: str | None, default: float) -> list[float]:
    if spec is None:
        return [default]
    try:
        values = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        _fail(f"--temperatures must be comma-separated numbers, not {spec!r}")
    if not values or any(not 0 <= t <= 100 for t in values):
        _fail("--temperatures must list values in [0, 100]")
    return list(dict.fromkeys(values))


def plan_cmd(
    budget_seconds: Annotated[
        float,
        typer.Option(
            "--budget-seconds", "-b", help="total time budget for --problems problems (seconds)"
        ),
    ],
    task: Annotated[
        str, typer.Option(help="reasoning-gym dataset, 'arithmetic', or a .jsonl file")
    ] = "arithmetic",
    pilot_problems: Annotated[int, typer.Option(help="problems in the pilot")] = 12,
    pilot_samples: Annotated[int, typer.Option(help="samples per pilot problem")] = 8,
    holdout: Annotated[int, typer.Option(help="new problems to validate on (0: skip)")] = 12,
    candidates: Annotated[
        str,
        typer.Option(
            "--candidates",
            "-c",
            help="comma-separated strategies; majority@k is estimated from the pilot's "
            "samples, others (greedy, beam@N/M...) are run on the pilot problems",
        ),
    ] = "greedy,majority@2,majority@4,majority@8",
    model: ModelOpt = None,
    max_tokens: int = 128,
    temperature: float = 0.7,
    temperatures: Annotated[
        str | None,
        typer.Option(
            help="sweep the pilot over these sampling temperatures (comma-separated) and keep "
            "the plan that predicts the best accuracy within the budget; overrides --temperature"
        ),
    ] = None,
    top_p: float = 0.95,
    seed: Annotated[int, typer.Option(help="problem set and sampling seed")] = 0,
    bins: Annotated[int, typer.Option(help="difficulty bins (by pilot pass rate)")] = 3,
    binning: Annotated[
        str, typer.Option(help="fixed (equal-width pass-rate bins) or quantile")
    ] = "fixed",
    probe_samples: Annotated[
        int, typer.Option(help="samples of the routing probe (0: one strategy for all)")
    ] = 4,
    routing: Annotated[
        str, typer.Option(help="auto (probe if it beats uniform), probe, uniform, oracle")
    ] = "auto",
    epsilon: Annotated[
        float, typer.Option(help="saturation: the N where one more sample adds < epsilon")
    ] = 0.01,
    problems: Annotated[
        int | None,
        typer.Option(help="problems the budget covers (default: --holdout, else the pilot's)"),
    ] = None,
    hardware: Annotated[
        str | None,
        typer.Option(help="price with the analytic roofline model on this hardware instead"),
    ] = None,
    concurrency: Annotated[int, typer.Option(help="problems run at once")] = 8,
    scorer: ScorerOpt = "logprob",
    difficulty: Annotated[
        str | None, typer.Option(help="task preset: easy / medium / hard")
    ] = None,
    threads: ThreadsOpt = None,
    kv_cache_gb: KvOpt = None,
    quantize: QuantizeOpt = "auto",
    dtype: DtypeOpt = "float32",
    json_out: JsonOpt = False,
    wide: WideOpt = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="write pilot.json, plan.json, validation.json"),
    ] = None,
) -> None:
    """Plan test-time compute per difficulty within a budget: pilot, plan, held-out check."""
    from ttscale.eval.cli import _load_llm, _params
    from ttscale.plan import (
        InfeasibleBudget,
        make_plan,
        pilot,
        plan_table,
        validate,
        validation_table,
    )
    from ttscale.tasks import load_task

    measure = _check(
        budget_seconds, pilot_problems, pilot_samples, holdout, bins, binning, probe_samples,
        routing, epsilon, problems, candidates, hardware, concurrency,
    )  # fmt: skip
    sweep = _temperatures(temperatures, temperature)
    all_params = [
        _params(max_tokens=max_tokens, temperature=t, top_p=top_p, seed=seed) for t in sweep
    ]
    check_scorer(scorer)
    try:  # before the model: a typo should not cost a model load
        the_task = load_task(task, difficulty)
        pilot_ids = _check_problems(the_task, pilot_problems, holdout, seed, routing)
    except ValueError as e:
        _fail(e)
    phases = _Phases(3 if holdout and routing != "oracle" else 2)
    phases.start(f"load the model, then a pilot: {pilot_ids} problems x {pilot_samples} samples")
    llm = _load_llm(model, threads, kv_cache_gb, quantize, dtype)
    check_max_tokens(llm, max_tokens)
    # Tables go to stderr with --json (stdout is the JSON); wide when not a terminal.
    console = Console(stderr=json_out, width=None if err.is_terminal else 160)

    def log(msg: str) -> None:
        err.print(f"[dim]{escape(msg)}[/dim]")

    # One pilot and one plan per temperature: the best N-sample strategy may want a cooler
    # sampler than one sample would (a vote needs diverse, not wild, samples).
    plans = []
    for t, params in zip(sweep, all_params, strict=True):
        if len(sweep) > 1:
            log(f"pilot at temperature {t:g}")
        try:
            the_pilot = pilot(
                llm,
                the_task,
                pilot_problems,
                pilot_samples,
                seed,
                params,
                measure=measure,
                scorer=scorer,
                concurrency=concurrency,
                log=log,
            )
        except ValueError as e:  # prompt too long, bad scorer, empty task
            _fail(e)
        suffix = "" if len(sweep) == 1 else f".t{t:g}"
        _write(out, PILOT_FILE.replace(".json", f"{suffix}.json"), the_pilot.to_dict())
        if t == sweep[-1]:
            phases.start("plan: bins, curves, knapsack within the budget")
        try:
            plan = make_plan(
                the_pilot,
                budget_seconds,
                problems or holdout or len(the_pilot.problems),
                candidates,
                n_bins=bins,
                binning=binning,
                probe_samples=probe_samples,
                routing=routing,
                epsilon=epsilon,
                hardware=hardware,
                seed=seed,
            )
        except (InfeasibleBudget, ValueError) as e:
            if len(sweep) == 1:
                _fail(e)
            log(f"temperature {t:g}: {e}")
            continue
        plans.append((t, plan))
    if not plans:
        _fail("no temperature gives a plan within the budget")
    if len(plans) > 1:
        for t, p in plans:
            err.print(
                f"temperature {t:g}: predicted accuracy {p.predicted_accuracy:.1%}, "
                f"{p.predicted_total_seconds:.0f} s"
            )
    # Best predicted accuracy; a tie goes to the cheaper plan.
    chosen_t, plan = max(
        plans, key=lambda tp: (tp[1].predicted_accuracy, -tp[1].predicted_total_seconds)
    )
    if len(plans) > 1:
        err.print(f"chosen: temperature {chosen_t:g}")
    _write(out, PLAN_FILE, plan.to_dict())
    console.print(plan_table(plan, wide))
    for note in plan.notes:
        err.print(f"[dim]note: {escape(note)}[/dim]", soft_wrap=True)

    validation = None
    if holdout and plan.routing != "oracle":
        phases.start(f"validation on {holdout} held-out problems")
        try:
            validation = validate(llm, the_task, plan, holdout, log=log, concurrency=concurrency)
        except ValueError as e:  # e.g. no problems left beyond the pilot's
            _fail(e)
        _write(out, VALIDATION_FILE, validation.to_dict())
        console.print(validation_table(validation, wide))
    elif holdout:
        err.print("[dim]an oracle-routed plan cannot run on new problems: no validation[/dim]")
    if json_out:
        payload = {
            "plan": plan.to_dict(),
            "validation": None if validation is None else validation.to_dict(),
        }
        print(json.dumps(payload))
    phases.done()
    if out is not None:
        err.print(f"[dim]results in {escape(str(out))}[/dim]", soft_wrap=True)


def make_app() -> typer.Typer:
    """A standalone app with the command (the main `ttscale` app registers it itself)."""
    app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
    app.command("plan")(plan_cmd)

    @app.callback()
    def main() -> None:
        """Compute-optimal test-time scaling plans."""

    return app


__all__ = ["make_app", "plan_cmd"]

if __name__ == "__main__":
    make_app()()
