"""Training data for a verifier: K sampled candidates per problem, labelled by the task's checker.

One engine request per problem with ``n=K`` (the prompt is prefilled once and forked K ways),
plus one greedy request that shares the prompt's blocks through the prefix cache: the greedy
answer is the baseline every selection rule is compared with. Prompts are the task's own
(``task.prompt``), answers come from ``task.extract_answer`` and labels from
``task.is_correct`` -- exactly what ``ttscale eval`` judges, so a probe learns the same notion
of "correct" that the evaluation reports.

A dataset is cached on disk as JSON lines (``runs/verifier_data/NAME.jsonl``): a header line
with the settings, then one line per problem. Sampling is resumable chunk by chunk, and a file
made with other settings is refused rather than mixed in.

Problem seeds: ``task.problems(n, seed)`` with distinct seeds gives disjoint problem sets (the
seed stride of :mod:`ttscale.tasks.gym`), so the verifier's data use seeds from
:data:`TRAIN_SEED_BASE` upward and evaluations (``ttscale eval --seed 0..``) never meet them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ttscale.sampling.params import SamplingParams

if TYPE_CHECKING:
    from ttscale.llm import LLM
    from ttscale.tasks import Problem, Task

# Problem seeds of verifier data start here; evaluations use small seeds (0, 1, ...). The
# training split is TRAIN_SEED_BASE, held-out test problems TEST_SEED.
TRAIN_SEED_BASE = 7_000
TEST_SEED = 7_500
DATA_DIR = Path("runs/verifier_data")
# Problems per engine batch: bounded so a chunk's KV fits and progress is saved often.
CHUNK = 32


@dataclass
class Candidate:
    """One sampled completion. ``token_ids`` are the generated tokens (EOS included when the
    sample stopped on it); ``logprob`` is the sum of the sampled tokens' logprobs."""

    token_ids: list[int]
    text: str
    answer: str | None
    correct: bool
    finish_reason: str | None
    logprob: float

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(1, len(self.token_ids))


@dataclass
class ProblemSamples:
    """A problem's prompt, its greedy answer and its K candidates."""

    problem_id: str
    question: str
    reference: str
    prompt_token_ids: list[int]
    greedy: Candidate
    candidates: list[Candidate] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProblemSamples:
        return cls(
            problem_id=d["problem_id"],
            question=d["question"],
            reference=d["reference"],
            prompt_token_ids=list(d["prompt_token_ids"]),
            greedy=Candidate(**d["greedy"]),
            candidates=[Candidate(**c) for c in d["candidates"]],
        )


def check_task_has_checker(task: Task, problems: Sequence[Problem]) -> None:
    """No labels without references: a task whose problems lack reference answers (a JSONL
    file of questions only, say) cannot train a verifier."""
    missing = [p.id for p in problems if not str(p.answer).strip()]
    if missing:
        raise ValueError(
            f"task {task.name!r} has problems without a reference answer ({missing[0]}, "
            f"{len(missing)} in all): no checker, so no labels for a verifier"
        )


def check_split(task: Task, n_train: int, n_test: int) -> None:
    """Training and test problems must exist in the numbers asked and never overlap: a task
    that ignores the seed (a JSONL file read in order) would test on its training problems."""
    train = task.problems(n_train, TRAIN_SEED_BASE)
    test = task.problems(n_test, TEST_SEED)
    if len(train) < n_train or len(test) < n_test:
        raise ValueError(
            f"task {task.name!r} gave {len(train)} training and {len(test)} test problems for "
            f"{n_train} + {n_test} asked: too few problems to hold out"
        )
    overlap = {p.id for p in train} & {p.id for p in test}
    if overlap:
        raise ValueError(
            f"task {task.name!r} gives the same problems for seeds {TRAIN_SEED_BASE} and "
            f"{TEST_SEED} ({len(overlap)} shared, e.g. {sorted(overlap)[0]}): it cannot hold "
            "problems out; use a task whose problems depend on the seed"
        )
    check_task_has_checker(task, train + test)


def sampling_settings(
    task: Task, samples: int, temperature: float, top_p: float, max_tokens: int, seed: int
) -> dict[str, Any]:
    """What a cached dataset depends on (checked on resume)."""
    ident = {"name": task.name, "family": task.family}
    for attr in ("dataset", "difficulty", "overrides"):
        if hasattr(task, attr):
            ident[attr] = getattr(task, attr)
    return json.loads(
        json.dumps(
            {
                "task": ident,
                "problem_seed": seed,
                "samples": samples,
                "temperature": temperature,
                "top_p": top_p,
                "max_tokens": max_tokens,
            },
            default=str,
        )
    )


def _candidate(task: Task, problem: Problem, out: Any) -> Candidate:
    answer = task.extract_answer(out.text)
    return Candidate(
        token_ids=list(out.token_ids),
        text=out.text,
        answer=answer,
        correct=task.is_correct(problem, answer),
        finish_reason=out.finish_reason,
        logprob=float(sum(out.logprobs or [])),
    )


def sample_problems(
    llm: LLM,
    task: Task,
    problems: Sequence[Problem],
    samples: int,
    temperature: float,
    top_p: float = 1.0,
    max_tokens: int = 160,
    seed: int = 0,
    indices: Sequence[int] | None = None,
) -> list[ProblemSamples]:
    """Greedy plus ``samples`` candidates for every problem, all problems batched together.
    Problem ``i``'s samples use the seed ``seed * 100_003 + indices[i]`` (its index in the
    full problem list), so they do not depend on the chunk or on what else is batched."""
    indices = list(range(len(problems))) if indices is None else list(indices)
    prompts, params = [], []
    for p, index in zip(problems, indices, strict=True):
        ids = llm.tokenizer.encode_chat(task.prompt(p))
        prompts += [ids, ids]
        params += [
            SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0),
            SamplingParams(
                n=samples,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_tokens,
                seed=seed * 100_003 + index,
                logprobs=0,
            ),
        ]
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = []
    for i, p in enumerate(problems):
        greedy, sampled = outs[2 * i], outs[2 * i + 1]
        result.append(
            ProblemSamples(
                problem_id=p.id,
                question=p.question,
                reference=p.answer,
                prompt_token_ids=list(greedy.prompt_token_ids),
                greedy=_candidate(task, p, greedy.outputs[0]),
                candidates=[_candidate(task, p, o) for o in sampled.outputs],
            )
        )
    return result


def read_dataset(path: Path) -> tuple[dict[str, Any], list[ProblemSamples]]:
    """The settings header and problems of a cached dataset (a cut-off last line is dropped)."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    try:
        header = json.loads(lines[0])["settings"]
    except (json.JSONDecodeError, KeyError, TypeError, IndexError):
        raise ValueError(f"{path}: not a verifier dataset (no settings header)") from None
    items = []
    for j, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        try:
            items.append(ProblemSamples.from_dict(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError):
            if j == len(lines):  # killed mid-write: the last line only
                break
            raise ValueError(f"{path}:{j}: corrupt line; delete the file to resample") from None
    return header, items


def build_dataset(
    llm: LLM,
    task: Task,
    n_problems: int,
    samples: int,
    temperature: float,
    path: Path,
    *,
    top_p: float = 1.0,
    max_tokens: int = 160,
    seed: int = TRAIN_SEED_BASE,
    log: Callable[[str], None] = print,
) -> list[ProblemSamples]:
    """The first ``n_problems`` of ``task.problems(n, seed)``, sampled (or read from ``path``
    where already sampled with the same settings)."""
    problems = task.problems(n_problems, seed)
    check_task_has_checker(task, problems)
    settings = sampling_settings(task, samples, temperature, top_p, max_tokens, seed)
    path = Path(path)
    done: dict[str, ProblemSamples] = {}
    if path.exists():
        header, items = read_dataset(path)
        if header != settings:
            raise ValueError(
                f"{path} was sampled with other settings ({header}); use another --data path"
            )
        done = {it.problem_id: it for it in items}
        # Rewrite without a possibly cut-off tail so appends start on a clean line.
        _write(path, settings, list(done.values()))
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, settings, [])
    todo = [p for p in problems if p.id not in done]
    index = {p.id: i for i, p in enumerate(problems)}
    t0 = time.perf_counter()
    with path.open("a", encoding="utf-8") as sink:
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start : start + CHUNK]
            items = sample_problems(
                llm,
                task,
                chunk,
                samples,
                temperature,
                top_p,
                max_tokens,
                seed,
                indices=[index[p.id] for p in chunk],
            )
            for p, item in zip(chunk, items, strict=True):
                done[p.id] = item
                sink.write(json.dumps(item.to_dict()) + "\n")
            sink.flush()
            log(
                f"sampled {start + len(chunk)}/{len(todo)} problems "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    return [done[p.id] for p in problems]


def _write(path: Path, settings: dict[str, Any], items: Sequence[ProblemSamples]) -> None:
    lines = [json.dumps({"settings": settings})] + [json.dumps(it.to_dict()) for it in items]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
