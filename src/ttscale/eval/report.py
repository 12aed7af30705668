"""Reports of an evaluation summary: a rich table, a markdown table, a Pareto plot.

The summary is what :func:`ttscale.eval.harness.run_eval` returns (``summary["strategies"]`` is
a list of per-strategy dicts). Cost axes name a summary field: ``wall_time`` -> the
``mean_wall_time`` column, ``tokens`` -> ``mean_tokens``, ``flops`` -> ``mean_flops``, and so
on for any ``mean_<x>`` field; a full field name works too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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


def _columns(rows: Sequence[dict[str, Any]]) -> list[tuple[str, Callable[[dict[str, Any]], str]]]:
    """(header, cell) pairs; cost-model columns only when some strategy has them."""

    def acc(r: dict[str, Any]) -> str:
        if r.get("accuracy") is None:
            return "-"
        return f"{_pct(r['accuracy'])} [{_pct(r['accuracy_lo'])}, {_pct(r['accuracy_hi'])}]"

    def at_k(name: str) -> Callable[[dict[str, Any]], str]:
        def cell(r: dict[str, Any]) -> str:
            table = r.get(name)
            return "-" if not table else _pct(table[str(r["k_max"])])

        return cell

    def prompt(r: dict[str, Any]) -> str:
        computed, cached = r.get("mean_computed_prompt_tokens"), r.get("mean_cached_prompt_tokens")
        return "-" if computed is None else f"{computed:.0f} / {cached or 0:.0f}"

    columns: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("strategy", lambda r: str(r["strategy"])),
        ("n", lambda r: str(r["n"])),
        ("acc% [95% CI]", acc),
        ("cover%", lambda r: _pct(r.get("coverage"))),
        ("pass@N%", at_k("pass_at_k")),
        ("maj@N%", at_k("maj_at_k")),
        ("tok/pb", lambda r: _num(".1f")(r.get("mean_tokens"))),
        ("prompt comp/cached", prompt),
        ("peak KV", lambda r: _num(".1f")(r.get("mean_peak_kv_blocks"))),
        ("s/pb", lambda r: _num(".3f")(r.get("mean_wall_time"))),
        ("total s", lambda r: _num(".1f")(r.get("total_wall_time"))),
    ]
    for key, header in (("mean_flops", "FLOPs/pb"), ("mean_bytes", "bytes/pb")):
        if any(r.get(key) is not None for r in rows):
            columns.append((header, lambda r, key=key: "-" if r.get(key) is None else _si(r[key])))
    if any(r.get("mean_roofline_time") is not None for r in rows):
        columns.append(("roofline s/pb", lambda r: _num(".4f")(r.get("mean_roofline_time"))))
    return columns


def summary_table(summary: dict[str, Any]) -> Table:
    rows = summary["strategies"]
    n = summary.get("n_problems")
    table = Table(title=f"{n} problems" if n is not None else None)
    columns = _columns(rows)
    for i, (header, _) in enumerate(columns):
        table.add_column(header, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*(cell(r) for _, cell in columns))
    return table


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    """The summary as a rich table (pass@N / maj@N at the largest k every problem allows;
    "pb" = per problem, times amortized over concurrent problems)."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped / captured: no width to respect, don't squeeze
            console = Console(width=200)
    console.print(summary_table(summary))


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


def pareto_plot(
    summary: dict[str, Any],
    path: str | Path,
    x: str | Sequence[str] = ("wall_time", "tokens"),
    y: str = "accuracy",
) -> Path:
    """A PNG with one panel per cost axis in ``x``: ``y`` against the cost, a labeled point per
    strategy (with its 95% interval for accuracy), and the Pareto frontier as a step line.
    Strategies without the field are left out of that panel."""
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
        if y == "accuracy":
            ax.set_ylim(-0.08, 1.05)  # room for labels under 0%
        ax.set_xlabel(AXIS_LABELS.get(key, key))
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


__all__ = [
    "axis_key",
    "markdown_summary",
    "pareto_frontier",
    "pareto_plot",
    "print_summary",
    "summary_table",
]
