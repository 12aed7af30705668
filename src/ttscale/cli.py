"""Command line: `ttscale generate | chat | solve | eval | compare | plan | serve | ui | cost |
calibrate | train-verifier`."""

from __future__ import annotations

import functools
import importlib
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from ttscale.errors import ModelLoadError
from ttscale.eval.cli import DtypeOpt, check_max_tokens
from ttscale.eval.cli import QuantizeOpt as QuantizeOpt
from ttscale.sampling.params import SamplingParams

err = Console(stderr=True)

# Commands owned by their subsystems: the module and function that define each, and the line
# `ttscale --help` shows. They are imported only when run (or asked for their own --help):
# the cost model and the planner import torch, which would make every `--help` and argument
# error wait seconds (issue 16). A new subsystem command is one row here.
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "solve": (
        "ttscale.eval.solve_cli",
        "solve_cmd",
        "Answer one question with a strategy; show votes and cost.",
    ),
    "eval": (  # eval.cli's command with --ray / --address / --workers added
        "ttscale.ray.cli",
        "eval_cmd",
        "Compare strategies on a task: table, JSONL, Pareto plot.",
    ),
    "compare": (
        "ttscale.eval.compare_cli",
        "compare_cmd",
        "Compare two eval folders: paired accuracy tests and cost ratios.",
    ),
    "plan": (
        "ttscale.plan.cli",
        "plan_cmd",
        "Plan test-time compute per difficulty within a budget.",
    ),
    "serve": (  # server.cli's command with --ray / --replicas / ... added
        "ttscale.ray.cli",
        "serve_cmd",
        "OpenAI-compatible HTTP server (--ray: engine replicas on a Ray cluster).",
    ),
    "cost": (
        "ttscale.cost.cli",
        "cost",
        "Predict a run's cost on some hardware without running it.",
    ),
    "calibrate": (
        "ttscale.calibration.cli",
        "calibrate_cmd",
        "Measure this machine's FLOP/s and memory bandwidth.",
    ),
    "train-verifier": (
        "ttscale.verifier.cli",
        "train_verifier",
        "Train a probe verifier on the policy's hidden states (samples, labels, fit).",
    ),
    "ui": (
        "ttscale.ui.cli",
        "ui_cmd",
        "Dashboard of eval folders, offline (ttscale serve has it live at /ui).",
    ),
}


class _LazyGroup(TyperGroup):
    """The main group: `generate` and `chat` are defined here, the SUBCOMMANDS are imported
    on first use. While the group prints its own help, a subcommand is a stand-in with its
    name and help line only."""

    _listing = False

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*super().list_commands(ctx), *SUBCOMMANDS]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in SUBCOMMANDS:
            return super().get_command(ctx, cmd_name)
        if self._listing or ctx.resilient_parsing:
            help_line = SUBCOMMANDS[cmd_name][2]
            return click.Command(cmd_name, help=help_line, short_help=help_line)
        return _subcommand(cmd_name)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


@functools.cache
def _subcommand(name: str) -> click.Command:
    module, function, help_line = SUBCOMMANDS[name]
    try:
        command = getattr(importlib.import_module(module), function)
    except ModuleNotFoundError as e:  # a module that imports an optional package at the top
        root = (e.name or "").partition(".")[0]
        if root not in EXTRA_OF:
            raise
        _missing(name, root)
    single = typer.Typer(add_completion=False)
    single.command(name, help=help_line)(_needs_extras(name, command))
    return typer.main.get_command(single)


app = typer.Typer(cls=_LazyGroup, add_completion=False, no_args_is_help=True, help=__doc__)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"ttscale {version('ttscale')}")
        except PackageNotFoundError:  # run from a source tree without an install
            from ttscale import __version__

            print(f"ttscale {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="print the version"),
    ] = False,
) -> None:
    """Test-time scaling of language models."""


ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="HF folder or .gguf file (default: embedded SmolLM2)"),
]
ThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads for torch")]


def _load(model: str | None, threads: int | None, **options: Any) -> Any:
    from ttscale.llm import LLM

    try:
        llm = LLM(model, num_threads=threads, **options)
    except (ModelLoadError, FileNotFoundError, ValueError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    err.print(f"[dim]loaded {llm.source} in {llm.load_seconds:.1f} s[/dim]")
    return llm


def _params(**kwargs) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the user message (or raw text with --raw)")],
    model: ModelOpt = None,
    n: Annotated[int, typer.Option("-n", help="number of samples")] = 1,
    max_tokens: int = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeatable)")] = None,
    raw: Annotated[bool, typer.Option(help="don't apply the chat template")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    threads: ThreadsOpt = None,
    quantize: QuantizeOpt = "auto",
    dtype: DtypeOpt = "float32",
) -> None:
    """Generate an answer (n samples share the prompt's KV cache)."""
    params = _params(
        n=n,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        seed=seed,
        stop=tuple(stop or ()),
    )
    llm = _load(model, threads, quantize=quantize, dtype=dtype)
    check_max_tokens(llm, max_tokens)
    try:
        if raw or not llm.tokenizer.has_chat_template:
            out = llm.generate(prompt, params)[0]
        else:
            out = llm.chat([{"role": "user", "content": prompt}], params)[0]
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    if json_out:
        print(
            json.dumps(
                {
                    "outputs": [
                        {
                            "text": o.text,
                            "finish_reason": o.finish_reason,
                            "tokens": len(o.token_ids),
                        }
                        for o in out.outputs
                    ],
                    "usage": vars(out.usage),
                }
            )
        )
        return
    for o in out.outputs:
        if n > 1:
            err.print(f"[bold]--- sample {o.index} ({o.finish_reason})[/bold]")
        print(o.text)
        if o.finish_reason == "length":
            err.print(f"[yellow]\\[cut off at --max-tokens {max_tokens}][/yellow]")
    u = out.usage
    err.print(
        f"[dim]prompt {u.prompt_tokens} tok (cached {u.cached_prompt_tokens}, computed "
        f"{u.computed_prompt_tokens}), generated {u.generated_tokens} tok, "
        f"peak KV {u.peak_kv_blocks} blocks[/dim]"
    )


CHAT_HELP = """commands:
  /help           this list
  /reset          forget the conversation (keeps the system prompt)
  /system TEXT    set the system prompt and start over (/system alone: remove it)
  /save FILE      write the conversation as JSON
  /exit, /quit    leave (or Ctrl-D)
Ctrl-C while the model answers stops the answer; at the prompt it leaves."""


class _StopOnInterrupt:
    """Ctrl-C while a reply streams sets a flag instead of raising inside an engine step,
    so the reply ends between steps, its request is aborted cleanly and the chat goes on."""

    def __init__(self) -> None:
        self.stopped = False

    def __enter__(self) -> _StopOnInterrupt:
        self._previous = signal.signal(signal.SIGINT, self._stop)
        return self

    def _stop(self, signum: int, frame: object) -> None:
        self.stopped = True

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)


def _chat_command(line: str, history: list[dict[str, str]]) -> bool:
    """Runs a /command on the history; False when the chat should end."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/help":
        err.print(escape(CHAT_HELP))
    elif name == "/reset":
        del history[1 if history and history[0]["role"] == "system" else 0 :]
        err.print("[dim]conversation cleared[/dim]")
    elif name == "/system":
        history.clear()
        if arg:
            history.append({"role": "system", "content": arg})
        err.print(f"[dim]system prompt {'set' if arg else 'removed'}; conversation cleared[/dim]")
    elif name == "/save":
        if not arg:
            err.print("[red]usage: /save FILE[/red]")
        else:
            try:
                Path(arg).write_text(json.dumps(history, indent=2) + "\n", encoding="utf-8")
                err.print(f"[dim]saved {len(history)} messages to {escape(arg)}[/dim]")
            except OSError as e:
                err.print(f"[red]cannot save: {escape(str(e))}[/red]")
    else:
        err.print(f"[red]unknown command {escape(name)}[/red] (/help lists them)")
    return True


@app.command()
def chat(
    model: ModelOpt = None,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
    max_tokens: int = 512,
    temperature: float = 0.7,
    top_p: float = 0.95,
    seed: int | None = None,
    threads: ThreadsOpt = None,
    quantize: QuantizeOpt = "auto",
    dtype: DtypeOpt = "float32",
) -> None:
    """Interactive streaming chat: /help for commands, Ctrl-C stops a reply, Ctrl-D quits."""
    params = _params(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    llm = _load(model, threads, quantize=quantize, dtype=dtype)
    check_max_tokens(llm, max_tokens)
    history = [{"role": "system", "content": system}] if system else []
    err.print("[dim]/help for commands[/dim]")
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line.strip():
            continue
        if line.startswith("/"):
            if not _chat_command(line, history):
                return
            continue
        history.append({"role": "user", "content": line})
        text = llm.tokenizer.apply_chat_template(history)
        ids = llm.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= llm.engine.max_model_len:
            err.print("[red]conversation exceeds the context; /reset to start over[/red]")
            history.pop()
            continue
        reply, finish = "", None
        sys.stdout.write("assistant> ")
        with _StopOnInterrupt() as interrupt:
            replies = llm.stream(ids, params, text)
            for out in replies:
                delta = out.outputs[0].text_delta
                reply += delta
                finish = out.outputs[0].finish_reason
                sys.stdout.write(delta)
                sys.stdout.flush()
                if interrupt.stopped:
                    replies.close()  # aborts the request: its KV blocks are freed
                    break
        print()
        if interrupt.stopped:
            err.print("[yellow]\\[stopped][/yellow]")
        elif finish == "length":
            err.print(f"[yellow]\\[cut off at --max-tokens {max_tokens}][/yellow]")
        history.append({"role": "assistant", "content": reply})


# Packages outside the core install, and the extra that brings each (pyproject.toml). The
# subsystems' CLI modules import only typer and rich at the top, so every command is listed
# and `generate` / `chat` run without them. (pydantic is in [server] too, but recent typer
# releases depend on it, so it is always there.)
EXTRA_OF = {
    "fastapi": "server",
    "starlette": "server",
    "uvicorn": "server",
    "prometheus_client": "server",
    "reasoning_gym": "eval",
    "matplotlib": "eval",
}
# What a command needs whatever its arguments, checked before it starts: `eval` plots only
# at the end, and a missing matplotlib should not cost a whole run to find out.
NEEDS = {
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
    "ui": ("fastapi", "uvicorn"),
    "eval": ("matplotlib",),
    "compare": ("matplotlib",),
    "train-verifier": ("reasoning_gym",),
}


def _missing(command: str, module: str) -> NoReturn:
    err.print(
        f"[red]error:[/red] `ttscale {command}` needs {module}, which is not installed: "
        + escape(f"pip install 'ttscale[{EXTRA_OF[module]}]'")  # [..] is not rich markup
    )
    raise typer.Exit(2)


def _needs_extras(name: str, command: Callable[..., Any]) -> Callable[..., Any]:
    """`command`, answering a missing optional package with the extra that installs it (a
    gym task without reasoning-gym is found only when the task loads, hence the except)."""

    @functools.wraps(command)  # typer reads the options from the wrapped signature
    def run(*args: Any, **kwargs: Any) -> Any:
        for module in NEEDS.get(name, ()):
            try:
                importlib.import_module(module)
            except ModuleNotFoundError:
                _missing(name, module)
        try:
            return command(*args, **kwargs)
        except ModuleNotFoundError as e:
            root = (e.name or "").partition(".")[0]
            if root not in EXTRA_OF:
                raise
            _missing(name, root)

    return run


def main() -> None:
    app()


if __name__ == "__main__":
    main()
