"""Structured events of a strategy run, for whoever watches one (the dashboard's playground,
logs, other tools).

A `Session` built with an `observer` calls it with one event per thing that happens to the
problem's search tree: a request started, a branch forked, a step generated, a branch scored
or pruned. Without an observer nothing is built (one `is None` test per call site).
`ttscale.tts.watch.Watch` is an observer that also wraps a strategy generator, so that the
text of every branch is reported as it grows (between engine steps), and the result's
candidates, vote and cost when the strategy returns.

Observers run on the thread that drives the engine (the server's engine thread): they must
be quick and must not touch the engine. Each event is a frozen dataclass with a `kind` and a
`to_dict()` that is its JSON form (`docs/SERVER.md`, "Run events").

Branches are named by their engine sequence id (`seq`); a branch with `parent` None hangs
off the prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ttscale.tts.session import Branch


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = "event"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class RequestStarted(Event):
    """`Session.sample`: one engine request, its prompt prefilled once and forked n ways."""

    kind: ClassVar[str] = "request"
    request_id: str
    n: int
    prompt_tokens: int
    retain: bool


@dataclass(frozen=True)
class RequestFinished(Event):
    """All n samples of a request ended; how much of its prompt the prefix cache served."""

    kind: ClassVar[str] = "request_done"
    request_id: str
    computed_prompt_tokens: int
    cached_prompt_tokens: int
    peak_kv_blocks: int


@dataclass(frozen=True)
class Forked(Event):
    """`Session.expand`: `children` share every KV block of `parent` (`shared_blocks` of
    them) and write only their own new ones."""

    kind: ClassVar[str] = "fork"
    parent: int
    children: list[int]
    shared_blocks: int


@dataclass(frozen=True)
class Progress(Event):
    """A running sequence's step text grew by `delta` (`tokens`: its step's tokens so far,
    `kv_blocks`: blocks its table holds now)."""

    kind: ClassVar[str] = "tokens"
    seq: int
    delta: str
    tokens: int
    kv_blocks: int


@dataclass(frozen=True)
class StepDone(Event):
    """A branch's step ended: `step_text` is the step, `tokens` all generated tokens of the
    path; `kv_blocks` the blocks it holds and `shared_blocks` how many of them are its
    parent's (or, for the samples of one request, shared by all of them)."""

    kind: ClassVar[str] = "step"
    seq: int
    parent: int | None
    depth: int
    step_text: str
    step_tokens: int
    tokens: int
    kv_blocks: int
    shared_blocks: int
    finish_reason: str | None


@dataclass(frozen=True)
class Scored(Event):
    kind: ClassVar[str] = "score"
    seq: int
    score: float


@dataclass(frozen=True)
class Dropped(Event):
    """Branches released: pruned, done and recorded, or a parent just forked (its blocks
    live on in its children)."""

    kind: ClassVar[str] = "drop"
    seqs: list[int]


@dataclass(frozen=True)
class Finished(Event):
    """The candidates the strategy chose among, in its order (each with its `seq_id`)."""

    kind: ClassVar[str] = "finished"
    candidates: list[dict[str, Any]]
    chosen: int | None  # index into candidates


@dataclass(frozen=True)
class Voted(Event):
    kind: ClassVar[str] = "vote"
    answer: str | None
    votes: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Cost(Event):
    """The run's cost: SessionStats (tokens, forks, KV, FLOPs, bytes, roofline vs measured)."""

    kind: ClassVar[str] = "cost"
    stats: dict[str, Any]


Observer = Callable[[Event], None]


def step_event(branch: Branch, siblings_shared: int | None = None) -> StepDone:
    parent = branch.parent
    if siblings_shared is not None:
        shared = siblings_shared
    else:
        shared = len(branch.kv_blocks & parent.kv_blocks) if parent is not None else 0
    return StepDone(
        seq=branch.seq_id,
        parent=None if parent is None else parent.seq_id,
        depth=branch.depth,
        step_text=branch.step_text,
        step_tokens=len(branch.step_logprobs),
        tokens=branch.num_tokens,
        kv_blocks=len(branch.kv_blocks),
        shared_blocks=shared,
        finish_reason=branch.finish_reason,
    )


__all__ = [
    "Cost",
    "Dropped",
    "Event",
    "Finished",
    "Forked",
    "Observer",
    "Progress",
    "RequestFinished",
    "RequestStarted",
    "Scored",
    "StepDone",
    "Voted",
    "step_event",
]
