"""The `likelihood` scorer: how likely the policy itself finds each answer, asked plainly.

A small chat model samples answers in its chat format, where it drifts (fillers, wrong
restatements, loops). The same weights, shown the bare question as pretraining text and then
the answer -- ``"{question} {answer}\\n"``, no chat template -- often know which of the sampled
answers is right: on the embedded model's `arithmetic`, picking the sampled answer with the
highest log P(answer | question) doubles greedy's accuracy where a majority vote does not come
close (docs/BENCHMARKS.md, "Answer likelihood"). It costs one short prefill per distinct answer,
all of them over the question's cached prefix blocks: no second model, no training.

Scores are P(answer | question) in (0, 1], so a weighted vote sums count x P(answer); branches
without an extracted answer (or cut off) score 0. Partial paths have no answer to read: a search
over partial paths needs a scorer that reads text (`probe`), and is refused before it samples.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass

from ttscale.errors import ProbeError
from ttscale.scorers.base import ScoreContext
from ttscale.tts.session import Branch, Wait
from ttscale.verifier.likelihood import ANSWER_TEMPLATE, answer_tokens, sum_logprobs

_NO_PARTIAL = (
    "the likelihood scorer reads finished answers only; a search over partial paths needs a "
    "scorer that reads text (--scorer probe)"
)


@dataclass(frozen=True)
class AnswerLikelihoods:
    """Per branch: its extracted answer (None: unusable) and, per distinct answer, the sum of
    its tokens' log-probabilities after the question and its count among the branches."""

    answers: list[str | None]
    loglik: dict[str, float]
    count: dict[str, int]


def answer_likelihoods(
    ctx: ScoreContext, branches: Sequence[Branch], template: str = ANSWER_TEMPLATE
) -> Generator[Wait, None, AnswerLikelihoods]:
    """One embed request per distinct answer of the finished branches, over the engine's
    cached question prefix; the LM head turns the answer's rows into its log-likelihood."""
    if ctx.extract is None:
        raise ProbeError("scoring answers needs the task's answer extractor")
    answers = [ctx.extract(b.text) if ctx.finished(b) else None for b in branches]
    count: dict[str, int] = {}
    for a in answers:
        if a is not None:
            count[a] = count.get(a, 0) + 1
    if not count:
        return AnswerLikelihoods(answers, {}, count)
    engine = ctx.session.engine
    tok = engine.tokenizer

    def encode(text: str, special: bool) -> list[int]:
        return tok.encode(text, add_special_tokens=special)

    pairs = [answer_tokens(encode, ctx.question, a, template) for a in count]
    prefix = pairs[0][0]
    final = engine.model_config.num_hidden_layers  # after the final norm: what the head reads
    if len(count) > 1 and len(prefix) >= engine.cache_config.block_size:
        # The question alone first: its full blocks enter the prefix cache, so the answers
        # (submitted together, which would each compute them) start from them.
        yield from ctx.session.embed([prefix], [final], len(prefix) - 1)
    hidden = yield from ctx.session.embed(
        [prefix + cont for _, cont in pairs], [final], len(prefix) - 1
    )
    logliks = sum_logprobs(engine.model, hidden, [cont for _, cont in pairs])
    loglik = dict(zip(count, logliks, strict=True))
    return AnswerLikelihoods(answers, loglik, count)


class AnswerLikelihoodScorer:
    """P(answer | bare question) under the policy, per finished branch (0 without an answer)."""

    name = "likelihood"

    def __init__(self, template: str = ANSWER_TEMPLATE) -> None:
        if "{answer}" not in template:
            raise ValueError("the answer template must contain {answer}")
        self.template = template

    def needs(self, partial_paths: bool) -> tuple[bool, tuple[int, ...] | None]:
        if partial_paths:  # said before any sampling starts
            raise ProbeError(_NO_PARTIAL)
        return False, None

    def score(
        self, ctx: ScoreContext, branches: Sequence[Branch]
    ) -> Generator[Wait, None, list[float]]:
        lik = yield from answer_likelihoods(ctx, branches, self.template)
        return [0.0 if a is None else math.exp(lik.loglik[a]) for a in lik.answers]
