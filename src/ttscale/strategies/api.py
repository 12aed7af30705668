"""Run strategies on questions: `solve` one, `solve_many` interleaved on one engine."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ttscale.llm import LLM
from ttscale.sampling.params import SamplingParams
from ttscale.scorers import Scorer, load_scorer
from ttscale.strategies import Query, SearchConfig, StrategyResult, make_strategy
from ttscale.tasks import answers
from ttscale.tts.hygiene import Hygiene
from ttscale.tts.session import Session, drive

DEFAULT_PARAMS = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=256, seed=0)
DEFAULT_INSTRUCTION = "Think step by step, then give the final answer on a line 'Answer: <value>'."


def make_query(
    llm: LLM,
    question: str,
    messages: list[dict[str, str]] | None = None,
    extract: Callable[[str], str | None] | None = None,
    params: SamplingParams = DEFAULT_PARAMS,
    scorer: Scorer | None = None,
    search: SearchConfig | None = None,
    hygiene: Hygiene | None = None,
) -> Query:
    if messages is None:
        messages = [{"role": "user", "content": f"{question}\n\n{DEFAULT_INSTRUCTION}"}]
    ids = llm.tokenizer.encode_chat(messages)
    if len(ids) >= llm.engine.max_model_len:
        raise ValueError(f"the prompt has {len(ids)} tokens; the context holds fewer")
    return Query(
        question=question,
        prompt_token_ids=ids,
        extract=extract or answers.extract_answer,
        params=params,
        scorer=scorer,
        search=search or SearchConfig(),
        hygiene=hygiene or Hygiene(),
    )


def solve_many(
    llm: LLM,
    queries: Sequence[Query],
    strategy: str,
    concurrency: int = 8,
) -> list[StrategyResult]:
    """Runs `strategy` on every query, up to `concurrency` problems at once on the engine, so
    their samples and branches share decode steps."""
    strat = make_strategy(strategy)
    results: list[StrategyResult] = []
    for start in range(0, len(queries), concurrency):
        chunk = queries[start : start + concurrency]
        for q in chunk:
            if strat.needs_scorer and q.scorer is None:
                raise ValueError(f"{strategy} selects by score: pass a scorer")
        jobs = [strat.solve(Session(llm.engine, q.prompt_token_ids), q) for q in chunk]
        results += drive(llm.engine, jobs)  # type: ignore[arg-type]
    return results


def solve(
    llm: LLM,
    question: str,
    strategy: str = "majority@8",
    scorer: str | Scorer | None = "logprob",
    params: SamplingParams = DEFAULT_PARAMS,
    **query_options,
) -> StrategyResult:
    """One question, one strategy. `scorer` is used only by strategies that select by score."""
    if isinstance(scorer, str):
        scorer = load_scorer(scorer, llm.source)  # a probe must match this model
    query = make_query(llm, question, params=params, scorer=scorer, **query_options)
    return solve_many(llm, [query], strategy)[0]


__all__ = ["DEFAULT_PARAMS", "make_query", "solve", "solve_many"]
