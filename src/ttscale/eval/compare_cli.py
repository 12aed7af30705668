"""Command `compare`: two eval folders side by side (the statistics are in compare.py), as a
table, JSON and a plot. A plain function so the main app can register it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ttscale.eval.cli import JsonOpt, WideOpt, _fail, err

ALPHA = 0.05  # the level a difference is called real at


def _read_run(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from ttscale.eval.store import RECORDS_FILE, RUN_FILE, load_records

    if not folder.is_dir():
        _fail(f"{folder} is not a folder (give two `ttscale eval --out` folders)")
    records_path = folder / RECORDS_FILE
    if not records_path.exists():
        _fail(f"{folder} has no {RECORDS_FILE}: not an eval folder")
    try:
        settings = json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))["settings"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        settings = {}
    try:
        return settings, load_records(records_path)
    except ValueError as e:
        _fail(e)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def compare_table(rows: list[Any], wide: bool = False) -> Table:
    """One row per strategy; fits 100 columns unless ``wide`` (adds counts and bytes)."""
    table = Table(
        box=box.SIMPLE_HEAD,  # one space between columns: fits 100 columns
        show_edge=False,
        padding=(0, 0),
        caption_justify="left",
        caption=f"B-A: accuracy points, paired bootstrap 95% CI; p: exact McNemar; * p < {ALPHA}",
    )
    headers = ["strategy", "n", "A%", "B%", "B-A", "95% CI", "p", "time B/A", "FLOP B/A"]
    if wide:
        headers[7:7] = ["A only", "B only"]
        headers.append("bytes B/A")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for c in rows:
        cells = [
            c.strategy,
            str(c.n),
            f"{100 * c.accuracy_a:.1f}",
            f"{100 * c.accuracy_b:.1f}",
            f"{100 * c.diff:+.1f}",
            f"{100 * c.ci_lo:+.0f}..{100 * c.ci_hi:+.0f}",
            f"{c.p_value:.3f}{'*' if c.p_value < ALPHA else ''}",
            _ratio(c.cost_ratios.get("seconds")),
            _ratio(c.cost_ratios.get("flops")),
        ]
        if wide:
            cells[7:7] = [str(c.a_only), str(c.b_only)]
            cells.append(_ratio(c.cost_ratios.get("bytes")))
        table.add_row(*cells)
    return table


def compare_plot(rows: list[Any], path: Path, label_a: str, label_b: str) -> Path:
    """Accuracy difference B - A per strategy with its paired interval (left) and the time
    ratio B / A (right, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c.strategy for c in rows]
    ys = list(range(len(rows)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 1.2 + 0.5 * len(rows)), squeeze=True)
    diffs = [100 * c.diff for c in rows]
    xerr = [
        [max(0.0, 100 * (c.diff - c.ci_lo)) for c in rows],
        [max(0.0, 100 * (c.ci_hi - c.diff)) for c in rows],
    ]
    left.errorbar(diffs, ys, xerr=xerr, fmt="o", capsize=3)
    left.axvline(0, color="tab:gray", linewidth=1)
    for y, c in zip(ys, rows, strict=True):
        left.annotate(f"p={c.p_value:.3f}", (100 * c.diff, y), xytext=(4, 5), fontsize=8,
                      textcoords="offset points")  # fmt: skip
    left.set_yticks(ys, names)
    left.set_xlabel("accuracy B - A (points, 95% paired CI)")
    times = [c.cost_ratios.get("seconds") for c in rows]
    shown = [(y, t) for y, t in zip(ys, times, strict=True) if t is not None]
    if shown:
        ratios = [t for _, t in shown]
        right.barh([y for y, _ in shown], ratios, color="tab:orange", alpha=0.7)
        if max(ratios) / max(min(ratios), 1e-12) > 10:  # ratios spanning decades
            right.set_xscale("log")
    right.axvline(1, color="tab:gray", linewidth=1)
    right.set_yticks(ys, names)
    right.set_xlabel("time per problem B / A")
    fig.suptitle(f"A = {label_a}   B = {label_b}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare_cmd(
    run_a: Annotated[Path, typer.Argument(help="eval folder A (the baseline)")],
    run_b: Annotated[Path, typer.Argument(help="eval folder B")],
    strategy: Annotated[
        list[str] | None,
        typer.Option(
            "--strategy", "-s", help="only this strategy (repeatable; default: every shared one)"
        ),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="where to write the plot (default: B/compare.png)")
    ] = None,
    json_out: JsonOpt = False,
    wide: WideOpt = False,
) -> None:
    """Compare two eval runs on their shared problems: per strategy the accuracy difference
    with a paired bootstrap CI and exact McNemar p, and cost ratios B/A."""
    from ttscale.eval.compare import compare_runs, settings_diff

    settings_a, records_a = _read_run(run_a)
    settings_b, records_b = _read_run(run_b)
    try:
        rows = compare_runs(records_a, records_b, strategy or None)
    except ValueError as e:
        _fail(e)
    differs = settings_diff(settings_a, settings_b)
    plot_path = compare_plot(rows, plot or run_b / "compare.png", str(run_a), str(run_b))
    if json_out:
        payload = {
            "a": str(run_a),
            "b": str(run_b),
            "settings_diff": differs,
            "strategies": [c.to_dict() for c in rows],
            "plot": str(plot_path),
        }
        print(json.dumps(payload))
        return
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    err.print(f"A = {escape(str(run_a))}, B = {escape(str(run_b))}", soft_wrap=True)
    for line in differs or ["(same settings)"]:
        err.print(f"[dim]settings: {escape(line)}[/dim]", soft_wrap=True)
    console.print(compare_table(rows, wide))
    for c in rows:
        if c.only_in_a or c.only_in_b:
            err.print(
                f"[dim]{escape(c.strategy)}: {c.only_in_a} problems only in A, {c.only_in_b} "
                "only in B (left out)[/dim]",
                soft_wrap=True,
            )
    err.print(f"[dim]plot: {escape(str(plot_path))}[/dim]", soft_wrap=True)


__all__ = ["compare_cmd", "compare_plot", "compare_table"]
