"""Rich tables of a plan and of its validation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ttscale.plan.bins import weighted
from ttscale.strategy_spec import parse_strategy_spec

if TYPE_CHECKING:
    from ttscale.plan.bins import BinPlan
    from ttscale.plan.planner import Plan
    from ttscale.plan.validation import Validation


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _sec(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def strategy_label(plan: Plan, b: BinPlan) -> str:
    """The bin's choice as it runs: after a probe, majority@k continues the probe's samples."""
    if not b.chosen:
        return "-"
    if plan.probe is None:
        return b.chosen
    m = plan.probe.samples
    option = next((o for o in b.options if o.spec == b.chosen), None)
    if option is not None and option.continues_probe:
        k = parse_strategy_spec(b.chosen).n
        return f"{b.chosen} (probe vote)" if k <= m else f"{b.chosen} (probe + {k - m})"
    return f"{b.chosen} (after probe)"


def _table(title: str, caption: str | None, wide: bool) -> Any:
    """A table that fits 100 columns unless ``wide``: no vertical rules, no edge padding."""
    from rich import box
    from rich.table import Table

    if wide:
        return Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    return Table(
        title=title,
        title_justify="left",
        caption=caption,
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=(0, 0),
    )


def _columns(t: Any, names: tuple[str, ...], left: tuple[str, ...]) -> None:
    for col in names:
        # Text columns fold rather than cut: no cell ends in an ellipsis at any width.
        if col in left:
            t.add_column(col, justify="left", overflow="fold")
        else:
            t.add_column(col, justify="right", no_wrap=True)


def plan_table(plan: Plan, wide: bool = False) -> Any:
    """A rich table: one row per bin (easiest first), the probe, the totals, and the other
    routings priced for comparison. Short headers (explained in the caption) unless
    ``wide``."""
    from rich.markup import escape

    t = _table(
        f"plan ({plan.routing} routing): {plan.budget_seconds:g} s for {plan.n_problems} "
        f"problems = {plan.budget_per_problem:.3g} s/problem, in {escape(plan.cost_unit)}",
        None
        if wide
        else "pilot: pilot pass rate; acc: predicted accuracy; s/pb: predicted seconds per "
        "problem; sat N: where one more sample adds < epsilon",
        wide,
    )
    if wide:
        names = ("bin", "pass rate", "share", "pilot pass rate", "strategy", "pred. acc",
                 "ceiling", "pred. s/problem", "sat. N")  # fmt: skip
    else:
        names = ("bin", "range", "share", "pilot", "strategy", "acc", "ceiling", "s/pb", "sat N")
    _columns(t, names, (names[0], names[1], "strategy"))
    for b in sorted(plan.bins, key=lambda b: -b.index):
        closing = "]" if b.hi >= 1.0 else ")"
        t.add_row(
            b.name,
            escape(f"[{b.lo:.2f}, {b.hi:.2f}{closing}"),
            _pct(b.share),
            _pct(b.pass_rate),
            strategy_label(plan, b),
            _pct(b.predicted_accuracy),
            _pct(b.ceiling),
            _sec(b.predicted_seconds),
            "-" if b.saturation_n is None else str(b.saturation_n),
        )
    t.add_section()
    if plan.probe is not None:
        m = plan.probe.samples
        t.add_row("probe", "", "100%", "", f"majority@{m}", "", "", _sec(plan.probe_seconds), "")
    t.add_row(
        "[bold]total[/bold]",
        "",
        "100%",
        _pct(weighted([b.pass_rate for b in plan.bins], [b.share for b in plan.bins])),
        plan.routing,
        f"[bold]{_pct(plan.predicted_accuracy)}[/bold]",
        _pct(plan.oracle_ceiling),
        f"[bold]{_sec(plan.predicted_seconds)}[/bold]",
        "",
    )
    for alt in plan.alternatives:
        if alt.routing == plan.routing:
            continue
        what = ", ".join(dict.fromkeys(s for s in alt.choices.values() if s))
        t.add_row(
            f"[dim]alt: {alt.routing}[/dim]",
            "",
            "",
            "",
            f"[dim]{escape(what if alt.feasible else alt.note)}[/dim]",
            f"[dim]{_pct(alt.accuracy)}[/dim]",
            "",
            f"[dim]{_sec(alt.seconds)}[/dim]",
            "",
        )
    return t


def validation_table(val: Validation, wide: bool = False) -> Any:
    """Achieved vs predicted (in parentheses), per probe-assigned bin and overall. Short
    headers (explained in the caption) unless ``wide``."""
    from rich.markup import escape

    unit = "roofline s" if val.analytic else "wall s"
    other = "wall s/problem" if val.analytic else "cost model s/problem"
    t = _table(
        f"held-out validation: {val.n_problems} problems, {val.achieved_seconds:.3g} "
        f"{unit} of a {val.budget_seconds:.3g} s budget "
        f"({'within' if val.within_budget else 'OVER'})",
        None
        if wide
        else f"(pred.): the plan's prediction; s/pb: {unit} per problem; other s/pb: {other}",
        wide,
    )
    if wide:
        cols = ("bin", "strategy", "n", "share (pred.)", "acc (pred.)", "acc 95% CI",
                f"{unit}/problem (pred.)", other)  # fmt: skip
    else:
        cols = ("bin", "strategy", "n", "share (pred.)", "acc (pred.)", "95% CI",
                "s/pb (pred.)", "other s/pb")  # fmt: skip
    _columns(t, cols, ("bin", "strategy"))
    for b in [*sorted(val.bins, key=lambda b: -(b.index or 0)), val.overall]:
        if b is val.overall:
            t.add_section()
        achieved, second = (
            (b.model_seconds, b.seconds) if val.analytic else (b.seconds, b.model_seconds)
        )
        t.add_row(
            b.name,
            escape(b.strategy or "-"),
            str(b.n),
            f"{_pct(b.share)} ({_pct(b.predicted_share)})",
            f"{_pct(b.accuracy)} ({_pct(b.predicted_accuracy)})",
            "-" if not b.n else f"{_pct(b.accuracy_lo)}-{_pct(b.accuracy_hi)}",
            f"{_sec(achieved)} ({_sec(b.predicted_seconds)})",
            _sec(second),
        )
    return t


__all__ = ["plan_table", "strategy_label", "validation_table"]
