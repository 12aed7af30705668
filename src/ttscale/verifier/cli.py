"""`ttscale train-verifier`: a plain function so the main app registers it with
``app.command("train-verifier")(train_verifier)``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

err = Console(stderr=True)


def _fail(message: object) -> NoReturn:
    """Bad input: one line on stderr and exit code 2, no traceback."""
    text = " ".join(str(message).split()) or type(message).__name__
    err.print(f"[red]error:[/red] {escape(text)}", soft_wrap=True)
    raise typer.Exit(2)


def _layers(spec: str) -> tuple[int, ...]:
    if not spec.strip():
        return ()
    try:
        return tuple(int(x) for x in spec.split(","))
    except ValueError:
        _fail(f"--layers must be comma-separated integers, not {spec!r}")


def train_verifier(
    task: Annotated[str, typer.Option(help="task name (e.g. arithmetic) or .jsonl path")],
    n_problems: Annotated[int, typer.Option(help="training problems (search + refit)")] = 400,
    samples: Annotated[int, typer.Option(help="candidates sampled per problem")] = 16,
    temperature: Annotated[float, typer.Option(help="sampling temperature of the data")] = 0.7,
    out: Annotated[Path, typer.Option(help="probe folder to write")] = Path("verifiers/probe"),
    test_problems: Annotated[int, typer.Option(help="held-out problems (other seed)")] = 200,
    top_p: Annotated[float, typer.Option(help="nucleus sampling of the data")] = 0.95,
    max_tokens: Annotated[int, typer.Option(help="tokens per candidate")] = 160,
    layers: Annotated[str, typer.Option(help="layers to try, e.g. 12,21,30 (default: auto)")] = "",
    folds: Annotated[int, typer.Option(help="grouped cross-validation folds")] = 4,
    epochs: Annotated[int, typer.Option(help="full-batch training epochs")] = 300,
    seed: Annotated[int, typer.Option(help="fold split and head initialization")] = 0,
    difficulty: Annotated[str | None, typer.Option(help="task difficulty preset")] = None,
    data_dir: Annotated[Path, typer.Option(help="sample/feature cache")] = Path(
        "runs/verifier_data"
    ),
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="HF folder or .gguf (default: embedded)")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch")] = None,
    input_kind: Annotated[
        str,
        typer.Option(
            "--input",
            help="what the head reads: text (each candidate's tokens; partial paths too, for "
            "search), answer (each distinct answer restated) or likelihood (each distinct "
            "answer's log-likelihood after the bare question, and its vote count)",
        ),
    ] = "text",
    json_out: Annotated[bool, typer.Option("--json", help="print the card's metrics as JSON")] = (
        False
    ),
) -> None:
    """Train a probe on the policy's hidden states that predicts whether a candidate is
    correct; report held-out accuracy of probe-selected / probe-weighted answers."""
    from ttscale.errors import ModelLoadError
    from ttscale.tasks import load_task
    from ttscale.verifier.data import check_split
    from ttscale.verifier.pipeline import VerifierRun
    from ttscale.verifier.pipeline import train_verifier as run_pipeline

    # Every check that needs no model comes first: nothing is loaded or sampled on bad input.
    try:
        run = VerifierRun(
            task=task,
            n_problems=n_problems,
            samples=samples,
            temperature=temperature,
            out=out,
            test_problems=test_problems,
            top_p=top_p,
            max_tokens=max_tokens,
            layers=_layers(layers),
            folds=folds,
            epochs=epochs,
            seed=seed,
            data_dir=data_dir,
            input=input_kind,
            difficulty=difficulty,
        )
        task_obj = load_task(task, difficulty)
        check_split(task_obj, n_problems, test_problems)
    except ValueError as e:
        _fail(e)

    from ttscale.llm import LLM

    try:
        llm = LLM(model, num_threads=threads)
    except (ModelLoadError, FileNotFoundError, ValueError) as e:
        _fail(e)

    def log(msg: str) -> None:
        err.print(f"[dim]{escape(msg)}[/dim]")

    try:
        _, card = run_pipeline(llm, task_obj, run, log)
    except ValueError as e:
        _fail(e)
    test = card["metrics"]["test"]
    if json_out:
        print(json.dumps(card["metrics"], indent=2))
        return
    if run.input != "text":
        err.print(
            f"held-out {test['n_problems']} problems: "
            + ", ".join(
                f"{k} {test[k]['accuracy']:.1%} [{test[k]['lo']:.1%}, {test[k]['hi']:.1%}]"
                for k in ("probe", "majority")
            )
            + f"; probe vs majority {test['probe_vs_majority']}"
        )
        return
    acc = test["accuracy"]
    err.print(
        f"held-out {test['n_problems']} problems: "
        + ", ".join(
            f"{k} {v['accuracy']:.1%} [{v['lo']:.1%}, {v['hi']:.1%}]" for k, v in acc.items()
        )
    )
    err.print(
        f"pooled AUROC {test['pooled_auroc']:.3f}, within-problem AUROC "
        f"{test['within_auroc']:.3f}; weighted vs majority: "
        f"{test['tests']['weighted_vs_majority']}"
    )


if __name__ == "__main__":
    typer.run(train_verifier)
