"""Draft-token proposers for speculative decoding (the engine's `Proposer` protocol).

The engine verifies every draft in the sequence's next step and keeps the longest prefix the
model itself samples, so a proposer only affects speed, never the output distribution (for a
deterministic proposer; see `LLMEngine._accept_drafts`).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

from ttscale.engine.llm_engine import Proposer

SPECULATIVE_METHODS = ("prompt_lookup",)


class PromptLookupProposer:
    """Prompt lookup decoding (Saxena 2023; vLLM's "ngram" speculator): find the most recent
    earlier occurrence of the sequence's last `ngram` tokens (then shorter suffixes, down to
    `min_ngram`) and propose the `k` tokens that followed it. No second model: it pays where
    the answer repeats the context (edits, summaries, code, quoting), and costs one
    (T,)-token scan per step elsewhere, plus the verification of drafts that miss.
    `min_ngram=2`: single-token matches drafted mostly misses on the embedded model
    (acceptance 0.67 vs 0.81 on the copy workload), and every verified row costs time.

    Deterministic (a function of the tokens alone), so the engine's acceptance keeps the
    target distribution exactly at any temperature.
    """

    def __init__(self, k: int = 4, ngram: int = 3, min_ngram: int = 2) -> None:
        if k < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, not {k}")
        if not 1 <= min_ngram <= ngram:
            raise ValueError(f"need 1 <= min_ngram <= ngram, not {min_ngram} and {ngram}")
        self.k, self.ngram, self.min_ngram = k, ngram, min_ngram

    def propose(self, seq_id: int, token_ids: Sequence[int]) -> list[int]:
        # bytes.rfind runs the search in C; ids are 4-byte items, so a hit must be aligned.
        ids = array("i", token_ids)
        data, width, length = ids.tobytes(), ids.itemsize, len(ids)
        for n in range(min(self.ngram, length - 1), self.min_ngram - 1, -1):
            pattern = data[-n * width :]
            # The match must end before the last token, so at least one token follows it.
            end = (length - 1) * width
            while (pos := data.rfind(pattern, 0, end)) >= 0:
                if pos % width == 0:
                    start = pos // width + n
                    return ids[start : start + self.k].tolist()
                end = pos + len(pattern) - 1
        return []


def make_proposer(method: str, num_speculative_tokens: int) -> Proposer:
    """`LLM(speculative=...)`'s proposer by name."""
    if method == "prompt_lookup":
        return PromptLookupProposer(num_speculative_tokens)
    raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE_METHODS)}, not {method!r}")


def speculation_stats(stats: dict[str, float]) -> dict[str, float]:
    """From `LLMEngine.stats`: the share of drafted tokens the model kept, and the tokens a
    sequence gained per step that verified drafts (1 = speculation bought nothing)."""
    drafted, steps = stats["draft_tokens"], stats["draft_steps"]
    accepted = stats["accepted_draft_tokens"]
    return {
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "tokens_per_step": 1 + accepted / steps if steps else 1.0,
    }
