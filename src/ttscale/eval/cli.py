"""Commands `eval` (strategies on a task, resumable, summary + Pareto plot) and `solve` (one
question, one strategy). Plain functions so the main app can register them:
``app.command("eval")(eval_cmd)``; ``python -m ttscale.eval.cli`` runs them standalone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, NoReturn

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
QuantizeOpt = Annotated[
    str,
    typer.Option(
        help="what the matmuls compute with: auto (a GGUF's own quantization), none, native, "
        "int8, int4"
    ),
]
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


def _load_llm(
    model: str | None, threads: int | None, kv_cache_gb: float | None, quantize: str = "auto"
) -> Any:
    from ttscale.errors import ModelLoadError
    from ttscale.llm import LLM

    options = {} if kv_cache_gb is None else {"kv_cache_gb": kv_cache_gb}
    try:
        llm = LLM(model, num_threads=threads, quantize=quantize, **options)
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


def _strategies(spec: str) -> list[str]:
    from ttscale.strategies import make_strategy

    specs = [s.strip() for s in spec.split(",") if s.strip()]
    if not specs:
        _fail("no strategy given (e.g. --strategies greedy,majority@8)")
    for s in specs:
        try:
            make_strategy(s)
        except ValueError as e:
            _fail(e)
    return specs


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
    json_out: JsonOpt = False,
    no_resume: Annotated[
        bool, typer.Option("--no-resume", help="delete earlier results in --out and start over")
    ] = False,
    hygiene: HygieneOpt = True,
) -> None:
    """Evaluate strategies on the same problems: records, summary and a Pareto plot in --out.
    Rerunning resumes (finished problems are skipped)."""
    from ttscale.eval.harness import run_eval
    from ttscale.eval.report import pareto_plot, print_summary
    from ttscale.tasks import load_task
    from ttscale.tts.hygiene import Hygiene

    specs = _strategies(strategies)
    params = _params(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    try:  # before the model: a typo should not cost a model load
        the_task = load_task(task, difficulty)
    except ValueError as e:
        _fail(e)
    llm = _load_llm(model, threads, kv_cache_gb, quantize)
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
            hygiene=Hygiene(enabled=hygiene),
        )
    except ValueError as e:  # settings mismatch, bad scorer, prompt too long
        _fail(e)
    plot = pareto_plot(summary, out / "pareto.png")
    if json_out:
        print_summary(summary, err if err.is_terminal else Console(stderr=True, width=200))
        print(json.dumps(summary))
    else:
        print_summary(summary)
    err.print(
        f"[dim]results in {escape(str(out))} (plot: {escape(str(plot))})[/dim]", soft_wrap=True
    )


def _result_json(result: Any) -> dict[str, Any]:
    from ttscale.eval.store import finite_or_none, jsonable, stats_fields

    return {
        "strategy": result.strategy,
        "answer": result.answer,
        "text": result.text,
        "votes": jsonable(result.votes),
        "candidates": [
            {
                "answer": c.answer,
                "score": finite_or_none(c.score),
                "tokens": c.tokens,
                "finish_reason": c.finish_reason,
                "dropped": c.dropped,
            }
            for c in result.candidates
        ],
        "stats": stats_fields(result.stats),
        "extra": jsonable(result.extra),
    }


def _model_bound(scorer: str) -> bool:
    """A scorer that must match the model (a probe reads its hidden states)."""
    return scorer == "probe" or scorer.startswith("probe:")


def solve_cmd(
    question: Annotated[str, typer.Argument(help="the question")],
    strategy: Annotated[str, typer.Option("--strategy", "-s")] = "majority@8",
    model: ModelOpt = None,
    scorer: ScorerOpt = "logprob",
    max_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.95,
    seed: int = 0,
    threads: ThreadsOpt = None,
    kv_cache_gb: KvOpt = None,
    quantize: QuantizeOpt = "auto",
    json_out: JsonOpt = False,
    hygiene: HygieneOpt = True,
) -> None:
    """Solve one question with a strategy: the answer on stdout; votes and cost on stderr."""
    from ttscale.scorers import load_scorer
    from ttscale.strategies import make_strategy
    from ttscale.strategies.api import make_query, solve_many
    from ttscale.tts.hygiene import Hygiene

    specs = _strategies(strategy)
    if len(specs) != 1:
        _fail("solve takes one strategy")
    strategy = specs[0]
    params = _params(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    try:
        needs_scorer = make_strategy(strategy).needs_scorer
        # Built-in scorers load now (a typo costs no model load); a probe is checked against
        # the model, so it loads right after it, still before any sampling.
        the_scorer = load_scorer(scorer) if needs_scorer and not _model_bound(scorer) else None
    except ValueError as e:
        _fail(e)
    llm = _load_llm(model, threads, kv_cache_gb, quantize)
    try:
        if needs_scorer and the_scorer is None:
            the_scorer = load_scorer(scorer, llm.source)
        query = make_query(
            llm, question, params=params, scorer=the_scorer, hygiene=Hygiene(enabled=hygiene)
        )
        result = solve_many(llm, [query], strategy)[0]
    except ValueError as e:
        _fail(e)

    data = _result_json(result)
    if json_out:
        print(json.dumps(data))
        return
    print(result.answer if result.answer is not None else "(no answer)")
    if result.votes:
        total = sum(result.votes.values()) or 1.0
        ranked = sorted(result.votes.items(), key=lambda kv: -kv[1])
        cells = ", ".join(f"{escape(a)}: {v:g} ({100 * v / total:.0f}%)" for a, v in ranked)
        err.print(f"votes: {cells}", soft_wrap=True)
    scored = [c for c in result.candidates if c.score is not None]
    if scored:
        cells = ", ".join(
            f"{escape(str(c.answer))}: {c.score:.3f}"
            for c in sorted(scored, key=lambda c: -c.score)
        )
        err.print(f"scores: {cells}", soft_wrap=True)
    elif not result.votes and len(result.candidates) > 1:
        answers = ", ".join(escape(str(c.answer)) for c in result.candidates)
        err.print(f"answers: {answers}", soft_wrap=True)
    s = data["stats"]
    cost = (
        f"generated {s.get('generated_tokens', 0)} tok in {len(result.candidates)} candidate(s); "
        f"prompt {s.get('prompt_tokens', 0)} tok (computed {s.get('computed_prompt_tokens', 0)}, "
        f"cached {s.get('cached_prompt_tokens', 0)}); forks {s.get('forks', 0)}; "
        f"peak KV {s.get('peak_kv_blocks', 0)} blocks; {s.get('wall_time', 0.0):.2f} s"
    )
    if s.get("flops") is not None:
        cost += f"; {s['flops']:.3g} FLOPs"
    if s.get("bytes") is not None:
        cost += f", {s['bytes']:.3g} bytes"
    err.print(f"[dim]{cost}[/dim]", soft_wrap=True)


def make_app() -> typer.Typer:
    """A standalone app with both commands (the main `ttscale` app registers them itself)."""
    app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
    app.command("eval")(eval_cmd)
    app.command("solve")(solve_cmd)
    return app


__all__ = ["eval_cmd", "make_app", "solve_cmd"]

if __name__ == "__main__":
    make_app()()
