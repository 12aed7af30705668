"""Answer-level probe features: the policy reads each *distinct answer*, restated.

A text probe reads a candidate's own free text, where the answer is buried in noise (phrasing,
stray steps, formatting) that varies more than correctness does. An answer probe instead asks
the model one short, canonical question per distinct answer: after the task's prompt, the
assistant turn "The answer is {answer}." -- a few tokens over the prompt's cached KV -- and
pools the hidden states over those tokens. Two candidates with the same answer get the same
features, so the head judges answers, not wording; the vote count of the answer among the
scored candidates (``log count``) is the one feature beyond the hidden states, since how often
the policy samples an answer is evidence the restatement cannot see.

Measured on the embedded model, `arithmetic`: it learned which (question, answer) pairs it had
seen -- +12 points over majority on questions from its training data, -3 on new ones -- so the
shipped probe is a text probe (docs/BENCHMARKS.md, "An answer probe memorizes").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from ttscale.llm import LLM
    from ttscale.verifier.data import ProblemSamples

RESTATE_TEMPLATE = "The answer is {answer}."


def restatement(encode: Callable[[str], list[int]], answer: str, template: str) -> list[int]:
    """The tokens appended after the prompt to restate ``answer``."""
    return encode(template.format(answer=answer))


def answer_groups(item: ProblemSamples) -> dict[str, list[int]]:
    """Distinct answers of a problem's candidates, in first-seen order, with the candidates that
    gave each. As candidate hygiene sees them: cut-off candidates and ones without an answer take
    no part (unless every candidate was cut off)."""
    cands = item.candidates
    usable = [i for i, c in enumerate(cands) if c.answer is not None]
    finished = [i for i in usable if cands[i].finish_reason != "length"]
    groups: dict[str, list[int]] = {}
    for i in finished or usable:
        groups.setdefault(str(cands[i].answer), []).append(i)
    return groups


def answer_row(hidden: torch.Tensor, count: int) -> torch.Tensor:
    """One answer's feature row: ``hidden`` ``(T, L, H)`` over the restatement's tokens, mean
    pooled and flattened, then ``log count``."""
    pooled = hidden.float().mean(0).reshape(-1)
    return torch.cat([pooled, torch.tensor([math.log(max(count, 1))])])


@dataclass
class AnswerTable:
    """Distinct answers of several problems, flattened in problem order: features
    ``(A, L * H + 1)``, labels ``(A,)`` and problem index ``groups`` ``(A,)``."""

    feats: torch.Tensor
    labels: np.ndarray
    groups: np.ndarray
    layers: tuple[int, ...]
    hidden_size: int

    def matrix(self, layers: Sequence[int]) -> torch.Tensor:
        """The columns of ``layers`` (a subset of the table's) plus the count column; for a
        table without hidden states (a likelihood table), every column but the count."""
        if not self.layers:
            return self.feats[:, :-1]
        h = self.hidden_size
        cols = [
            torch.arange(self.layers.index(layer) * h, (self.layers.index(layer) + 1) * h)
            for layer in layers
        ]
        return torch.cat([self.feats[:, torch.cat(cols)], self.feats[:, -1:]], 1)


def answer_rows(
    items: Sequence[ProblemSamples],
    rows_of: Callable[[ProblemSamples, dict[str, list[int]]], list[torch.Tensor]],
    what: str,
    log: Callable[[str], None],
) -> tuple[list[torch.Tensor], list[bool], list[int]]:
    """Feature rows of every distinct answer of every problem (``rows_of`` computes one
    problem's, one engine call), with each answer's label and problem index."""
    rows: list[torch.Tensor] = []
    labels: list[bool] = []
    groups: list[int] = []
    for j, item in enumerate(items):
        by_answer = answer_groups(item)
        if not by_answer:
            continue
        rows += rows_of(item, by_answer)
        labels += [bool(item.candidates[m[0]].correct) for m in by_answer.values()]
        groups += [j] * len(by_answer)
        if (j + 1) % 100 == 0:
            log(f"{what} of {j + 1}/{len(items)} problems")
    return rows, labels, groups


def answer_table(
    llm: LLM,
    items: Sequence[ProblemSamples],
    layers: Sequence[int],
    template: str = RESTATE_TEMPLATE,
    log: Callable[[str], None] = print,
) -> AnswerTable:
    """Features of every distinct answer of every problem: one engine call per problem, the
    restatements sharing the prompt's KV."""

    def encode(text: str) -> list[int]:
        return llm.tokenizer.encode(text, add_special_tokens=False)

    def rows_of(item: ProblemSamples, by_answer: dict[str, list[int]]) -> list[torch.Tensor]:
        prompt = list(item.prompt_token_ids)
        seqs = [prompt + restatement(encode, a, template) for a in by_answer]
        hidden = llm.hidden_states(seqs, list(layers), start=len(prompt))
        return [
            answer_row(h, len(members)).to(torch.float16)
            for members, h in zip(by_answer.values(), hidden, strict=True)
        ]

    rows, labels, groups = answer_rows(items, rows_of, "answer features", log)
    return AnswerTable(
        torch.stack(rows),
        np.array(labels),
        np.array(groups),
        tuple(layers),
        llm.config.hidden_size,
    )
