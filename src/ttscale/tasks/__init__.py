"""Tasks: problems with a checker, and answer extraction / normalization.

>>> task = load_task("arithmetic")               # chain_sum, easy
>>> probs = task.problems(100, seed=0)
>>> msgs = task.prompt(probs[0])                 # chat messages for the engine
>>> ans = task.extract_answer(completion_text)   # normalized final answer or None
>>> task.is_correct(probs[0], ans)
"""

from __future__ import annotations

from pathlib import Path

from ttscale.tasks.answers import (
    FAMILIES,
    answers_equal,
    extract_answer,
    extract_boxed,
    latex_to_text,
    normalize_answer,
    normalize_number,
)
from ttscale.tasks.base import Problem, Task
from ttscale.tasks.gym import GymTask, available_datasets
from ttscale.tasks.jsonl import JsonlTask

__all__ = [
    "FAMILIES",
    "GymTask",
    "JsonlTask",
    "Problem",
    "Task",
    "answers_equal",
    "available_datasets",
    "extract_answer",
    "extract_boxed",
    "latex_to_text",
    "load_task",
    "normalize_answer",
    "normalize_number",
]


def load_task(spec: str, difficulty: str | None = None) -> Task:
    """A task from a spec string.

    * a path to a ``.jsonl`` file (or any existing file) -> :class:`JsonlTask` (``difficulty``
      filters on the file's ``level`` / ``difficulty`` field);
    * ``"arithmetic"`` -> reasoning-gym ``chain_sum`` at ``easy`` unless ``difficulty`` says
      otherwise;
    * any reasoning-gym dataset name -> :class:`GymTask` (``difficulty`` in easy/medium/hard,
      applied where a preset exists, see :mod:`ttscale.tasks.gym`).

    Raises ValueError for an unknown name (listing recommended / close names) or a missing file.
    """
    spec = spec.strip()
    path = Path(spec).expanduser()
    if spec.endswith(".jsonl") or path.is_file():
        return JsonlTask(path, difficulty=difficulty)
    return GymTask(spec, difficulty)
