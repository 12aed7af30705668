"""Process labels by Monte-Carlo rollouts (Math-Shepherd, Wang et al. 2024).

A step prefix of a candidate is labelled with the fraction of ``m`` continuations from it that
reach a correct answer: a soft estimate of "this partial path can still succeed". Steps end at
newlines (the step delimiter the search strategies use). Each prefix is one engine request
with ``n=m``: the engine prefills it once and forks it ``m`` ways, and the prompt and earlier
prefixes of the same candidate come from the prefix cache (full blocks of the hash chain), so a
candidate's cuts cost little more than their new tokens and the rollouts.

A probe trained on these labels (BCE on the soft targets, features of the prefix's last row)
scores partial paths for beam and tree search.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ttscale.sampling.params import SamplingParams

if TYPE_CHECKING:
    from ttscale.llm import LLM
    from ttscale.tasks import Problem, Task
    from ttscale.verifier.data import ProblemSamples

STEP_DELIMITER = "\n"


@dataclass(frozen=True)
class StepLabel:
    """A candidate's prefix (its first ``cut`` tokens) and the share of rollouts from it that
    were correct."""

    problem_id: str
    candidate: int
    cut: int
    value: float
    rollouts: int


def step_cuts(
    decode_one: Callable[[int], str], token_ids: Sequence[int], max_steps: int = 8
) -> list[int]:
    """Token counts after which a step ends (a token whose text contains the delimiter), not
    counting the full candidate; the last ``max_steps`` kept (late steps decide the answer)."""
    cuts = [i + 1 for i, t in enumerate(token_ids[:-1]) if STEP_DELIMITER in decode_one(t)]
    return cuts[-max_steps:] if max_steps > 0 else cuts


def process_labels(
    llm: LLM,
    task: Task,
    problems: Sequence[Problem],
    items: Sequence[ProblemSamples],
    rollouts: int = 4,
    temperature: float = 0.7,
    max_tokens: int = 160,
    max_steps: int = 8,
    candidates_per_problem: int = 4,
    seed: int = 0,
) -> list[StepLabel]:
    """Rollout labels for the step prefixes of the first ``candidates_per_problem`` candidates
    of each problem. ``problems`` and ``items`` are parallel (the checker needs the problem)."""

    def decode_one(t: int) -> str:
        return llm.tokenizer.decode([t])

    prompts: list[list[int]] = []
    params: list[SamplingParams] = []
    keys: list[tuple[int, int, int, str]] = []  # (problem, candidate, cut, prefix text)
    for pi, (problem, item) in enumerate(zip(problems, items, strict=True)):
        if problem.id != item.problem_id:
            raise ValueError(f"problem {problem.id} does not match samples of {item.problem_id}")
        for ci, cand in enumerate(item.candidates[:candidates_per_problem]):
            for cut in step_cuts(decode_one, cand.token_ids, max_steps):
                prefix = cand.token_ids[:cut]
                prompts.append(item.prompt_token_ids + prefix)
                params.append(
                    SamplingParams(
                        n=rollouts,
                        temperature=temperature,
                        max_tokens=max(1, max_tokens - cut),
                        seed=seed * 1_000_003 + len(keys),
                    )
                )
                keys.append((pi, ci, cut, llm.tokenizer.decode(prefix)))
    if not prompts:
        return []
    outs = llm.generate(prompts, params, use_tqdm=False)
    labels = []
    for (pi, ci, cut, text), out in zip(keys, outs, strict=True):
        problem = problems[pi]
        right = sum(
            task.is_correct(problem, task.extract_answer(text + o.text)) for o in out.outputs
        )
        labels.append(StepLabel(problem.id, ci, cut, right / len(out.outputs), len(out.outputs)))
    return labels
