"""Incremental detokenization of one generated sequence, with stop strings.

Byte-level BPE tokens can end in the middle of a UTF-8 character (an emoji is often 2-4
tokens), so decoding tokens one at a time would emit U+FFFD. The standard fix (vLLM, HF
TextStreamer, TGI) is kept here: decode a short window of recent tokens twice -- up to the
last emitted token (``prefix``) and up to the newest one -- and emit the difference only when
the new text does not end in U+FFFD; an incomplete character is then completed by a later
token. Each step decodes O(window) tokens, not the whole output.
"""

from __future__ import annotations

from collections.abc import Sequence

from ttscale.sampling.params import SamplingParams
from ttscale.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded before the first output token, as context (vLLM uses 5): decoders
# such as SentencePiece's drop a leading space at the start of a text, not after other tokens.
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Turns the tokens of one sequence into text deltas that are safe to stream.

    Invariants:

    * ``text`` is the concatenation of every delta returned by `append` and `finish`.
    * Until a stop string matches, the concatenation of all deltas after `finish` equals
      ``tokenizer.decode(generated_ids, skip_special_tokens=params.skip_special_tokens)`` for
      byte-level BPE tokenizers (GPT-2 / Llama-3 / Qwen / SmolLM style). Decoders that strip
      a leading space at the start of a text (SentencePiece) keep the first token's space
      here, because the prompt's last tokens are decoded as context (as vLLM does).
    * No delta ends in the middle of a character: text is emitted only once the decoded window
      does not end in U+FFFD (a U+FFFD the tokens really produce is emitted by `finish` at
      the latest).
    * No delta contains any part of a stop string: text that could still become the start of
      one (the longest suffix that is a proper prefix of some stop string) is held back.
    * On a match, ``text`` ends right before the stop string (or right after it with
      ``include_stop_str_in_output``), ``stopped`` is True and ``stop_reason`` is the string;
      the earliest match wins, then the first listed stop string.

    EOS and ``stop_token_ids`` are the engine's business: it decides whether to `append` the
    terminating token at all; with ``skip_special_tokens`` a special token adds no text.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.skip_special_tokens = params.skip_special_tokens
        self.stop_strings: tuple[str, ...] = params.stop
        self._emitted: list[str] = []  # the deltas; joined lazily (``+=`` would be O(n^2))
        self._pending = ""  # decoded, not emitted yet: held back as a possible stop prefix
        self.stopped = False
        self.stop_reason: str | None = None
        self.finished = False

        start = max(0, len(prompt_token_ids) - _PROMPT_CONTEXT)
        context = [int(t) for t in prompt_token_ids[start:]]
        prefix_text = self._decode(context) if context else ""
        if prefix_text.endswith(_REPLACEMENT):
            # The prompt ends inside a character: diffing against it would be wrong.
            context, prefix_text = [], ""
        self._ids: list[int] = context  # context + generated ids
        self._n_context = len(context)
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = len(context)  # ids before this are decoded already
        self._prefix_text = prefix_text  # decode(_ids[_prefix_offset:_read_offset])

    def __copy__(self) -> IncrementalDetokenizer:
        """An independent copy (a forked sequence continues from this exact state): the
        mutable lists must not be shared, or sibling samples would append to one stream."""
        clone = object.__new__(IncrementalDetokenizer)
        clone.__dict__.update(self.__dict__)
        clone._ids = list(self._ids)
        clone._emitted = list(self._emitted)
        return clone

    @property
    def text(self) -> str:
        """The full text emitted so far: the concatenation of all deltas."""
        if len(self._emitted) > 1:
            self._emitted = ["".join(self._emitted)]
        return self._emitted[0] if self._emitted else ""

    @property
    def token_ids(self) -> list[int]:
        """The generated token ids appended so far."""
        return self._ids[self._n_context :]

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def append(self, token_id: int) -> str | None:
        """Adds one generated token; returns the new text that is safe to emit (maybe "").

        Returns None, ignoring the token, once the sequence has stopped or finished.
        """
        if self.stopped or self.finished:
            return None
        self._ids.append(int(token_id))
        window = self._decode(self._ids[self._prefix_offset :])
        # Only advance when the window grew and does not end inside a character; otherwise
        # wait for the next token to complete it.
        if len(window) > len(self._prefix_text) and not window.endswith(_REPLACEMENT):
            new_text = window[len(self._prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
            return self._add_text(new_text, final=False)
        return ""

    def finish(self) -> str:
        """Flushes what was held back (incomplete characters, stop-string prefixes)."""
        if self.stopped or self.finished:
            self.finished = True
            return ""
        self.finished = True
        window = self._decode(self._ids[self._prefix_offset :])
        new_text = window[len(self._prefix_text) :]
        self._read_offset = len(self._ids)
        return self._add_text(new_text, final=True)

    def _add_text(self, new_text: str, final: bool) -> str:
        """Takes newly decoded text, applies stop strings, returns the delta now safe to emit.

        Only the pending text can hold a match: what was emitted never ends with the start
        of a stop string (that is held back), so no match can begin inside it.
        """
        pending = self._pending + new_text
        if self.stop_strings:
            best: tuple[int, str] | None = None
            for stop in self.stop_strings:
                at = pending.find(stop)
                if at != -1 and (best is None or at < best[0]):
                    best = (at, stop)
            if best is not None:
                at, stop = best
                self.stopped = True
                self.stop_reason = stop
                self._pending = ""
                end = at + len(stop) if self.params.include_stop_str_in_output else at
                return self._emit(pending[:end])
        hold = 0 if final else self._held_back(pending)
        self._pending = pending[len(pending) - hold :]
        return self._emit(pending[: len(pending) - hold])

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that a stop string starts with."""
        hold = 0
        for stop in self.stop_strings:
            for k in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:k]):
                    hold = k
                    break
        return hold

    def _emit(self, delta: str) -> str:
        if delta:
            self._emitted.append(delta)
        return delta


__all__ = ["IncrementalDetokenizer"]
