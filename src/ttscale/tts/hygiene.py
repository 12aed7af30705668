"""Candidate hygiene: which candidates may vote or be selected at all.

A candidate cut off by the length limit has no final answer: "the last number in the text"
is then whatever the model was computing when the budget ran out (`17 * 2 = ` -> `2`). A
degenerate one (a repetition loop) says nothing either. Both are excluded from voting and
selection by default; a strategy whose candidates are all excluded answers nothing and says
so, rather than guessing. Switch it off (`Hygiene(enabled=False)`) to get the old behaviour.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

TRUNCATED = "truncated"
DEGENERATE = "degenerate"
NO_ANSWER = "no_answer"


@dataclass(frozen=True)
class Hygiene:
    enabled: bool = True
    # Extract an answer from cut-off text anyway (it then votes like any other).
    extract_from_truncated: bool = False
    # A loop: in the last `window` generated tokens, fewer than `min_distinct` of the
    # n-grams are distinct (a model that loops on one phrase has a handful).
    ngram: int = 4
    window: int = 64
    min_distinct: float = 0.3

    def __post_init__(self) -> None:
        if self.ngram < 1 or self.window <= self.ngram:
            raise ValueError("hygiene: need 1 <= ngram < window")
        if not 0 < self.min_distinct <= 1:
            raise ValueError("hygiene: min_distinct must be in (0, 1]")


@dataclass(frozen=True)
class Verdict:
    """What one candidate counts for: its answer (None: it does not vote) and, if it was
    excluded, why (`truncated`, `degenerate`; `no_answer` when no answer could be read)."""

    answer: str | None
    dropped: str | None = None

    @property
    def kept(self) -> bool:
        return self.dropped is None


def is_degenerate(token_ids: Sequence[int], hygiene: Hygiene = Hygiene()) -> bool:
    """A repetition loop at the end of a generation (n-gram diversity of its tail)."""
    tail = list(token_ids[-hygiene.window :])
    n = hygiene.ngram
    if len(tail) < hygiene.window // 2:
        return False  # too short to call a loop
    grams = [tuple(tail[i : i + n]) for i in range(len(tail) - n + 1)]
    return len(set(grams)) / len(grams) < hygiene.min_distinct


def judge(
    text: str,
    generated_ids: Sequence[int],
    truncated: bool,
    extract: Callable[[str], str | None],
    hygiene: Hygiene,
) -> Verdict:
    """The verdict on one finished candidate (its full text and generated token ids)."""
    if not hygiene.enabled:
        return Verdict(extract(text))
    if is_degenerate(generated_ids, hygiene):
        return Verdict(None, DEGENERATE)
    if truncated and not hygiene.extract_from_truncated:
        return Verdict(None, TRUNCATED)
    answer = extract(text)
    return Verdict(answer, None if answer is not None else NO_ANSWER)


def drop_counts(verdicts: Sequence[Verdict]) -> dict[str, int]:
    """How many candidates were excluded, by reason (only the reasons that occurred)."""
    counts: dict[str, int] = {}
    for v in verdicts:
        if v.dropped is not None:
            counts[v.dropped] = counts.get(v.dropped, 0) + 1
    return counts


__all__ = [
    "DEGENERATE",
    "NO_ANSWER",
    "TRUNCATED",
    "Hygiene",
    "Verdict",
    "drop_counts",
    "is_degenerate",
    "judge",
]
