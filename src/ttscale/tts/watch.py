"""Watching a strategy run: its sequences' text as it grows, and its result as events.

A `Watch` is a session's observer that does more than forward events::

    watch = Watch(observer, engine.held_blocks)
    session = Session(engine, prompt_ids, observer=watch)
    result = drive(engine, [watch.run(strategy.solve(session, query))])[0]

`watch.run` re-yields each `Wait` of the strategy as a `WatchedWait`, whose `ready()` (which
every driver calls after each engine step) reports the new text of the branches being
generated as `Progress` events; when the strategy returns, its candidates, vote and cost are
reported. The generator is otherwise unchanged, so it runs under `drive` or as a server job
alike. Only the session's own samples and their forks are reported: a scorer's requests (a
judge's prompts) and hidden-state rows (a probe's) are not branches of the tree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from ttscale.engine.sequence import Sequence
from ttscale.tts.events import Cost, Event, Finished, Observer, Progress, RequestStarted, Voted
from ttscale.tts.session import Wait


class Watch:
    """An observer (pass it to `Session`) that forwards every event and remembers which
    engine requests hold the tree's branches; `run` wraps the strategy. Engine thread only."""

    def __init__(self, observer: Observer, held_blocks: Callable[[int], frozenset[int]]) -> None:
        self.observer = observer
        self.held_blocks = held_blocks
        self.requests: set[str] = set()  # requests started by Session.sample
        self.seen: dict[int, tuple[int, int]] = {}  # seq_id -> (step tokens, text length)

    def __call__(self, event: Event) -> None:
        if isinstance(event, RequestStarted):
            self.requests.add(event.request_id)
        self.observer(event)

    def report(self, waited: tuple[Sequence, ...]) -> None:
        # A strategy may wait on one sequence of a request (the parent, before its n samples
        # exist): report all of the request's sequences.
        sequences = {s.seq_id: s for w in waited for s in (*w.request.sequences, w)}
        for seq in sequences.values():
            # A probe's hidden-state row shares its branch's request but is no branch.
            if seq.embed_only or seq.request.request_id not in self.requests:
                continue
            tokens = seq.num_step_tokens
            text = seq.detokenizer.text
            last_tokens, last_len = self.seen.get(seq.seq_id, (0, 0))
            if tokens == last_tokens:
                continue
            # A new step restarts the sequence's step text: report it from its start.
            start = last_len if tokens > last_tokens and len(text) >= last_len else 0
            self.seen[seq.seq_id] = (tokens, len(text))
            blocks = len(self.held_blocks(seq.seq_id))
            self.observer(Progress(seq.seq_id, text[start:], tokens, blocks))

    def run(self, gen: Generator[Wait, None, Any]) -> Generator[Wait, None, Any]:
        """Runs a strategy generator, reporting token progress while it waits and, when it
        returns a StrategyResult, its candidates (`Finished`), vote (`Voted`) and cost
        (`Cost`)."""
        result = None
        try:
            wait = next(gen)
            while True:
                yield WatchedWait(wait.sequences, self)
                wait = gen.send(None)
        except StopIteration as stop:
            result = stop.value
        finally:
            gen.close()
        candidates = getattr(result, "candidates", None)
        if candidates is not None:
            chosen = next(
                (i for i, c in enumerate(candidates) if result.text and c.text == result.text),
                None,
            )
            self.observer(Finished([dataclasses.asdict(c) for c in candidates], chosen))
            extra = {
                k: v
                for k, v in result.extra.items()
                if isinstance(v, (int, float, str, bool, list, dict))
            }
            self.observer(Voted(result.answer, dict(result.votes), extra))
            self.observer(Cost(dataclasses.asdict(result.stats)))
        return result


@dataclass(frozen=True)
class WatchedWait(Wait):
    """A Wait that reports its sequences' new text each time the driver asks if it is ready
    (the driver asks after every engine step)."""

    watch: Watch | None = None

    def ready(self) -> bool:
        if self.watch is not None:
            self.watch.report(self.sequences)
        return super().ready()


__all__ = ["Watch", "WatchedWait"]
