"""Constrained decoding: a grammar that masks each sequence's next-token logits.

Two objects, because `SamplingParams` is immutable and shared by a request's n samples while a
grammar's parse state is per sequence:

* `Grammar` (goes on `SamplingParams.constraint`): a compiled grammar, shared, stateless;
  `start()` makes a fresh per-sequence `TokenConstraint`.
* `TokenConstraint` (lives on the engine's `Sequence`): the parse state. The sampler asks it
  for a packed bitmask of the tokens allowed next (`fill_bitmask`); the engine feeds it every
  token it appends (`advance`), and `fork` deep-copies it when a sequence forks (n samples,
  search branches), so each child continues from exactly its parent's state.

The grammar engine is xgrammar (a pushdown automaton over the tokenizer's byte-level vocabulary
with precomputed token masks; Dong et al. 2024, "XGrammar"). `GrammarCompiler` builds one
`xgrammar.TokenizerInfo` per tokenizer and compiles JSON schemas, regexes, choices and EBNF;
xgrammar caches compiled grammars by their source, so a schema sent with every request is
compiled once. xgrammar is imported only here and only when a grammar is compiled: the sampler
and the engine know just the `TokenConstraint` protocol, and cost nothing without one.

Bitmask format (xgrammar's): int32 words, bit j of word w set iff token 32 * w + j is allowed.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from ttscale.tokenizer import Tokenizer

# A grammar source larger than this is refused before compilation: compile time and the
# compiled automaton grow with it, and no real schema, regex or choice list comes near it.
MAX_GRAMMAR_CHARS = 64 * 1024
MAX_CHOICES = 1024
# Compile time grows with bounded repetitions of wide classes (`[\s\S]{1,1000}`: seconds, one
# masked state per repetition over the whole vocabulary) and superlinearly with schema
# nesting: both are capped so one request cannot hold the compiler for long.
MAX_REPEAT = 256
MAX_SCHEMA_DEPTH = 100
_REPEAT_RE = re.compile(r"(?<!\\)\{(\d+)(?:,(\d*))?\}")
# Compiled grammars xgrammar keeps (by source) before evicting the least recently used.
_CACHE_LIMIT_BYTES = 256 * 2**20


class ConstraintError(ValueError):
    """A grammar source that cannot be compiled (bad schema, regex, EBNF), said in one line."""


class TokenConstraint(Protocol):
    """One sequence's grammar state. Invariant: every token the sequence generated since the
    constraint started has been passed to `advance`, in order."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes the allowed next tokens into ``bitmask[row]`` ((rows, ceil(V/32)) int32, CPU).
        A row left all zero (a grammar that can go nowhere) ends the sample: the sampler then
        allows only EOS, and `advance` must return True for it."""
        ...

    def advance(self, token_id: int) -> bool:
        """Accepts the sampled token; returns True once the grammar has terminated (its stop
        token was accepted, or it allowed nothing). Raises ValueError for a token the grammar
        does not allow."""
        ...

    def fork(self) -> TokenConstraint:
        """An independent copy of this state."""
        ...


class ConstraintSpec(Protocol):
    """What `SamplingParams.constraint` holds: immutable, shared; one state per sequence."""

    def start(self) -> TokenConstraint:
        """A fresh state at the grammar's start."""
        ...


def bitmask_words(vocab: int) -> int:
    return (vocab + 31) // 32


def allow_only(bitmask: torch.Tensor, row: int, token_ids: list[int]) -> None:
    """Rewrites ``bitmask[row]`` so that exactly ``token_ids`` are allowed."""
    bitmask[row] = 0
    for t in token_ids:
        word = int(bitmask[row, t // 32]) & 0xFFFFFFFF | (1 << (t % 32))
        bitmask[row, t // 32] = word - (1 << 32) if word >= 1 << 31 else word  # as int32


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Sets ``logits[i, t] = -inf`` for every listed row i and token t its bitmask forbids.

    ``logits`` (B, V) float32 and ``bitmask`` (B, ceil(V/32)) int32 are indexed by the same
    rows. xgrammar's kernel when it is installed (one pass, no (B, V) temporaries); the torch
    reference (`apply_bitmask_torch`) otherwise.
    """
    bitmask = bitmask.to(logits.device)
    try:
        import xgrammar as xgr
    except ImportError:
        apply_bitmask_torch(logits, bitmask, rows)
        return
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=rows)


def apply_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """`apply_bitmask` in plain torch: unpacks the rows' bits into a (R, V) bool mask."""
    idx = torch.tensor(rows, device=logits.device)
    forbidden = ~unpack_bitmask(bitmask[idx], logits.shape[1])
    logits[idx] = logits[idx].masked_fill(forbidden, float("-inf"))


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """(rows, ceil(V/32)) int32 -> (rows, V) bool, True where the token is allowed."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    # An arithmetic shift of a negative word fills with ones; `& 1` keeps only bit j.
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # (rows, words, 32)
    return bits.view(bitmask.shape[0], -1)[:, :vocab].bool()


class _Matcher:
    """A `TokenConstraint` over an xgrammar `GrammarMatcher`."""

    __slots__ = ("_dead", "_m")

    def __init__(self, matcher: Any) -> None:
        self._m = matcher
        self._dead = False

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)
        self._dead = not bool(bitmask[row].any())

    def advance(self, token_id: int) -> bool:
        if self._dead:
            return True
        if not self._m.accept_token(token_id):
            raise ValueError(f"token {token_id} is not allowed by the grammar here")
        return self._m.is_terminated()

    def fork(self) -> _Matcher:
        child = _Matcher(self._m.fork())
        child._dead = self._dead
        return child


@dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled grammar (immutable, shared by every sequence it constrains).

    ``source`` says what it was compiled from (``json_schema: {...}``, ``regex: ...``), for
    messages and logs. Equality is identity: two requests with the same schema get the same
    compiled object from the compiler's cache anyway.
    """

    compiled: Any  # xgrammar.CompiledGrammar
    source: str

    def start(self) -> TokenConstraint:
        import xgrammar as xgr

        return _Matcher(xgr.GrammarMatcher(self.compiled))


class GrammarCompiler:
    """Compiles grammars for one tokenizer and model vocabulary; thread-safe, cached.

    ``vocab_size`` is the model's (its logits' width), which may exceed the tokenizer's: the
    padding ids are never allowed. The tokenizer's EOS ids are the grammar's stop tokens: a
    sequence whose grammar is complete can only end.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_threads: int = 1) -> None:
        try:
            import xgrammar as xgr
        except ImportError as e:  # pragma: no cover - a dependency of the server extra
            raise ConstraintError(
                "structured outputs need xgrammar: pip install 'ttscale[server]'"
            ) from e
        self._xgr = xgr
        self._vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer.hf, vocab_size=vocab_size, stop_token_ids=sorted(tokenizer.eos_token_ids)
        )
        self._compiler = xgr.GrammarCompiler(
            info, max_threads=max_threads, cache_limit_bytes=_CACHE_LIMIT_BYTES
        )
        # xgrammar's compiler is thread-safe, but one compile at a time keeps a burst of
        # distinct schemas from taking every core away from the engine.
        self._lock = threading.Lock()

    def json_schema(self, schema: dict[str, Any] | str) -> Grammar:
        """JSON matching `schema` (strict: no properties or items beyond those it names),
        compact (no whitespace between tokens, so a model cannot loop on blank lines)."""
        text = schema if isinstance(schema, str) else json.dumps(schema)
        _check_size(text, "the JSON schema")
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise ConstraintError(f"the JSON schema is not valid JSON: {e}") from None
        _check_schema(parsed)
        return self._compile(
            f"json_schema: {text}",
            lambda c: c.compile_json_schema(text, any_whitespace=False, strict_mode=True),
        )

    def json_object(self) -> Grammar:
        """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
        return self.json_schema({"type": "object"})

    def regex(self, pattern: str) -> Grammar:
        _check_size(pattern, "the regex")
        _check_repeats(pattern, "the regex")
        return self._compile(f"regex: {pattern}", lambda c: c.compile_regex(pattern))

    def choice(self, choices: list[str]) -> Grammar:
        """Exactly one of the strings."""
        if not choices or len(choices) > MAX_CHOICES:
            raise ConstraintError(f"give 1 to {MAX_CHOICES} choices, not {len(choices)}")
        if any(not isinstance(c, str) or not c for c in choices):
            raise ConstraintError("choices must be non-empty strings")
        # EBNF string literals take JSON's escapes; ensure_ascii keeps odd characters out.
        ebnf = "root ::= " + " | ".join(json.dumps(c) for c in choices)
        _check_size(ebnf, "the choices")
        return self._compile(f"choice: {choices!r}", lambda c: c.compile_grammar(ebnf))

    def ebnf(self, grammar: str) -> Grammar:
        """A GBNF-style EBNF grammar whose start rule is ``root``."""
        _check_size(grammar, "the grammar")
        _check_repeats(grammar, "the grammar")
        return self._compile(f"grammar: {grammar}", lambda c: c.compile_grammar(grammar))

    def _compile(self, source: str, build) -> Grammar:
        try:
            with self._lock:
                compiled = build(self._compiler)
        except (RuntimeError, ValueError, TypeError, RecursionError) as e:
            # xgrammar's messages start with a timestamp and the C++ file: keep the reason.
            reason = str(e).strip().splitlines()[0]
            reason = reason.split(": ", 1)[1] if ".cc:" in reason else reason
            raise ConstraintError(f"cannot compile {source.split(':')[0]}: {reason}") from None
        grammar = Grammar(compiled, source[:200])
        # A grammar that allows no first token (`root ::= root`) matches no string: say so
        # now rather than end every sample empty.
        start = grammar.start()
        mask = torch.zeros(1, bitmask_words(self._vocab_size), dtype=torch.int32)
        start.fill_bitmask(mask, 0)
        if not bool(mask.any()):
            raise ConstraintError(f"the {source.split(':')[0]} matches no string")
        return grammar


def _check_repeats(pattern: str, what: str) -> None:
    for m in _REPEAT_RE.finditer(pattern):
        bound = max(int(m.group(1)), int(m.group(2) or 0))
        if bound > MAX_REPEAT:
            raise ConstraintError(
                f"{what} repeats {m.group(0)}: repetition bounds are at most {MAX_REPEAT}"
            )


def _check_schema(schema: Any) -> None:
    """Nesting depth, and the regexes a schema holds (`pattern`, `patternProperties`)."""
    stack = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise ConstraintError(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                _check_repeats(node["pattern"], "a schema pattern")
            if isinstance(node.get("patternProperties"), dict):
                for key in node["patternProperties"]:
                    _check_repeats(key, "a schema pattern")
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def _check_size(text: str, what: str) -> None:
    if len(text) > MAX_GRAMMAR_CHARS:
        raise ConstraintError(f"{what} has {len(text)} characters; at most {MAX_GRAMMAR_CHARS}")


__all__ = [
    "ConstraintError",
    "ConstraintSpec",
    "Grammar",
    "GrammarCompiler",
    "TokenConstraint",
    "allow_only",
    "apply_bitmask",
    "apply_bitmask_torch",
    "bitmask_words",
    "unpack_bitmask",
]
