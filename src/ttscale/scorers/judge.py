"""LLM-as-judge: ask a model whether a step or answer is correct and read P(yes) from its
next-token distribution (no sampling, one token generated per candidate)."""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence

from ttscale.engine.llm_engine import LLMEngine
from ttscale.sampling.params import SamplingParams
from ttscale.scorers.base import ScoreContext
from ttscale.tts.session import Branch, Wait, run_prompts

JUDGE_PROMPT = (
    "Here is a problem and a proposed solution.\n\nProblem: {question}\n\n"
    "Proposed solution: {solution}\n\nIs the proposed solution correct? Answer Yes or No."
)
# The judge reads all of these surface forms: tokenizers split "Yes" differently.
YES, NO = ("Yes", " Yes", "yes", " yes", "YES"), ("No", " No", "no", " no", "NO")


class JudgeScorer:
    """P(yes) / (P(yes) + P(no)) for the judge's first answer token; 0.5 if neither shows up
    in its top 20. `engine=None` judges with the generating model (same engine)."""

    name = "judge"

    def __init__(self, engine: LLMEngine | None = None, template: str = JUDGE_PROMPT) -> None:
        self.engine, self.template = engine, template
        self._ids: dict[int, tuple[set[int], set[int]]] = {}

    def _answer_ids(self, engine: LLMEngine) -> tuple[set[int], set[int]]:
        key = id(engine)
        if key not in self._ids:
            tok = engine.tokenizer

            def first_ids(words):
                return {tok.encode(w, add_special_tokens=False)[0] for w in words}

            self._ids[key] = (first_ids(YES), first_ids(NO))
        return self._ids[key]

    def score(
        self, ctx: ScoreContext, branches: Sequence[Branch]
    ) -> Generator[Wait, None, list[float]]:
        engine = self.engine or ctx.session.engine
        tok = engine.tokenizer
        prompts = []
        for b in branches:
            content = self.template.format(question=ctx.question, solution=b.text.strip())
            messages = [{"role": "user", "content": content}]
            ids = tok.encode_chat(messages) if tok.has_chat_template else tok.encode(content)
            prompts.append(ids[-(engine.max_model_len - 1) :])
        params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=20, ignore_eos=True)
        seqs = yield from run_prompts(
            engine, prompts, params, tag=f"{ctx.session.tag}/judge", session=ctx.session
        )
        yes_ids, no_ids = self._answer_ids(engine)
        scores = []
        for seq in seqs:
            top = seq.top_logprobs[0] if seq.top_logprobs else []
            p_yes = sum(math.exp(lp) for t, lp in top if t in yes_ids)
            p_no = sum(math.exp(lp) for t, lp in top if t in no_ids)
            scores.append(p_yes / (p_yes + p_no) if p_yes + p_no > 0 else 0.5)
        return scores
