"""One engine per Ray actor: `EngineWorker` holds an `LLM` and runs strategies on it.

The class is plain Python (the pool wraps it with ``ray.remote``), so what a worker computes is
exactly what one process computes: queries built by `make_query`, strategies run by
`strategies.api.solve_many`, records made by `eval.store.make_record`. Each record keeps the
FLOPs, bytes and seconds of the worker that ran it, plus the worker's name.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ttscale.eval.store import make_record
from ttscale.strategies.api import DEFAULT_PARAMS, make_query, solve_many

if TYPE_CHECKING:
    from ttscale.llm import LLM
    from ttscale.sampling.params import SamplingParams
    from ttscale.scorers import Scorer
    from ttscale.strategies.base import SearchConfig, StrategyResult
    from ttscale.tasks import Problem, Task
    from ttscale.tts.hygiene import Hygiene


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker of a pool loads: the model, its engine options, torch threads."""

    model: str | None = None  # None: the embedded SmolLM2
    num_threads: int = 1
    quantize: str = "auto"
    dtype: str = "float32"
    engine_options: dict[str, Any] = field(default_factory=dict)  # LLM(**engine_options)

    def __post_init__(self) -> None:
        if self.num_threads < 1:
            raise ValueError("num_threads must be >= 1")
        reserved = {"num_threads", "quantize", "model", "dtype"} & set(self.engine_options)
        if reserved:
            raise ValueError(f"pass {sorted(reserved)} as WorkerConfig fields")

    def numerics(self) -> dict[str, str]:
        """The non-default dtype / quantize: part of an eval's settings (as `eval.cli`)."""
        out = {}
        if self.dtype != "float32":
            out["dtype"] = self.dtype
        if self.quantize != "auto":
            out["quantize"] = self.quantize
        return out

    def load(self) -> LLM:
        from ttscale.llm import LLM

        return LLM(
            self.model,
            num_threads=self.num_threads,
            quantize=self.quantize,
            dtype=self.dtype,
            **self.engine_options,
        )


class EngineWorker:
    """An engine and the scorers loaded for it. Not thread-safe: a Ray actor runs one call at
    a time (the default), which is what the engine needs."""

    def __init__(self, config: WorkerConfig, name: str = "worker") -> None:
        self.llm = config.load()
        self.name = f"{name}@{socket.gethostname()}:{os.getpid()}"
        self._scorers: dict[str, Scorer] = {}
        self._strategy: str | None = None  # the strategy of the last eval chunk

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": str(self.llm.source),
            "load_seconds": self.llm.load_seconds,
            "max_model_len": self.llm.engine.max_model_len,
        }

    def scorer(self, spec: str) -> Scorer:
        """Loaded once per worker; a probe is checked against this worker's model."""
        if spec not in self._scorers:
            from ttscale.scorers import load_scorer

            self._scorers[spec] = load_scorer(spec, self.llm.source)
        return self._scorers[spec]

    def solve(
        self,
        strategy: str,
        questions: Sequence[str],
        *,
        params: SamplingParams = DEFAULT_PARAMS,
        scorer: str | None = "logprob",
        search: SearchConfig | None = None,
        hygiene: Hygiene | None = None,
        concurrency: int = 8,
    ) -> list[StrategyResult]:
        """`strategies.api.solve_many` on this worker's engine, questions in order."""
        from ttscale.strategies import make_strategy

        needs = make_strategy(strategy).needs_scorer
        the_scorer = self.scorer(scorer) if needs and scorer is not None else None
        queries = [
            make_query(
                self.llm, q, params=params, scorer=the_scorer, search=search, hygiene=hygiene
            )
            for q in questions
        ]
        return solve_many(self.llm, queries, strategy, concurrency=concurrency)

    def eval_chunk(
        self,
        task: Task,
        strategy: str,
        problems: Sequence[Problem],
        *,
        params: SamplingParams,
        scorer: str,
        search: SearchConfig | None,
        hygiene: Hygiene | None,
        needs_scorer: bool,
        session: str | None = None,
    ) -> list[dict[str, Any]]:
        """The records of one chunk, as `eval.harness.run_eval` makes them: the problems run
        together on the engine and share its time evenly (``amortized_time``)."""
        if strategy != self._strategy:
            # As in one process: each strategy starts with a cold prefix cache, so the
            # previous one's prompts do not make it look cheaper.
            self.llm.engine.reset_prefix_cache()
            self._strategy = strategy
        the_scorer = self.scorer(scorer) if needs_scorer else None
        queries = [
            make_query(
                self.llm,
                p.question,
                messages=task.prompt(p),
                extract=task.extract_answer,
                params=params,
                scorer=the_scorer,
                search=search,
                hygiene=hygiene,
            )
            for p in problems
        ]
        t0 = time.perf_counter()
        results = solve_many(self.llm, queries, strategy, concurrency=len(problems))
        amortized = (time.perf_counter() - t0) / len(problems)
        records = [
            make_record(task, p, r, amortized, len(problems), session)
            for p, r in zip(problems, results, strict=True)
        ]
        for r in records:
            r["worker"] = self.name  # a string: the summary's sums skip it
        return records


__all__ = ["EngineWorker", "WorkerConfig"]
