"""Command `solve`: one question, one strategy, with a live status line while it runs. A
plain function so the main app can register it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.markup import escape

from ttscale.eval.cli import (
    DtypeOpt,
    HygieneOpt,
    JsonOpt,
    KvOpt,
    ModelOpt,
    QuantizeOpt,
    ScorerOpt,
    ThreadsOpt,
    _fail,
    _load_llm,
    _params,
    _strategies,
    check_max_tokens,
    check_scorer,
    err,
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


class _SteppingEngine:
    """The engine as `drive` sees it, reporting each step to a callback: `drive` needs only
    `step` and `has_unfinished`, and the progress display must not step the engine itself."""

    def __init__(self, engine: Any, on_step: Any) -> None:
        self._engine, self._on_step = engine, on_step
        self.steps = 0

    @property
    def has_unfinished(self) -> bool:
        return self._engine.has_unfinished

    def step(self) -> Any:
        outputs = self._engine.step()
        self.steps += 1
        self._on_step(self.steps)
        return outputs


@contextmanager
def _solve_progress(engine: Any, strategy: str, enabled: bool) -> Iterator[Any]:
    """A live status line on stderr while a strategy runs (engine steps, KV blocks in use,
    elapsed time); yields the engine `drive` should step. Off when stderr is not a terminal."""
    if not enabled:
        yield engine
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task_id = bar.add_task(strategy)
        t0 = time.perf_counter()

        def on_step(steps: int) -> None:
            kv = engine.kv_stats()
            bar.update(
                task_id,
                description=f"{strategy}: {steps} steps ({steps / (time.perf_counter() - t0):.0f}"
                f"/s), KV {kv['num_used_blocks']}/{kv['num_blocks']} blocks",
            )

        yield _SteppingEngine(engine, on_step)


def _solve_one(engine: Any, llm: Any, query: Any, strategy: str) -> Any:
    """`solve_many` for one query, on `engine` (the progress wrapper or the engine)."""
    from ttscale.strategies import make_strategy
    from ttscale.tts.session import Session, drive

    strat = make_strategy(strategy)
    if strat.needs_scorer and query.scorer is None:
        raise ValueError(f"{strategy} selects by score: pass a scorer")
    return drive(engine, [strat.solve(Session(llm.engine, query.prompt_token_ids), query)])[0]


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
    dtype: DtypeOpt = "float32",
    json_out: JsonOpt = False,
    hygiene: HygieneOpt = True,
) -> None:
    """Solve one question with a strategy: the answer on stdout; votes and cost on stderr."""
    from ttscale.scorers import load_scorer
    from ttscale.strategies import make_strategy
    from ttscale.strategies.api import make_query
    from ttscale.tts.hygiene import Hygiene

    specs = _strategies(strategy)
    if len(specs) != 1:
        _fail("solve takes one strategy")
    strategy = specs[0]
    check_scorer(scorer)
    params = _params(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    try:
        needs_scorer = make_strategy(strategy).needs_scorer
        # Built-in scorers load now (a typo costs no model load); a probe is checked against
        # the model, so it loads right after it, still before any sampling.
        the_scorer = load_scorer(scorer) if needs_scorer and not _model_bound(scorer) else None
    except ValueError as e:
        _fail(e)
    llm = _load_llm(model, threads, kv_cache_gb, quantize, dtype)
    check_max_tokens(llm, max_tokens)
    try:
        if needs_scorer and the_scorer is None:
            the_scorer = load_scorer(scorer, llm.source)
        query = make_query(
            llm, question, params=params, scorer=the_scorer, hygiene=Hygiene(enabled=hygiene)
        )
        with _solve_progress(llm.engine, strategy, enabled=err.is_terminal) as engine:
            result = _solve_one(engine, llm, query, strategy)
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


__all__ = ["solve_cmd"]
