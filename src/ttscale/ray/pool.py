"""`EnginePool`: N engine actors on a Ray cluster, and `solve_many` over them.

Work is handed out in chunks, one chunk in flight per actor, the next chunk to whichever actor
finishes first (so a slow actor takes fewer). A chunk whose actor dies goes back to the front
of the queue and runs again on the next free actor; Ray restarts the dead actor (its
constructor reloads the model) up to ``max_restarts`` times. A chunk's results are delivered
once, when its call returns, so nothing is lost or delivered twice.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ttscale.ray.cluster import RayClusterError, cause_line, check_cpus, connect, require_ray
from ttscale.ray.worker import EngineWorker, WorkerConfig
from ttscale.strategies.api import DEFAULT_PARAMS

if TYPE_CHECKING:
    from ttscale.sampling.params import SamplingParams
    from ttscale.strategies.base import SearchConfig, StrategyResult
    from ttscale.tts.hygiene import Hygiene

log = logging.getLogger("ttscale.ray")
T = TypeVar("T")
READY_TIMEOUT_S = 600.0  # model load on a busy node; past it, placement is the problem


class EnginePool:
    """``workers`` actors, each an `EngineWorker` (one engine) on ``cpus_per_worker`` CPUs with
    that many torch threads. Joins the cluster at ``address`` (None: a local one) and waits
    until every actor has loaded the model; a model that fails to load, or actors the cluster
    cannot place, raise RayClusterError here rather than hang later."""

    def __init__(
        self,
        config: WorkerConfig | None = None,
        workers: int = 2,
        *,
        cpus_per_worker: float | None = None,
        address: str | None = None,
        max_restarts: int = 3,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        config = config or WorkerConfig()
        cpus = float(cpus_per_worker if cpus_per_worker is not None else config.num_threads)
        if workers < 1:
            raise RayClusterError("--workers must be >= 1")
        self.ray = require_ray()
        check_cpus(workers, cpus, "workers", "--workers", address)  # before a slow start
        connect(address)
        check_cpus(workers, cpus, "workers", "--workers", address)
        self.config = config
        self.max_restarts = max_restarts
        actor_cls = self.ray.remote(EngineWorker).options(
            num_cpus=cpus, max_restarts=max_restarts, max_task_retries=0
        )
        self.actors = [actor_cls.remote(config, f"worker-{i}") for i in range(workers)]
        self.infos = self._wait_ready(ready_timeout_s)

    def _wait_ready(self, timeout: float) -> list[dict[str, Any]]:
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        refs = [a.info.remote() for a in self.actors]
        try:
            return self.ray.get(refs, timeout=timeout)
        except GetTimeoutError:
            self.shutdown()
            raise RayClusterError(
                f"the workers did not start within {timeout:g} s: the cluster's CPUs are "
                "taken by other work (`ray status`), or loading the model takes longer"
            ) from None
        except (RayActorError, RayTaskError) as e:
            self.shutdown()
            raise RayClusterError(
                f"a worker failed to load the model {self.config.model or '(embedded)'}: "
                f"{cause_line(e)}; check --model (every node needs the file at that path)"
            ) from None

    @property
    def source(self) -> str:
        return str(self.infos[0]["source"])

    def __len__(self) -> int:
        return len(self.actors)

    def __enter__(self) -> EnginePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)
        self.actors = []

    def map_chunks(
        self,
        submit: Callable[[Any, T], Any],
        chunks: Sequence[T],
        on_result: Callable[[int, Any], None],
        max_attempts: int = 3,
    ) -> None:
        """Runs ``submit(actor, chunk)`` (an actor call) for every chunk and hands each result
        to ``on_result(index, result)`` as it arrives, in completion order. A chunk whose
        actor died is rerun, at most ``max_attempts`` times; an actor that died more than
        ``max_restarts`` times is given nothing more. An error raised by the work itself (a
        bad prompt, say) is raised here as itself."""
        from ray.exceptions import RayActorError, RayTaskError

        pending = deque(range(len(chunks)))
        idle = deque(range(len(self.actors)))
        attempts = [0] * len(chunks)
        deaths = [0] * len(self.actors)
        inflight: dict[Any, tuple[int, int]] = {}  # ref -> (actor, chunk)
        while pending or inflight:
            while pending and idle:
                w, i = idle.popleft(), pending.popleft()
                inflight[submit(self.actors[w], chunks[i])] = (w, i)
            if not inflight:
                raise RayClusterError(
                    f"every worker died more than {self.max_restarts} times; "
                    f"{len(pending)} chunk(s) not run (see the workers' logs: `ray logs`)"
                )
            ready, _ = self.ray.wait(list(inflight), num_returns=1)
            w, i = inflight.pop(ready[0])
            try:
                result = self.ray.get(ready[0])
            except RayTaskError as e:  # the work raised: not a crash, do not retry
                raise e.as_instanceof_cause() from None
            except RayActorError as e:
                attempts[i] += 1
                deaths[w] += 1
                log.warning("worker %d died (%s); rerunning its chunk", w, cause_line(e))
                if attempts[i] >= max_attempts:
                    raise RayClusterError(
                        f"a chunk killed its worker {attempts[i]} times; last: {cause_line(e)}"
                    ) from None
                pending.appendleft(i)
                if deaths[w] <= self.max_restarts:
                    idle.append(w)  # Ray restarts it; the next call waits for that
                continue
            on_result(i, result)
            idle.append(w)

    def solve_many(
        self,
        questions: Sequence[str],
        strategy: str,
        *,
        params: SamplingParams = DEFAULT_PARAMS,
        scorer: str | None = "logprob",
        search: SearchConfig | None = None,
        hygiene: Hygiene | None = None,
        concurrency: int = 8,
    ) -> list[StrategyResult]:
        """Runs ``strategy`` on every question, ``concurrency`` at a time per actor; results
        in question order. Seeded sampling gives the same results as one process (each
        sequence has its own RNG)."""
        from ttscale.strategies import make_strategy

        make_strategy(strategy)  # a bad spec fails here, not on every actor
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        chunks = [questions[i : i + concurrency] for i in range(0, len(questions), concurrency)]
        out: list[list[StrategyResult]] = [[] for _ in chunks]
        options = dict(
            params=params,
            scorer=scorer,
            search=search,
            hygiene=hygiene,
            concurrency=concurrency,
        )

        def submit(actor: Any, chunk: Sequence[str]) -> Any:
            return actor.solve.remote(strategy, list(chunk), **options)

        def done(i: int, results: list[StrategyResult]) -> None:
            out[i] = results

        self.map_chunks(submit, chunks, done)
        return [r for chunk in out for r in chunk]


def solve_many(
    pool: EnginePool, questions: Sequence[str], strategy: str, **options: Any
) -> list[StrategyResult]:
    """`EnginePool.solve_many`: strategies.api.solve_many, sharded over the pool's actors."""
    return pool.solve_many(questions, strategy, **options)


__all__ = ["EnginePool", "solve_many"]
