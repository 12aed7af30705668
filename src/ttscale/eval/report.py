"""Reports of an evaluation summary: a rich table, a markdown table, a Pareto plot.

The summary is what :func:`ttscale.eval.harness.run_eval` returns (``summary["strategies"]`` is
a list of per-strategy dicts). Cost axes name a summary field: ``wall_time`` -> the
``mean_wall_time`` column, ``tokens`` -> ``mean_tokens``, ``flops`` -> ``mean_flops``, and so
on for any ``mean_<x>`` field; a full field name works too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

AXIS_ALIASES = {"tokens": "mean_tokens", "kv": "mean_peak_kv_blocks", "time": "mean_wall_time"}
AXIS_LABELS = {
    "mean_wall_time": "wall time per problem (s, amortized)",
    "mean_tokens": "generated tokens per problem",
    "mean_flops": "FLOPs per problem",
    "mean_bytes": "bytes moved per problem",
    "mean_roofline_time": "roofline time per problem (s)",
    "mean_measured_time": "measured engine time per problem (s)",
    "mean_peak_kv_blocks": "peak KV blocks per problem",
}


def axis_key(rows: Sequence[dict[str, Any]], x: str) -> str:
    """The summary field an axis name refers to; ValueError listing the usable ones."""
    key = AXIS_ALIASES.get(x, x)
    fields = {k for r in rows for k, v in r.items() if isinstance(v, (int, float))}
    for candidate in (key, f"mean_{key}"):
        if candidate in fields:
            return candidate
    usable = sorted(k[5:] for k in fields if k.startswith("mean_"))
    raise ValueError(f"no summary field for axis {x!r}; usable: {', '.join(usable)}")


def pareto_frontier(costs: Sequence[float], scores: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats (cost <= and score >=, one strictly), by
    increasing cost. Equal points: the first one stands for them."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -scores[i], i))
    frontier: list[int] = []
    best = -float("inf")
    for i in order:
        if scores[i] > best:
            frontier.append(i)
            best = scores[i]
    return frontier


# ---- tables -----------------------------------------------------------------------------------


def _si(value: float) -> str:
    """1234567 -> '1.23M' (FLOPs and bytes span many decades)."""
    for div, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.3g}{suffix}"
    return f"{value:.3g}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _num(fmt: str) -> Callable[[Any], str]:
    return lambda v: "-" if v is None else format(v, fmt)


def _columns(
    rows: Sequence[dict[str, Any]], wide: bool = True
) -> list[tuple[str, Callable[[dict[str, Any]], str]]]:
    """(header, cell) pairs; cost-model columns only when some strategy has them. Not
    ``wide``: the columns that fit 100 terminal columns (coverage, peak KV, total time and
    roofline time left out)."""

    def ci(r: dict[str, Any]) -> str:
        if r.get("accuracy") is None:
            return "-"
        return f"{_pct(r['accuracy_lo'])}-{_pct(r['accuracy_hi'])}"

    def at_k(name: str) -> Callable[[dict[str, Any]], str]:
        def cell(r: dict[str, Any]) -> str:
            table = r.get(name)
            return "-" if not table else _pct(table[str(r["k_max"])])

        return cell

    def prompt(r: dict[str, Any]) -> str:
        computed, cached = r.get("mean_computed_prompt_tokens"), r.get("mean_cached_prompt_tokens")
        return "-" if computed is None else f"{computed:.0f}/{cached or 0:.0f}"

    columns: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("strategy", lambda r: str(r["strategy"])),
        ("n", lambda r: str(r["n"])),
        ("acc%", lambda r: _pct(r.get("accuracy"))),
        ("95% CI", ci),
    ]
    if wide:
        columns.append(("cover%", lambda r: _pct(r.get("coverage"))))
    columns += [
        ("pass@N", at_k("pass_at_k")),
        ("maj@N", at_k("maj_at_k")),
        ("tok/pb", lambda r: _num(".0f")(r.get("mean_tokens"))),
        ("prompt", prompt),
    ]
    if wide:
        columns.append(("peak KV", lambda r: _num(".1f")(r.get("mean_peak_kv_blocks"))))
    columns.append(("s/pb", lambda r: _num(".2f")(r.get("mean_wall_time"))))
    if wide:
        columns.append(("total s", lambda r: _num(".1f")(r.get("total_wall_time"))))
    for key, header in (("mean_flops", "FLOP/pb"), ("mean_bytes", "B/pb")):
        if any(r.get(key) is not None for r in rows):
            columns.append((header, lambda r, key=key: "-" if r.get(key) is None else _si(r[key])))
    if wide and any(r.get("mean_roofline_time") is not None for r in rows):
        columns.append(("roofline s/pb", lambda r: _num(".4f")(r.get("mean_roofline_time"))))
    return columns


LEGEND = (
    "pb: per problem (times amortized over concurrent problems); prompt: tokens computed/"
    "cached; pass@N, maj@N at the largest N every problem allows"
)


def summary_notes(summary: dict[str, Any]) -> list[str]:
    """What a reader of the table must know: strategies whose times come from several runs
    (a resumed folder), measured under different machine load."""
    mixed = [r["strategy"] for r in summary["strategies"] if r.get("timing_sessions", 1) > 1]
    if not mixed:
        return []
    return [
        f"times of {', '.join(mixed)} were measured in several runs (resumed) under possibly "
        "different load: compare them with care, or rerun with --no-resume"
    ]


def summary_table(summary: dict[str, Any], wide: bool = False) -> Table:
    rows = summary["strategies"]
    n = summary.get("n_problems")
    table = Table(
        title=f"{n} problems" if n is not None else None,
        caption=LEGEND,
        caption_justify="left",
        box=box.SIMPLE_HEAD,  # one space between columns, no rules: fits 100 columns
        show_edge=False,
        padding=(0, 0),
    )
    columns = _columns(rows, wide)
    for i, (header, _) in enumerate(columns):
        table.add_column(header, justify="left" if i == 0 else "right", no_wrap=True)
    for r in rows:
        table.add_row(*(cell(r) for _, cell in columns))
    return table


def print_summary(
    summary: dict[str, Any], console: Console | None = None, wide: bool = False
) -> None:
    """The summary as a rich table (pass@N / maj@N at the largest k every problem allows;
    "pb" = per problem, times amortized over concurrent problems); ``wide`` adds coverage,
    peak KV, total and roofline time (the default fits 100 columns)."""
    if console is None:
        console = Console()
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console = Console(width=200)  # piped / captured: no width to respect, don't squeeze
    console.print(summary_table(summary, wide))
    for note in summary_notes(summary):
        console.print(f"[yellow]note:[/yellow] {note}", soft_wrap=True, highlight=False)


def markdown_summary(summary: dict[str, Any]) -> str:
    rows = summary["strategies"]
    columns = _columns(rows)
    lines = [
        f"# Evaluation summary ({summary.get('n_problems', '?')} problems)",
        "",
        "| " + " | ".join(h for h, _ in columns) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|",
    ]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
    lines += ["", LEGEND + ".", *(f"Note: {n}." for n in summary_notes(summary))]
    ks = [r for r in rows if r.get("pass_at_k")]
    if ks:
        lines += ["", "## pass@k / maj@k (%)", ""]
        for r in ks:
            cells = ", ".join(
                f"k={k}: {_pct(r['pass_at_k'][k])} / {_pct(r['maj_at_k'][k])}"
                for k in r["pass_at_k"]
            )
            lines.append(f"- {r['strategy']}: {cells}")
    return "\n".join(lines) + "\n"


# ---- plot -------------------------------------------------------------------------------------


def plot_title(summary: dict[str, Any]) -> str:
    """Task, model, problems and max tokens, from the summary's settings (what a plot shown
    away from its folder must say)."""
    settings = summary.get("settings") or {}
    parts = []
    task = (settings.get("task") or {}).get("name")
    if task:
        parts.append(str(task))
    if settings.get("model"):
        parts.append(Path(str(settings["model"])).name)
    if summary.get("n_problems") is not None:
        parts.append(f"{summary['n_problems']} problems")
    max_tokens = (settings.get("params") or {}).get("max_tokens")
    if max_tokens is not None:
        parts.append(f"max {max_tokens} tokens")
    return ", ".join(parts)


def ceiling(rows: Sequence[dict[str, Any]]) -> tuple[float, str] | None:
    """The best pass@N (a problem counts if any candidate is right): what a perfect selector
    over the largest strategy's candidates would score. (value, label) or None."""
    best: tuple[float, str] | None = None
    for r in rows:
        if r.get("coverage") is None or r.get("k_max", 1) < 2:
            continue
        if best is None or r["coverage"] > best[0]:
            best = (float(r["coverage"]), f"pass@{r['k_max']} ceiling ({r['strategy']})")
    return best


def pareto_plot(
    summary: dict[str, Any],
    path: str | Path,
    x: str | Sequence[str] = ("wall_time", "tokens"),
    y: str = "accuracy",
) -> Path:
    """A PNG with one panel per cost axis in ``x``: ``y`` against the cost, a labeled point per
    strategy (with its 95% interval for accuracy), and the Pareto frontier as a step line;
    for accuracy also the pass@N ceiling and, when every point is 0%, a note saying so. Titled
    with the task, model, problems and max tokens. Strategies without the field are left out
    of that panel."""
    import matplotlib.pyplot as plt

    fig = pareto_figure(summary, x, y)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def pareto_figure(
    summary: dict[str, Any],
    x: str | Sequence[str] = ("wall_time", "tokens"),
    y: str = "accuracy",
) -> Any:
    """The matplotlib figure :func:`pareto_plot` saves (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers / in tests
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = summary["strategies"]
    if not rows:
        raise ValueError("the summary has no strategies to plot")
    axes_names = [x] if isinstance(x, str) else list(x)
    keys = [axis_key(rows, name) for name in axes_names]
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        pts = [r for r in rows if r.get(key) is not None and r.get(y) is not None]
        costs = [float(r[key]) for r in pts]
        scores = [float(r[y]) for r in pts]
        if y == "accuracy":
            err = [
                # max(0, .): Wilson bounds at 0% / 100% can miss the point by a rounding error
                [max(0.0, s - r["accuracy_lo"]) for s, r in zip(scores, pts, strict=True)],
                [max(0.0, r["accuracy_hi"] - s) for s, r in zip(scores, pts, strict=True)],
            ]
            ax.errorbar(costs, scores, yerr=err, fmt="o", capsize=3, alpha=0.8)
        else:
            ax.plot(costs, scores, "o")
        for i, (c, s, r) in enumerate(zip(costs, scores, pts, strict=True)):
            # Alternate above / below so labels of nearby points overlap less.
            offset = (4, 5) if i % 2 == 0 else (4, -12)
            ax.annotate(r["strategy"], (c, s), textcoords="offset points", xytext=offset)
        front = pareto_frontier(costs, scores)
        if front:
            # Extended flat to the costliest point: past the last frontier point, spending
            # more buys nothing (and a one-point frontier would draw nothing otherwise).
            fx = [costs[i] for i in front] + [max(costs)]
            fy = [scores[i] for i in front] + [scores[front[-1]]]
            ax.step(fx, fy, where="post", color="tab:red", alpha=0.7, label="Pareto frontier")
            ax.scatter(fx[:-1], fy[:-1], s=120, facecolors="none", edgecolors="tab:red", zorder=3)
            ax.legend(loc="best")
        positive = [c for c in costs if c > 0]
        if positive and min(positive) == min(costs) and max(costs) / min(positive) > 20:
            ax.set_xscale("log")  # strategies' costs span decades (greedy vs N=64)
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 10, 20, 50...
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        top = ceiling(pts) if y == "accuracy" else None
        if top is not None:
            ax.axhline(top[0], color="tab:green", linestyle="--", alpha=0.7, label=top[1])
            ax.legend(loc="best")
        if y == "accuracy" and pts and not any(scores):
            ax.text(
                0.5,
                0.5,
                "every strategy scored 0%",
                transform=ax.transAxes,
                ha="center",
                color="tab:gray",
            )
        if y == "accuracy":
            ax.set_ylim(-0.08, 1.05)  # room for labels under 0%
        ax.set_xlabel(AXIS_LABELS.get(key, key))
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    title = plot_title(summary)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


__all__ = [
    "LEGEND",
    "axis_key",
    "ceiling",
    "markdown_summary",
    "pareto_figure",
    "pareto_frontier",
    "pareto_plot",
    "plot_title",
    "print_summary",
    "summary_notes",
    "summary_table",
]
