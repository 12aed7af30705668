"""The engine thread: the one thread that ever touches the (not thread-safe) LLMEngine.

Request handlers run on the event loop. They submit work through a command list guarded by a
condition variable; the engine thread applies commands between steps, steps while there is
work and sleeps on the condition when idle. Outputs go back to each request's asyncio.Queue
with `loop.call_soon_threadsafe`, so the event loop never blocks on the engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ttscale.engine.llm_engine import LLMEngine
from ttscale.engine.outputs import RequestOutput
from ttscale.engine.sequence import SequenceStatus
from ttscale.errors import StepError
from ttscale.sampling.params import SamplingParams
from ttscale.server.metrics import ServerMetrics

logger = logging.getLogger("ttscale.server")

# A step that scheduled nothing while work is pending (e.g. the pool cannot admit the next
# request yet) must not turn the loop into a busy spin: wait this long for news instead.
_STALL_WAIT_S = 0.01


class QueueFullError(Exception):
    """More than `max_waiting` accepted requests are not running yet: answer 429."""


class EngineFailure(Exception):
    """The request could not be served; `status` is the HTTP status to report."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class RequestHandle:
    """One submitted request as the event loop sees it: its outputs arrive on a queue."""

    def __init__(self, engine_loop: EngineLoop, request_id: str) -> None:
        self.request_id = request_id
        self._engine_loop = engine_loop
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[RequestOutput | EngineFailure] = asyncio.Queue()
        self._done = False  # the end was seen or an abort was sent (event-loop side only)

    def deliver(self, item: RequestOutput | EngineFailure) -> bool:
        """Engine thread: hands an item to the event loop; False if that loop is gone."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody will ever read this request
            return False
        return True

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """The request's outputs until it finishes; raises EngineFailure if it fails.

        Leaving early (the consumer stops, is cancelled or fails) aborts the request.
        """
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, EngineFailure):
                    self._done = True
                    raise item
                yield item
                if item.finished:
                    self._done = True
                    return
        finally:
            self.abort()

    def abort(self) -> None:
        """Frees the request's KV blocks at the engine's next iteration; idempotent."""
        if not self._done:
            self._done = True
            self._engine_loop.abort(self.request_id)


@dataclass
class _Add:
    handle: RequestHandle
    token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    submitted_at: float


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[LLMEngine], Any]
    future: concurrent.futures.Future


class JobCancelled(Exception):
    """The job was cancelled (its client left) before it finished."""


def _settle(
    future: concurrent.futures.Future, result: Any = None, error: BaseException | None = None
) -> None:
    """Completes a job's future unless its waiter gave up on it first (an asyncio wrapper
    that is cancelled cancels the future too): that must never fail the engine thread."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


@dataclass(eq=False)
class _Job:
    """A strategy generator (see ttscale.tts.session): advanced between engine steps,
    so its branches batch with every other request.

    `blocks` is its worst-case KV, reserved while it runs: jobs start in order while the
    reservations of running jobs stay within `EngineLoop.job_kv_blocks`, so the rest of the
    pool always remains for ordinary requests.
    """

    gen: Generator[Any, None, Any]
    future: concurrent.futures.Future
    blocks: int
    submitted_at: float
    wait: Any = None
    generated: dict[str, int] = field(default_factory=dict)  # engine request id -> tokens


class JobHandle:
    """A submitted strategy job as the event loop sees it."""

    def __init__(self, engine_loop: EngineLoop, job: _Job) -> None:
        self._engine_loop, self._job = engine_loop, job
        self.future = job.future

    def cancel(self) -> None:
        """Stops the job and frees its KV at the engine's next iteration; idempotent."""
        if not self.future.done():
            self._engine_loop._command(_CancelJob(self._job))


@dataclass
class _CancelJob:
    job: _Job


@dataclass
class _Tracked:
    """Engine-thread bookkeeping of one live request."""

    handle: RequestHandle
    submitted_at: float
    waiting: bool = True  # counted in EngineLoop's waiting total
    generated: int = 0
    first_token_at: float | None = None
    last_output_at: float | None = None


@dataclass
class EngineLoop:
    engine: LLMEngine
    metrics: ServerMetrics | None = None
    max_waiting: int = 256  # accepted requests and jobs not yet running; beyond: refused
    job_kv_blocks: int | None = None  # worst-case KV all running jobs may reserve (None: all)
    snapshot: dict[str, Any] = field(default_factory=dict)  # engine state, for metrics/tests
    num_aborted: int = 0  # requests aborted while still in the engine
    num_jobs_cancelled: int = 0
    num_step_failures: int = 0

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._commands: list[_Add | _Abort | _Call | _Job | _CancelJob] = []
        self._jobs: list[_Job] = []  # running jobs; engine thread only
        self._pending_jobs: list[_Job] = []  # accepted, waiting for KV room; engine thread
        self._job_blocks = 0  # KV reserved by running jobs; engine thread only
        self._job_of: dict[str, _Job] = {}  # engine request id -> the job it serves
        kv = self.engine.kv_stats()
        self.pool_blocks, self.block_size = int(kv["num_blocks"]), int(kv["block_size"])
        self._preemptions = int(kv["num_preemptions"])
        self._num_waiting = 0  # guarded by _cond
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._ids = itertools.count()
        self._publish()

    # ---- event-loop side ----------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(
                    target=self._run, name="ttscale-engine", daemon=True
                )
                self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Fails what is still in flight (503) and ends the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    def submit(
        self, token_ids: Sequence[int], params: SamplingParams, prompt: str | None = None
    ) -> RequestHandle:
        """Queues a request; raises QueueFullError past `max_waiting`. Call on the event loop."""
        self.start()
        with self._cond:
            if self._stopping:
                raise EngineFailure(503, "the server is shutting down")
            if self._num_waiting >= self.max_waiting:
                raise QueueFullError
            self._num_waiting += 1
            handle = RequestHandle(self, f"req-{next(self._ids)}")
            add = _Add(handle, list(token_ids), params, prompt, time.monotonic())
            self._commands.append(add)
            self._cond.notify()
        return handle

    def abort(self, request_id: str) -> None:
        self._command(_Abort(request_id))

    def call(self, fn: Callable[[LLMEngine], Any]) -> concurrent.futures.Future:
        """Runs `fn(engine)` on the engine thread between steps (inspection, tests)."""
        self.start()
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._commands.append(_Call(fn, future))
            self._cond.notify()
        return future

    def run_job(self, gen: Generator[Any, None, Any], blocks: int = 0) -> JobHandle:
        """Runs a strategy generator on the engine thread once `blocks` (its worst-case KV)
        fit the jobs' share; `handle.future` gets its result. Until it starts it counts as
        waiting: raises QueueFullError past `max_waiting`, like `submit`."""
        self.start()
        future: concurrent.futures.Future = concurrent.futures.Future()
        job = _Job(gen, future, blocks, time.monotonic())
        with self._cond:
            if self._stopping:
                raise EngineFailure(503, "the server is shutting down")
            if self._num_waiting >= self.max_waiting:
                raise QueueFullError
            self._num_waiting += 1
            self._commands.append(job)
            self._cond.notify()
        return JobHandle(self, job)

    def _command(self, command: _Abort | _CancelJob) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    # ---- engine thread ------------------------------------------------------------------

    def _admit_jobs(self) -> None:
        """Starts pending jobs in order while their reservations fit the jobs' share (the
        first always starts when none runs: the app refuses a job larger than the share)."""
        limit = self.pool_blocks if self.job_kv_blocks is None else self.job_kv_blocks
        while self._pending_jobs:
            job = self._pending_jobs[0]
            if self._jobs and self._job_blocks + job.blocks > limit:
                return
            self._pending_jobs.pop(0)
            self._unwait()
            if not job.future.set_running_or_notify_cancel():  # its waiter left already
                job.gen.close()
                continue
            self._job_blocks += job.blocks
            self._jobs.append(job)
            if self.metrics:
                self.metrics.queue_time.observe(time.monotonic() - job.submitted_at)

    def _advance_jobs(self) -> None:
        """Resumes every job whose wait is over, until each waits on unfinished work."""
        self._admit_jobs()
        progress = True
        while progress:
            progress = False
            for job in list(self._jobs):
                if job.wait is not None and not job.wait.ready():
                    continue
                progress = True
                try:
                    job.wait = job.gen.send(None)
                except StopIteration as done:
                    self._end_job(job, "finished")
                    _settle(job.future, done.value)
                except Exception as e:
                    self._end_job(job, "error")
                    _settle(job.future, error=e)
                else:
                    # A job adds its requests before it waits on them: map them for metrics.
                    for seq in getattr(job.wait, "sequences", ()):
                        self._job_of.setdefault(seq.request.request_id, job)
            if progress:
                self._admit_jobs()

    def _end_job(self, job: _Job, outcome: str) -> None:
        self._jobs.remove(job)
        self._job_blocks -= job.blocks
        for rid in [r for r, j in self._job_of.items() if j is job]:
            del self._job_of[rid]
        if self.metrics:
            self.metrics.jobs_finished.labels(outcome).inc()

    def _fail_jobs(self, message: str) -> None:
        """Jobs whose requests a failed step may have corrupted end with a 500 (closing a
        job's generator releases its session, like any cancel)."""
        running = self.engine.running_request_ids()
        touched = {
            job for rid, job in self._job_of.items() if rid in running or self.engine.holds_kv(rid)
        }
        for job in [j for j in self._jobs if j in touched]:
            job.gen.close()
            self._end_job(job, "error")
            _settle(job.future, error=EngineFailure(500, message))

    def _cancel_job(self, job: _Job) -> None:
        if job in self._pending_jobs:
            self._pending_jobs.remove(job)
            self._unwait()
        elif job in self._jobs:
            job.gen.close()  # runs the job's finally: its session releases every branch
            self._end_job(job, "cancelled")
        else:
            return  # it ended already
        self.num_jobs_cancelled += 1
        _settle(job.future, error=JobCancelled())

    def _run(self) -> None:
        stalled = False
        while True:
            with self._cond:
                while not (self._commands or self._stopping):
                    if self.engine.has_unfinished and not stalled:
                        break
                    # Idle (or stalled): sleep until a command arrives, no busy spin.
                    if not self._cond.wait(_STALL_WAIT_S if stalled else None):
                        break
                commands, self._commands = self._commands, []
                stopping = self._stopping
            try:
                for command in commands:
                    self._apply(command)
                if stopping:
                    self._fail(list(self._tracked), 503, "the server is shutting down")
                    for job in self._jobs + self._pending_jobs:
                        job.gen.close()
                        _settle(job.future, error=EngineFailure(503, "shutting down"))
                    self._publish()
                    return
                stalled = self.engine.has_unfinished and not self._step()
                self._advance_jobs()
                self._publish()
            except Exception:
                # Never let the thread die: every request would hang. Fail what is in flight.
                logger.exception("engine loop error")
                self._fail(list(self._tracked), 500, "internal engine loop error")
                stalled = False

    def _apply(self, command: _Add | _Abort | _Call | _Job | _CancelJob) -> None:
        if isinstance(command, _Job):
            self._pending_jobs.append(command)
            self._advance_jobs()
        elif isinstance(command, _CancelJob):
            self._cancel_job(command.job)
        elif isinstance(command, _Call):
            try:
                command.future.set_result(command.fn(self.engine))
            except Exception as e:
                command.future.set_exception(e)
        elif isinstance(command, _Abort):
            tracked = self._tracked.pop(command.request_id, None)
            if command.request_id in self.engine.requests:
                self.engine.abort(command.request_id)
                self.num_aborted += 1
                if self.metrics:
                    self.metrics.requests_finished.labels("abort").inc()
            if tracked is not None and tracked.waiting:
                self._unwait()
        else:
            self._add(command)

    def _add(self, add: _Add) -> None:
        rid = add.handle.request_id
        try:
            self.engine.add_request(rid, add.token_ids, add.params, add.prompt)
        except Exception as e:
            # The handler validated the request already, so this is rare; a ValueError is
            # still the client's (e.g. a token id the engine rejects), anything else ours.
            status = 400 if isinstance(e, ValueError) else 500
            if status == 500:
                logger.exception("add_request failed")
            add.handle.deliver(EngineFailure(status, str(e)))
            self._unwait()
            return
        self._tracked[rid] = _Tracked(add.handle, add.submitted_at)
        if self.metrics:
            self.metrics.prompt_tokens.inc(len(add.token_ids))

    def _step(self) -> bool:
        """One engine step; False if it scheduled nothing."""
        steps = self.engine.stats["steps"]
        try:
            outputs = self.engine.step()
        except Exception as e:
            logger.exception("engine step failed")
            self.num_step_failures += 1
            # StepError names every request of the step: clients only see the cause.
            cause = e.__cause__ if isinstance(e, StepError) and e.__cause__ else e
            message = f"engine error: {type(cause).__name__}: {cause}"
            self._fail_jobs(message)  # before _fail: it checks the pool's integrity
            self._fail(self._touched_by_step(), 500, message)
            return True
        now = time.monotonic()
        tokens = 0
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                tokens += self._job_tokens(out)
                continue
            tokens += self._observe(tracked, out, now)
            if not tracked.handle.deliver(out):
                self.engine.abort(out.request_id)
                self._tracked.pop(out.request_id)
            elif out.finished:
                self._tracked.pop(out.request_id)
                self._observe_finish(tracked, out, now)
        if self.metrics:
            self.metrics.record_tokens(tokens, now)
        self._update_waiting()
        return self.engine.stats["steps"] != steps

    def _job_tokens(self, out: RequestOutput) -> int:
        """New tokens of a strategy job's request (counted like any request's)."""
        job = self._job_of.get(out.request_id)
        if job is None:
            return 0
        seen = job.generated.get(out.request_id, 0)
        job.generated[out.request_id] = max(seen, out.usage.generated_tokens)
        return max(0, out.usage.generated_tokens - seen)

    def _observe(self, tracked: _Tracked, out: RequestOutput, now: float) -> int:
        new = out.usage.generated_tokens - tracked.generated
        tracked.generated = out.usage.generated_tokens
        if tracked.waiting:
            tracked.waiting = False
            self._unwait()
            if self.metrics:
                self.metrics.queue_time.observe(now - tracked.submitted_at)
        if self.metrics and new > 0:
            if tracked.first_token_at is None:
                tracked.first_token_at = now
                self.metrics.time_to_first_token.observe(now - tracked.submitted_at)
            elif tracked.last_output_at is not None:
                self.metrics.inter_token_latency.observe(now - tracked.last_output_at)
        tracked.last_output_at = now
        return new

    def _observe_finish(self, tracked: _Tracked, out: RequestOutput, now: float) -> None:
        if self.metrics:
            reasons = {o.finish_reason for o in out.outputs}
            self.metrics.requests_finished.labels("length" if "length" in reasons else "stop").inc()
            self.metrics.request_latency.observe(now - tracked.submitted_at)

    def _update_waiting(self) -> None:
        # A request stops counting as waiting once the scheduler admits it (its prefill may
        # take several steps before the first output).
        for rid, tracked in self._tracked.items():
            if tracked.waiting:
                request = self.engine.requests.get(rid)
                if request and any(
                    s.status is not SequenceStatus.WAITING for s in request.sequences
                ):
                    tracked.waiting = False
                    self._unwait()
                    if self.metrics:
                        self.metrics.queue_time.observe(time.monotonic() - tracked.submitted_at)

    def _touched_by_step(self) -> list[str]:
        """Requests a failed step may have corrupted: those in the batch or holding KV.

        Requests still purely waiting (no blocks) were not touched and keep their place.
        """
        running = self.engine.running_request_ids()
        return [
            rid
            for rid in self._tracked
            if rid not in self.engine.requests or rid in running or self.engine.holds_kv(rid)
        ]

    def _fail(self, request_ids: list[str], status: int, message: str) -> None:
        for rid in request_ids:
            tracked = self._tracked.pop(rid, None)
            try:
                self.engine.abort(rid)
            except Exception:
                logger.exception("abort of %s failed", rid)
            if tracked is not None:
                tracked.handle.deliver(EngineFailure(status, message))
                if tracked.waiting:
                    self._unwait()
            if self.metrics:
                self.metrics.requests_finished.labels("error").inc()
        if status >= 500 and request_ids:
            try:
                self.engine.check_integrity()
            except Exception:
                logger.exception("KV block pool inconsistent after a failed step")

    def _unwait(self) -> None:
        with self._cond:
            self._num_waiting -= 1

    def _publish(self) -> None:
        kv = self.engine.kv_stats()
        spec = self.engine.speculation_stats()
        snapshot = {
            "requests_running": len(self.engine.running_request_ids()),
            "requests_waiting": self._num_waiting,
            "requests_in_engine": len(self.engine.requests),
            "kv_blocks_used": kv["num_used_blocks"],
            "kv_blocks_free": kv["num_free_blocks"],
            "kv_blocks_total": kv["num_blocks"],
            "kv_bytes_per_token": kv["kv_bytes_per_token"],
            "prefix_cache_hit_rate": kv["prefix_hit_rate"],
            "spec_acceptance_rate": spec["acceptance_rate"],
            "spec_tokens_per_step": spec["tokens_per_step"],
            "jobs_running": len(self._jobs),
            "jobs_waiting": len(self._pending_jobs),
            "job_kv_blocks_reserved": self._job_blocks,
        }
        preemptions = int(kv["num_preemptions"])
        if self.metrics and preemptions > self._preemptions:
            self.metrics.preemptions.inc(preemptions - self._preemptions)
        self._preemptions = preemptions
        self.snapshot = snapshot  # one reference swap: readers see a whole snapshot
        if self.metrics:
            self.metrics.set_engine_state(snapshot)
