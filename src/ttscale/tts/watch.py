"""Watching a strategy run: its sequences' text as it grows, and its result as events.

`observe(gen, observer, held_blocks)` wraps a strategy generator. Each `Wait` it yields is
re-yielded as a `WatchedWait`, whose `ready()` (which every driver calls after each engine
step) reports new text of the waited-on sequences as `Progress` events; when the strategy
returns, its candidates, vote and cost are reported. The wrapped generator is otherwise
unchanged, so it runs under `drive` or as a server job alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from ttscale.engine.sequence import Sequence
from ttscale.tts.events import Cost, Finished, Observer, Progress, Voted
from ttscale.tts.session import Wait


class _Watch:
    """What a watched run has reported of each sequence's text (engine thread only)."""

    def __init__(self, observer: Observer, held_blocks: Callable[[int], frozenset[int]]) -> None:
        self.observer = observer
        self.held_blocks = held_blocks
        self.seen: dict[int, tuple[int, int]] = {}  # seq_id -> (step tokens, text length)

    def report(self, waited: tuple[Sequence, ...]) -> None:
        # A strategy may wait on one sequence of a request (the parent, before its n samples
        # exist): report all of the request's sequences.
        sequences = {s.seq_id: s for w in waited for s in (*w.request.sequences, w)}
        for seq in sequences.values():
            if seq.embed_only:  # a scorer's hidden-state row, not a branch of the tree
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


@dataclass(frozen=True)
class WatchedWait(Wait):
    """A Wait that reports its sequences' new text each time the driver asks if it is ready
    (the driver asks after every engine step)."""

    watch: _Watch | None = None

    def ready(self) -> bool:
        if self.watch is not None:
            self.watch.report(self.sequences)
        return super().ready()


def observe(
    gen: Generator[Wait, None, Any],
    observer: Observer,
    held_blocks: Callable[[int], frozenset[int]],
) -> Generator[Wait, None, Any]:
    """Runs a strategy generator, reporting token progress while it waits and, when it
    returns a StrategyResult, its candidates (`Finished`), vote (`Voted`) and cost (`Cost`).
    `held_blocks` is the engine's `held_blocks`, called on the driving thread."""
    watch = _Watch(observer, held_blocks)
    result = None
    try:
        wait = next(gen)
        while True:
            yield WatchedWait(wait.sequences, watch)
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
        observer(Finished([dataclasses.asdict(c) for c in candidates], chosen))
        extra = {
            k: v
            for k, v in result.extra.items()
            if isinstance(v, (int, float, str, bool, list, dict))
        }
        observer(Voted(result.answer, dict(result.votes), extra))
        observer(Cost(dataclasses.asdict(result.stats)))
    return result


__all__ = ["WatchedWait", "observe"]
