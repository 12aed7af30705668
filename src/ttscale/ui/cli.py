"""`ttscale ui`: the dashboard for eval folders on disk, without loading a model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def ui_cmd(
    runs: Annotated[
        Path, typer.Option("--runs", help="folder holding `ttscale eval --out` folders")
    ] = Path("runs"),
    host: Annotated[str, typer.Option(help="bind address (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8001,
) -> None:
    """Serve the dashboard's Runs page (sortable tables, Pareto plots, compare) for the eval
    folders under --runs. `ttscale serve` has the same pages live at /ui."""
    from ttscale.ui.offline import serve_offline

    if not runs.is_dir():
        raise typer.BadParameter(f"{runs}: no such folder", param_hint="--runs")
    serve_offline(runs, host, port)


__all__ = ["ui_cmd"]
