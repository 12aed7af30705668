"""Command line: `ttscale generate | chat | solve | eval | plan | serve | cost | calibrate`."""

from __future__ import annotations

import functools
import importlib
import json
import sys
from collections.abc import Callable
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from ttscale.errors import ModelLoadError
from ttscale.sampling.params import SamplingParams

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
err = Console(stderr=True)

ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="HF folder or .gguf file (default: embedded SmolLM2)"),
]
ThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads for torch")]
QuantizeOpt = Annotated[
    str,
    typer.Option(
        help="what the matmuls compute with: auto (a GGUF's own quantization), none, native, "
        "int8, int4"
    ),
]


def _load(model: str | None, threads: int | None, **options):
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
    llm = _load(model, threads, quantize=quantize)
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
    u = out.usage
    err.print(
        f"[dim]prompt {u.prompt_tokens} tok (cached {u.cached_prompt_tokens}, computed "
        f"{u.computed_prompt_tokens}), generated {u.generated_tokens} tok, "
        f"peak KV {u.peak_kv_blocks} blocks[/dim]"
    )


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
) -> None:
    """Interactive chat with streaming output. Ctrl-D or /exit to quit."""
    params = _params(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    llm = _load(model, threads, quantize=quantize)
    history = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip() in {"/exit", "/quit"}:
            return
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        text = llm.tokenizer.apply_chat_template(history)
        ids = llm.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= llm.engine.max_model_len:
            err.print("[red]conversation exceeds the context; start a new chat[/red]")
            history.pop()
            continue
        reply = ""
        sys.stdout.write("assistant> ")
        for out in llm.stream(ids, params, text):
            delta = out.outputs[0].text_delta
            reply += delta
            sys.stdout.write(delta)
            sys.stdout.flush()
        print()
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
    "eval": ("matplotlib",),
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


def _register_subsystem_commands() -> None:
    """Commands owned by their subsystems, registered here so `ttscale --help` lists them."""
    from ttscale.calibration.cli import calibrate_cmd
    from ttscale.cost.cli import cost
    from ttscale.eval.cli import eval_cmd, solve_cmd
    from ttscale.plan.cli import plan_cmd
    from ttscale.server.cli import serve
    from ttscale.verifier.cli import train_verifier

    commands = {
        "cost": (cost, "Predict a run's cost on some hardware without running it."),
        "calibrate": (calibrate_cmd, "Measure this machine's FLOP/s and memory bandwidth."),
        "serve": (serve, "OpenAI-compatible HTTP server."),
        "eval": (eval_cmd, "Compare strategies on a task: table, JSONL, Pareto plot."),
        "solve": (solve_cmd, "Answer one question with a strategy; show votes and cost."),
        "plan": (plan_cmd, "Plan test-time compute per difficulty within a budget."),
        "train-verifier": (
            train_verifier,
            "Train a probe verifier on the policy's hidden states (samples, labels, fit).",
        ),
    }
    for name, (command, help_text) in commands.items():
        app.command(name, help=help_text)(_needs_extras(name, command))


_register_subsystem_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
