"""Probe features: the policy's own hidden states, pooled over chosen rows of prompt+candidate.

The engine returns, per sequence, the hidden states of its tokens at the requested layers
(``LLM.hidden_states``: shape ``(num_tokens, num_layers, hidden)``, computed over the paged KV
with the prompt shared; layer ``i`` is transformers' ``hidden_states[i]``: 0 = embeddings,
``num_layers`` = after the final norm). A row is the state *after* reading its token, so the
last row of a candidate has seen the whole answer (and the EOS token when it stopped on it).

Poolings (each gives ``(num_layers, hidden)`` per candidate):

- ``last``: the last row.
- ``mean``: the mean over the candidate's rows (its whole reasoning).
- ``answer``: the mean over the rows of the final answer line (from the last ``Answer`` marker
  or ``\\boxed``), else the last row: where a model that "knows" it is wrong would show it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ttscale.llm import LLM
    from ttscale.verifier.data import ProblemSamples

POOLINGS = ("last", "mean", "answer")
_ANSWER_MARKERS = ("Answer", "answer:", "\\boxed")


def answer_start(decode_one: Callable[[int], str], token_ids: Sequence[int]) -> int:
    """Index of the candidate token where its final answer line starts (0 if none).

    Per-token decoding gives character offsets; that is exact for the ASCII text of answers
    (a token that splits a multi-byte character only shifts offsets after it by a byte).
    """
    pieces = [decode_one(t) for t in token_ids]
    text = "".join(pieces)
    pos = max(text.rfind(m) for m in _ANSWER_MARKERS)
    if pos < 0:
        return len(token_ids) - 1 if token_ids else 0
    offset = 0
    for i, piece in enumerate(pieces):
        offset += len(piece)
        if offset > pos:
            return i
    return len(token_ids) - 1


def pool(
    hidden: torch.Tensor, prompt_len: int, span_start: int, poolings: Sequence[str] = POOLINGS
) -> torch.Tensor:
    """Pooled features of one candidate: ``(len(poolings), num_layers, hidden)``.

    ``hidden``: ``(prompt_len + num_candidate_tokens, num_layers, hidden)``; ``span_start``:
    the answer line's first token, counted within the candidate.
    """
    total = hidden.shape[0]
    if total <= prompt_len:
        raise ValueError("a candidate needs at least one token")
    out = []
    for name in poolings:
        if name == "last":
            out.append(hidden[-1])
        elif name == "mean":
            out.append(hidden[prompt_len:].mean(0))
        elif name == "answer":
            out.append(hidden[prompt_len + min(span_start, total - prompt_len - 1) :].mean(0))
        else:
            raise ValueError(f"pooling must be one of {POOLINGS}, not {name!r}")
    return torch.stack(out)


def prefix_rows(hidden: torch.Tensor, cuts: Sequence[int]) -> torch.Tensor:
    """Features of step prefixes: the row of each prefix's last token, ``(len(cuts), L, H)``.
    ``hidden`` holds the candidate's rows only; a prefix of ``cut`` tokens ends at row
    ``cut - 1`` (causal attention: later tokens do not change it)."""
    return hidden[torch.as_tensor([c - 1 for c in cuts], dtype=torch.long)]


def extract_features(
    llm: LLM,
    items: Sequence[ProblemSamples],
    layers: Sequence[int],
    poolings: Sequence[str] = POOLINGS,
    log: Callable[[str], None] = print,
) -> torch.Tensor:
    """Features of every candidate, problems in order: ``(N, len(poolings), len(layers), H)``
    in float16 (a cache of a few hundred problems stays ~100 MB). One engine call per problem:
    its K candidates share the prompt's KV."""

    def decode_one(t: int) -> str:
        return llm.tokenizer.decode([t])

    feats = []
    for j, item in enumerate(items):
        seqs = [item.prompt_token_ids + c.token_ids for c in item.candidates]
        # Rows of the candidate tokens only; the prompt's KV is computed once (prefix cache).
        hidden = llm.hidden_states(seqs, list(layers), start=len(item.prompt_token_ids))
        for c, h in zip(item.candidates, hidden, strict=True):
            start = answer_start(decode_one, c.token_ids)
            feats.append(pool(h.float(), 0, start, poolings).to(torch.float16))
        if (j + 1) % 50 == 0:
            log(f"features of {j + 1}/{len(items)} problems")
    return torch.stack(feats)
