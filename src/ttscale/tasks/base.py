"""Problems and the task interface shared by every problem source.

A :class:`Task` is a problem source plus a checker: it generates :class:`Problem` s, turns one
into chat messages, pulls the final answer out of a completion and judges it. Strategies only
need ``prompt`` / ``extract_answer`` / ``normalize`` (to group votes); the evaluation loop adds
``problems`` and ``is_correct``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from ttscale.tasks import answers

INSTRUCTIONS: dict[str, str] = {
    # Short, explicit, and with the exact final-line format the extractor looks for first:
    # small models follow a literal template far better than a description of one.
    "numeric": (
        "Solve the problem step by step, briefly. "
        "End with a final line of the form 'Answer: <number>' (just the number, no units)."
    ),
    "math": (
        "Solve the problem step by step, briefly. "
        "Put the final answer in \\boxed{}, e.g. \\boxed{42}."
    ),
    "text": (
        "Solve the problem step by step, briefly. "
        "End with a final line of the form 'Answer: <answer>'."
    ),
}


@dataclass(frozen=True)
class Problem:
    """One problem with its reference answer.

    ``id`` is stable across runs and processes (task name, configuration, seed and index), so an
    interrupted evaluation can be resumed by skipping ids already recorded. ``answer`` is the
    reference as the source gives it; ``task.normalize(problem.answer)`` is its canonical form.
    ``metadata`` is JSON-serializable (it is stored with results) and excluded from the hash so
    problems can be set members / dict keys.
    """

    id: str
    question: str
    answer: str
    difficulty: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; :meth:`from_dict` inverts it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Problem:
        return cls(
            id=str(d["id"]),
            question=str(d["question"]),
            answer=str(d["answer"]),
            difficulty=d.get("difficulty"),
            metadata=dict(d.get("metadata") or {}),
        )


class Task(ABC):
    """A problem source with a checker.

    Subclasses set ``name`` and ``family`` (``"numeric"``, ``"math"`` or ``"text"``, which picks
    the prompt instruction, the extraction rules and the normalization, see
    :mod:`ttscale.tasks.answers`) and implement :meth:`problems`; they may override
    :meth:`is_correct` with a source-specific checker.

    ``fallback_last_number``: whether :meth:`extract_answer` may fall back to the last number of
    a completion without an answer marker (weaker, see :func:`answers.extract_answer`).
    ``system_prompt``: optional system message; by default the instruction is appended to the
    user message, which works with every chat template (some have no system role).
    """

    name: str
    family: str
    fallback_last_number: bool = True
    system_prompt: str | None = None
    FAMILIES: ClassVar[tuple[str, ...]] = answers.FAMILIES

    @abstractmethod
    def problems(self, n: int, seed: int = 0) -> list[Problem]:
        """``n`` problems, a deterministic function of ``(n, seed)`` and the task's settings."""

    def instruction(self) -> str:
        """The answer-format instruction added to each question."""
        return INSTRUCTIONS[self.family]

    def prompt(self, problem: Problem) -> list[dict[str, str]]:
        """Chat messages (``{"role", "content"}``) asking the model to solve ``problem``."""
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        content = f"{problem.question.strip()}\n\n{self.instruction()}"
        messages.append({"role": "user", "content": content})
        return messages

    def extract_answer(self, completion: str) -> str | None:
        """The completion's final answer in normalized form, or ``None`` if it has none."""
        return answers.extract_answer(
            completion, self.family, fallback_last_number=self.fallback_last_number
        )

    def normalize(self, answer: str) -> str:
        """Canonical form used to group votes; idempotent."""
        return answers.normalize_answer(answer, self.family)

    def is_correct(self, problem: Problem, answer: str | None) -> bool:
        """Whether ``answer`` (raw or normalized) matches the reference. ``None`` is wrong.

        Default: equality of normalized forms.
        """
        if answer is None:
            return False
        return self.normalize(answer) == self.normalize(problem.answer)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, family={self.family!r})"
