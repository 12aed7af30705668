"""One problem's view of the engine, for strategies written as generators.

A strategy never steps the engine itself: it `yield`s a `Wait` for the sequences it needs and
is resumed by a driver once they have finished. The driver steps one engine for many
strategies at once, so the branches of several problems (or a server's other requests) batch
together. All branches of a problem live in one retained engine request, so expanding a branch
is an engine fork (shared KV blocks), and pruning one frees only its private blocks.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Generator, Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from ttscale.cost.usage import RunCost
from ttscale.engine.llm_engine import LLMEngine
from ttscale.engine.sequence import Request, Sequence, SequenceStatus
from ttscale.sampling.params import SamplingParams
from ttscale.tts.events import (
    Dropped,
    Forked,
    Observer,
    RequestFinished,
    RequestStarted,
    step_event,
)


@dataclass(frozen=True)
class Wait:
    """Resume me when all these sequences have finished their current step."""

    sequences: tuple[Sequence, ...]

    def ready(self) -> bool:
        return all(s.status is SequenceStatus.FINISHED for s in self.sequences)


StrategyGen = Generator[Wait, None, object]


@dataclass(eq=False)
class Branch:
    """A node of a search tree: a sequence whose last step just ended.

    `text` is everything generated since the problem prompt; `step_text` the last step only.
    """

    seq_id: int
    parent: Branch | None
    depth: int
    token_ids: list[int]  # prompt + generated, at the end of the step
    text: str
    step_text: str
    step_logprobs: list[float]
    finish_reason: str | None
    stop_reason: str | int | None
    kv_blocks: frozenset[int] = frozenset()  # block ids it holds (shared ones included)
    scores: list[float] = field(default_factory=list)  # one per step, if a scorer ran
    # Hidden states of its generated tokens but the last (never computed), when the session
    # asked for them: (num generated - 1, len(layers), hidden). A verifier's features.
    hidden: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SessionStats:
    generated_tokens: int = 0
    prompt_tokens: int = 0
    computed_prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    forks: int = 0
    peak_kv_blocks: int = 0
    wall_time: float = 0.0
    # Cost model totals over the problem's requests (judge calls included), see RunCost.
    flops: float = 0.0
    bytes: float = 0.0
    efflops: float | None = None
    roofline_time: float | None = None
    measured_time: float = 0.0


class Session:
    """Branches of one problem on a shared engine. Methods that need the engine to run are
    generators: call them with `yield from`. An `observer` is told what happens to the
    branches (`ttscale.tts.events`); without one no event is built."""

    _ids = itertools.count()

    def __init__(
        self,
        engine: LLMEngine,
        prompt_token_ids: list[int],
        tag: str = "p",
        observer: Observer | None = None,
    ) -> None:
        self.engine = engine
        self.observer = observer
        self.prompt_token_ids = list(prompt_token_ids)
        self.tag = f"{tag}-{next(self._ids)}"
        self.stats = SessionStats(prompt_tokens=len(prompt_token_ids))
        self._requests: list[Request] = []
        self._live: dict[int, Sequence] = {}  # seq_id -> sequence holding KV for a branch
        self._started = time.perf_counter()

    # ---- generation -----------------------------------------------------------------------

    def sample(
        self,
        n: int,
        params: SamplingParams,
        retain: bool = False,
        hidden_layers: Seq[int] | None = None,
        prefix: Branch | None = None,
    ) -> Generator[Wait, None, list[Branch]]:
        """n samples of the prompt (prefilled once, forked n ways). With `retain`, the
        branches keep their KV so they can be expanded (or embedded) later; with
        `hidden_layers`, they keep their hidden states at those layers (`Branch.hidden`).
        `prefix`: a retained branch of an earlier `sample`; the new samples start on its KV
        of the prompt (only the prompt's last token is computed again)."""
        request_id = f"{self.tag}/{len(self._requests)}"
        request = self.engine.add_request(
            request_id,
            self.prompt_token_ids,
            dataclasses.replace(params, n=n),
            retain=retain,
            hidden_layers=hidden_layers,
            prefix_of=None if prefix is None else prefix.seq_id,
        )
        self._requests.append(request)
        if self.observer is not None:
            self.observer(RequestStarted(request_id, n, len(self.prompt_token_ids), retain))
        # The n sequences appear when the prompt is prefilled; wait on the parent first.
        yield Wait(tuple(request.sequences))
        while not request.finished:
            yield Wait(tuple(request.sequences))
        # The engine tracks the request's distinct blocks while its samples run.
        self.stats.peak_kv_blocks = max(self.stats.peak_kv_blocks, request.peak_kv_blocks)
        self.stats.computed_prompt_tokens += request.num_computed_prompt_tokens
        self.stats.cached_prompt_tokens += request.num_cached_prompt_tokens
        # The engine forked the prefilled prompt n - 1 ways (LLMEngine._update): as many
        # forks sharing the prompt's blocks as `expand` makes for a search branch.
        self.stats.forks += n - 1 + (prefix is not None)  # + the fork of the kept prefix
        branches = [self._branch(seq, None) for seq in request.sequences]
        if retain:
            self._live.update((s.seq_id, s) for s in request.sequences)
        self._track_kv()
        if self.observer is not None:
            self._report_sample(request, branches)
        return branches

    def expand(
        self, parents: Iterable[tuple[Branch, int]], params: SamplingParams
    ) -> Generator[Wait, None, list[Branch]]:
        """Forks each (branch, m) m times and runs every child for one more step. Parents
        are released afterwards (their blocks live on in the children)."""
        parents = list(parents)
        children: list[tuple[Sequence, Branch]] = []
        for parent, m in parents:
            if m <= 0:
                continue
            seqs = self.engine.fork(parent.seq_id, m, params)
            self.stats.forks += m
            if self.observer is not None:
                shared = len(self.engine.held_blocks(parent.seq_id))
                self.observer(Forked(parent.seq_id, [s.seq_id for s in seqs], shared))
            children += [(s, parent) for s in seqs]
        # The children hold references to every parent block: parents can go at once.
        self.drop(parent for parent, _ in parents)
        self._live.update((s.seq_id, s) for s, _ in children)
        self._track_kv()
        yield Wait(tuple(s for s, _ in children))
        branches = [self._branch(seq, parent) for seq, parent in children]
        self._track_kv()
        if self.observer is not None:
            for b in branches:
                self.observer(step_event(b))
        return branches

    def embed_last(
        self, branches: Seq[Branch], layers: Seq[int]
    ) -> Generator[Wait, None, list[torch.Tensor | None]]:
        """The hidden state (1, len(layers), hidden) of each retained branch's last token,
        computed over its shared KV (one token per branch). None for a branch that holds no
        KV (not retained, or dropped)."""
        children: list[Sequence | None] = []
        for b in branches:
            live = b.seq_id in self._live
            children.append(self.engine.fork_embed(b.seq_id, layers, 1) if live else None)
        waiting = tuple(c for c in children if c is not None)
        if waiting:
            yield Wait(waiting)
        out: list[torch.Tensor | None] = []
        for c in children:
            out.append(None if c is None else c.hidden_states)
            if c is not None:
                self.engine.drop(c.seq_id)
        return out

    def embed(
        self, token_lists: Seq[Seq[int]], layers: Seq[int], start: int
    ) -> Generator[Wait, None, list[torch.Tensor]]:
        """Hidden states of positions >= start of each token list (a verifier's features when
        no branch kept them), billed to this session; cached prefix blocks are reused."""
        requests = [
            self.engine.add_embed_request(
                f"{self.tag}/e{len(self._requests)}-{i}", t, layers, start
            )
            for i, t in enumerate(token_lists)
        ]
        self._requests += requests
        while not all(r.finished for r in requests):
            yield Wait(tuple(s for r in requests for s in r.sequences))
        return [r.sequences[0].hidden_states for r in requests]

    def drop(self, branches: Iterable[Branch]) -> None:
        """Frees branches that will not be expanded (pruned, or finished and recorded)."""
        dropped = [b.seq_id for b in branches if self._live.pop(b.seq_id, None) is not None]
        for seq_id in dropped:
            self.engine.drop(seq_id)
        if self.observer is not None and dropped:
            self.observer(Dropped(dropped))

    def close(self) -> SessionStats:
        """Releases everything this problem holds; returns its cost."""
        cost = RunCost()
        for request in self._requests:
            self.engine.release(request.request_id)
            cost.add(request.cost)
        for key, value in cost.to_dict().items():
            if hasattr(self.stats, key):
                setattr(self.stats, key, value)
        self._live.clear()
        self.stats.wall_time = time.perf_counter() - self._started
        return self.stats

    # ---- helpers --------------------------------------------------------------------------

    def _branch(self, seq: Sequence, parent: Branch | None) -> Branch:
        step_tokens = seq.num_step_tokens
        self.stats.generated_tokens += step_tokens
        tokenizer = self.engine.tokenizer
        generated = seq.token_ids[len(self.prompt_token_ids) :]
        return Branch(
            seq_id=seq.seq_id,
            parent=parent,
            depth=0 if parent is None else parent.depth + 1,
            token_ids=list(seq.token_ids),
            text=tokenizer.decode(generated),
            step_text=seq.detokenizer.text,
            step_logprobs=list(seq.logprobs),
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            kv_blocks=self.engine.held_blocks(seq.seq_id),
            hidden=seq.hidden_states,
        )

    def _report_sample(self, request: Request, branches: list[Branch]) -> None:
        assert self.observer is not None
        self.observer(
            RequestFinished(
                request.request_id,
                request.num_computed_prompt_tokens,
                request.num_cached_prompt_tokens,
                request.peak_kv_blocks,
            )
        )
        # Samples of one request share the prompt's blocks (while they hold any).
        shared = frozenset.intersection(*(b.kv_blocks for b in branches)) if branches else ()
        for b in branches:
            self.observer(step_event(b, siblings_shared=len(shared)))

    def _track_kv(self) -> None:
        held: set[int] = set()
        for seq_id in self._live:
            held |= self.engine.held_blocks(seq_id)
        self.stats.peak_kv_blocks = max(self.stats.peak_kv_blocks, len(held))


def drive(engine: LLMEngine, jobs: list[StrategyGen]) -> list[object]:
    """Runs strategy generators to completion on one engine, interleaved; returns their
    results in order. Each engine step serves every job that is waiting."""
    results: list[object] = [None] * len(jobs)
    waits: dict[int, Wait | None] = {}

    def advance(i: int) -> None:
        try:
            waits[i] = jobs[i].send(None)
        except StopIteration as stop:
            results[i] = stop.value
            waits.pop(i, None)

    for i in range(len(jobs)):
        advance(i)
    while waits:
        ready = [i for i, w in waits.items() if w is not None and w.ready()]
        for i in ready:
            advance(i)
        if ready:
            continue
        if not engine.has_unfinished:
            raise RuntimeError("strategies wait on sequences the engine is not running")
        engine.step()
    return results


def run_prompts(
    engine: LLMEngine,
    prompts: list[list[int]],
    params: SamplingParams,
    tag: str,
    session: Session | None = None,
) -> Generator[Wait, None, list[Sequence]]:
    """Runs independent prompts (a judge's questions, say) and returns their sequences; with a
    session on the same engine, their cost is billed to it."""
    requests = [
        engine.add_request(f"{tag}/{i}-{next(Session._ids)}", p, params)
        for i, p in enumerate(prompts)
    ]
    if session is not None and session.engine is engine:
        session._requests += requests
    while not all(r.finished for r in requests):
        yield Wait(tuple(s for r in requests for s in r.sequences))
    return [r.sequences[0] for r in requests]
