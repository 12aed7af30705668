"""Commands `eval` (strategies on a task, resumable, summary + Pareto plot) and `solve` (one
question, one strategy). Plain functions so the main app can register them:
``app.command("eval")(eval_cmd)``; ``python -m ttscale.eval.cli`` runs them standalone."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

err = Console(stderr=True)

ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="HF folder or .gguf file (default: embedded SmolLM2)"),
]
ScorerOpt = Annotated[
    str,
    typer.Option(
        help="verifier for strategies that select by score: logprob, judge, probe (the shipped "
        "probe for the embedded model), probe:PATH, rm:PATH"
    ),
]
ThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads for torch")]
KvOpt = Annotated[float | None, typer.Option(help="KV cache size in GB (default: automatic)")]
# The choices are written out (not imported) so that `--help` and a bad value answer without
# importing torch; the LLM checks them again (models/quant.py QUANTIZE_OPTIONS, llm._DTYPES).
QuantizeOpt = Annotated[
    Literal["auto", "none", "native", "int8", "int4"],
    typer.Option(help="what the matmuls compute with (auto: a GGUF's own quantization)"),
]
DtypeOpt = Annotated[
    Literal["float32", "bfloat16", "float16"],
    typer.Option(help="weights and activations outside the quantized matmuls"),
]
WideOpt = Annotated[
    bool, typer.Option("--wide", help="every table column (the default fits 100 columns)")
]
# Scorer names that need no file; probe:PATH and rm:PATH need theirs (scorers.SCORER_SPECS).
SCORER_NAMES = ("logprob", "likelihood", "judge", "probe")
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON on stdout (the rest: stderr)")]
HygieneOpt = Annotated[
    bool,
    typer.Option(
        "--hygiene/--no-hygiene",
        help="exclude cut-off and looping candidates from voting and selection",
    ),
]


def _fail(message: object) -> NoReturn:
    """Bad input: one line on stderr and exit code 2 (as for a usage error), no traceback."""
    text = " ".join(str(message).split()) or type(message).__name__
    err.print(f"[red]error:[/red] {escape(text)}", soft_wrap=True)  # one line, not wrapped
    raise typer.Exit(2)


def check_scorer(spec: str) -> None:
    """Refuses a scorer that cannot exist, before anything loads: an unknown name, or a
    probe / reward-model path that is not there."""
    kind, sep, path = spec.partition(":")
    if not sep and kind in SCORER_NAMES:
        return
    if sep and kind in ("probe", "rm") and path:
        if not Path(path).expanduser().exists():
            _fail(f"--scorer {spec}: {path} does not exist")
        return
    _fail(f"unknown scorer {spec!r}: use logprob, judge, probe, probe:PATH or rm:PATH")


def check_max_tokens(llm: Any, max_tokens: int) -> None:
    """Refuses --max-tokens the context cannot hold (checked once the model's context is
    known, before any generation)."""
    limit = llm.engine.max_model_len
    if max_tokens >= limit:
        _fail(
            f"--max-tokens {max_tokens} does not fit the context of {limit} tokens (prompt "
            f"included); use at most {limit - 1}, less the prompt"
        )


def model_source(model: str | None) -> str:
    """What `LLM(model).source` will be, found without loading the weights (it imports the
    loader, not the model): lets a settings mismatch be refused before the load."""
    from ttscale.errors import ModelLoadError
    from ttscale.loader import resolve_model_path
    from ttscale.loader.default_model import default_model_path

    try:
        return str(default_model_path() if model is None else resolve_model_path(model))
    except (ModelLoadError, FileNotFoundError) as e:
        _fail(e)


def numerics(dtype: str, quantize: str) -> dict[str, str]:
    """The non-default numeric settings: part of an eval's settings (default runs keep the
    settings they had before these options existed)."""
    out = {}
    if dtype != "float32":
        out["dtype"] = dtype
    if quantize != "auto":
        out["quantize"] = quantize
    return out


def _load_llm(
    model: str | None,
    threads: int | None,
    kv_cache_gb: float | None,
    quantize: str = "auto",
    dtype: str = "float32",
) -> Any:
    from ttscale.errors import ModelLoadError
    from ttscale.llm import LLM

    options = {} if kv_cache_gb is None else {"kv_cache_gb": kv_cache_gb}
    try:
        llm = LLM(model, num_threads=threads, quantize=quantize, dtype=dtype, **options)
    except (ModelLoadError, FileNotFoundError, ValueError) as e:
        _fail(e)
    err.print(f"[dim]loaded {escape(str(llm.source))} in {llm.load_seconds:.1f} s[/dim]")
    return llm


def _params(**kwargs: Any) -> Any:
    from ttscale.sampling.params import SamplingParams

    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        _fail(e)


def split_specs(text: str) -> list[str]:
    """A comma-separated list of strategy specs whose own sampling options are comma-separated
    too: `greedy,majority@4:t=0.5,p=0.95` is `greedy` and `majority@4:t=0.5,p=0.95` (a piece
    that is a bare `key=value` belongs to the spec before it)."""
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if specs and ":" in specs[-1] and "=" in piece and "@" not in piece and ":" not in piece:
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    return specs


def _strategies(spec: str) -> list[str]:
    from ttscale.strategies import make_strategy

    specs = split_specs(spec)
    if not specs:
        _fail("no strategy given (e.g. --strategies greedy,majority@8)")
    for s in specs:
        try:
            make_strategy(s)
        except ValueError as e:
            _fail(e)
    return specs


def _resume_command() -> str:
    """The command line that resumes this run: the same arguments, without --no-resume."""
    args = [a for a in sys.argv[1:] if a != "--no-resume"]
    return " ".join(shlex.quote(a) for a in ["ttscale", *args])


def eval_cmd(
    task: Annotated[
        str, typer.Option(help="reasoning-gym dataset, 'arithmetic', or a .jsonl file")
    ] = "arithmetic",
    n_problems: Annotated[int, typer.Option("--n-problems", "-n", min=1)] = 20,
    strategies: Annotated[
        str, typer.Option("--strategies", "-s", help="comma-separated specs")
    ] = "greedy,majority@8",
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = Path("runs/eval"),
    model: ModelOpt = None,
    scorer: ScorerOpt = "logprob",
    max_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.95,
    seed: Annotated[int, typer.Option(help="problem set and sampling seed")] = 0,
    difficulty: Annotated[str | None, typer.Option(help="easy / medium / hard")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="problems run at once")] = 8,
    threads: ThreadsOpt = None,
    kv_cache_gb: KvOpt = None,
    quantize: QuantizeOpt = "auto",
    dtype: DtypeOpt = "float32",
    json_out: JsonOpt = False,
    wide: WideOpt = False,
    no_resume: Annotated[
        bool, typer.Option("--no-resume", help="delete earlier results in --out and start over")
    ] = False,
    hygiene: HygieneOpt = True,
) -> None:
    """Evaluate strategies on the same problems: records, summary and a Pareto plot in --out.
    Rerunning resumes (finished problems are skipped; a finished run loads no model)."""
    from ttscale.eval.harness import run_eval
    from ttscale.eval.store import (
        RECORDS_FILE,
        SettingsMismatch,
        check_out_dir,
        load_records,
        run_settings,
    )
    from ttscale.eval.summary import summarize_records
    from ttscale.tasks import load_task
    from ttscale.tts.hygiene import Hygiene

    # Everything that needs no model is checked first: a typo should not cost a model load.
    specs = list(dict.fromkeys(_strategies(strategies)))
    check_scorer(scorer)
    params = _params(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    try:
        the_task = load_task(task, difficulty)
        problems = the_task.problems(n_problems, seed)
    except ValueError as e:
        _fail(e)
    if not problems:
        _fail(f"task {task!r} gave no problems")
    if len(problems) < n_problems:
        err.print(
            f"[yellow]note:[/yellow] {escape(task)} has {len(problems)} problems, not "
            f"{n_problems}: running {len(problems)}",
            soft_wrap=True,
        )
    engine_numerics = numerics(dtype, quantize)
    the_hygiene = Hygiene(enabled=hygiene)
    settings = run_settings(
        model_source(model), the_task, params, seed, scorer, None, the_hygiene, engine_numerics
    )
    summary = None
    if not no_resume:
        try:
            if check_out_dir(out, settings):
                ids = [p.id for p in problems]
                records = [r for r in load_records(out / RECORDS_FILE) if r["strategy"] in specs]
                done = {(r["strategy"], r["problem_id"]) for r in records}
                if all((s, i) in done for s in specs for i in ids):
                    err.print(f"[dim]{escape(str(out))} has every result: nothing to run[/dim]")
                    rows = summarize_records(records, ids, specs)
                    summary = {"settings": settings, "n_problems": len(ids), "strategies": rows}
        except ValueError as e:  # SettingsMismatch, a corrupt records file
            _fail(e)
    if summary is None:
        llm = _load_llm(model, threads, kv_cache_gb, quantize, dtype)
        check_max_tokens(llm, max_tokens)
        try:
            summary = run_eval(
                llm,
                the_task,
                specs,
                n_problems,
                out,
                seed=seed,
                params=params,
                scorer_spec=scorer,
                concurrency=concurrency,
                resume=not no_resume,
                progress=True,
                hygiene=the_hygiene,
                numerics=engine_numerics,
            )
        except (ValueError, SettingsMismatch) as e:  # bad scorer, prompt too long
            _fail(e)
        except KeyboardInterrupt:
            saved = len(load_records(out / RECORDS_FILE))
            total = len(specs) * len(problems)
            err.print(
                f"\ninterrupted: {escape(str(out / RECORDS_FILE))} holds {saved} results "
                f"(this run asked for {total}; a problem batch cut midway is not saved). "
                f"Resume with:\n  {escape(_resume_command())}",
                soft_wrap=True,
            )
            raise typer.Exit(130) from None
    _eval_report(summary, out, json_out, wide)


def _eval_report(summary: dict[str, Any], out: Path, json_out: bool, wide: bool) -> None:
    from ttscale.eval.report import pareto_plot, print_summary

    plot = pareto_plot(summary, out / "pareto.png")
    if json_out:
        print_summary(summary, err if err.is_terminal else Console(stderr=True, width=200), wide)
        print(json.dumps(summary))
    else:
        print_summary(summary, wide=wide)
    err.print(
        f"[dim]results in {escape(str(out))} (plot: {escape(str(plot))})[/dim]", soft_wrap=True
    )


def make_app() -> typer.Typer:
    """A standalone app with `eval` and `solve` (the main `ttscale` app registers them
    itself)."""
    from ttscale.eval.solve_cli import solve_cmd

    app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
    app.command("eval")(eval_cmd)
    app.command("solve")(solve_cmd)
    return app


__all__ = ["eval_cmd", "make_app"]

if __name__ == "__main__":
    make_app()()
