"""Likelihood-probe features: per distinct answer, the policy's log-likelihood of it after the
bare question (:mod:`ttscale.scorers.likelihood`).

One number per answer, not a hidden state: a head this small cannot learn which (question,
answer) pairs it saw, the failure of the answer probe (:mod:`ttscale.verifier.answers`). What it
learns is calibration -- how the likelihood turns into P(correct) -- so that its scores sit on
the same scale as a text probe's on partial paths. The vote count is left out on purpose: a
weighted vote already sums one score per candidate, so a score that counted votes would count
them twice (on 24 problems that made the weighted vote a plain majority vote again).

The table keeps the answer's log vote count as its last column, because the majority baseline
of :mod:`ttscale.verifier.answer_fit` reads it there; the head does not see it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from ttscale.verifier.answers import AnswerTable, answer_rows

if TYPE_CHECKING:
    from ttscale.llm import LLM
    from ttscale.verifier.data import ProblemSamples

# After the raw question: the answer, then the newline that says the answer is complete (without
# it "1" would collect the mass of every answer that starts with 1).
ANSWER_TEMPLATE = " {answer}\n"


def answer_tokens(
    encode: Callable[[str, bool], list[int]], question: str, answer: str, template: str
) -> tuple[list[int], list[int]]:
    """(question tokens with BOS, answer tokens): the prefix every answer shares, and what
    follows it. Encoded apart so that the prefix is token-identical across answers."""
    return encode(question, True), encode(template.format(answer=answer), False)


def sum_logprobs(
    model: torch.nn.Module, hidden: Sequence[torch.Tensor], targets: Sequence[Sequence[int]]
) -> list[float]:
    """log P(targets[i]) per answer, from final-norm hidden states ``(len(targets[i]) + 1, 1,
    H)`` whose row j predicts ``targets[i][j]`` (the last row is unused). One LM-head call
    over every answer's rows: the head (vocab x hidden) is the costly part, read once."""
    rows = torch.cat([h[: len(t), 0] for h, t in zip(hidden, targets, strict=True)])
    logp = torch.log_softmax(model.compute_logits(rows).float(), dim=-1)
    idx = torch.tensor([tok for t in targets for tok in t], device=logp.device)
    chosen = logp.gather(1, idx.unsqueeze(1)).squeeze(1)
    return [float(part.sum()) for part in chosen.split([len(t) for t in targets])]


LIKELIHOOD_FEATURES = ("log-likelihood of the answer after the bare question",)
# What `train-verifier --input likelihood` tries after the question, chosen by out-of-fold top-1
# accuracy on the training problems. The first is the shipped arithmetic probe's (questions
# ending in "="); the others read as an answer after a question that ends in a sentence.
LIKELIHOOD_TEMPLATES = (ANSWER_TEMPLATE, "\nAnswer: {answer}\n", " The answer is {answer}.\n")


def likelihood_row(loglik: float) -> torch.Tensor:
    return torch.tensor([loglik], dtype=torch.float32)


def likelihood_table(
    llm: LLM,
    items: Sequence[ProblemSamples],
    template: str = ANSWER_TEMPLATE,
    log: Callable[[str], None] = print,
) -> AnswerTable:
    """Features of every distinct answer of every problem (as candidate hygiene groups them):
    one engine call per problem, its answers sharing the question's cached blocks."""
    final = llm.config.num_hidden_layers

    def encode(text: str, special: bool) -> list[int]:
        return llm.tokenizer.encode(text, add_special_tokens=special)

    def rows_of(item: ProblemSamples, by_answer: dict[str, list[int]]) -> list[torch.Tensor]:
        pairs = [answer_tokens(encode, item.question, a, template) for a in by_answer]
        prefix = pairs[0][0]
        hidden = llm.hidden_states([prefix + c for _, c in pairs], [final], len(prefix) - 1)
        logliks = sum_logprobs(llm.engine.model, hidden, [cont for _, cont in pairs])
        return [
            torch.tensor([loglik, math.log(len(members))], dtype=torch.float32)
            for members, loglik in zip(by_answer.values(), logliks, strict=True)
        ]

    rows, labels, groups = answer_rows(items, rows_of, "answer likelihoods", log)
    return AnswerTable(torch.stack(rows), np.array(labels), np.array(groups), (), 0)
