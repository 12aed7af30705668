"""Tasks read from a JSON-lines file (GSM8K / MATH style).

Accepted line formats (one JSON object per line; blank lines are skipped):

* GSM8K: ``{"question": ..., "answer": "...reasoning...\\n#### 42"}``; the reference is the text
  after the last ``####`` (the whole solution is kept in ``metadata["solution"]``). An answer
  without ``####`` is taken as the reference itself (``{"question": ..., "answer": "42"}``).
* MATH: ``{"problem": ..., "answer": "\\\\frac{1}{2}"}`` or ``{"problem": ..., "solution": "...
  \\\\boxed{\\\\frac{1}{2}}..."}`` (reference = last ``\\\\boxed{}`` of the solution);
  ``answer`` wins when both are present.

Optional fields: ``level`` or ``difficulty`` (-> ``Problem.difficulty``), ``id`` /
``unique_id`` (kept in metadata). The family is ``math`` if any line is MATH-style, else
``numeric``; pass ``family=`` to override (e.g. ``"text"``).

Problem ids are ``"{file stem}:{line index}"`` with the 0-based physical line index, so they
survive re-reading the same file and point at the line (``metadata["line"]`` is 1-based).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from ttscale.tasks import answers
from ttscale.tasks.base import Problem, Task


class JsonlTask(Task):
    """Problems from a ``.jsonl`` file; see the module docstring for the formats.

    ``difficulty``: keep only lines whose ``level`` / ``difficulty`` equals it
    (case-insensitive; ``"5"`` also matches MATH's ``"Level 5"``).
    ``shuffle``: by default ``problems(n)`` is the first ``n`` problems in file order and
    ``seed`` is ignored; with ``shuffle=True`` it is a seeded random sample (without
    replacement, still deterministic). Asking for more problems than the file holds returns all.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        difficulty: str | None = None,
        family: str | None = None,
        shuffle: bool = False,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"task file not found: {self.path}")
        if family is not None and family not in answers.FAMILIES:
            raise ValueError(f"family must be one of {answers.FAMILIES}, not {family!r}")
        self.name = self.path.stem
        self.difficulty = difficulty
        self.shuffle = shuffle
        self._problems, any_math = self._load()
        if difficulty is not None:
            levels = sorted({str(p.difficulty) for p in self._problems})
            self._problems = [p for p in self._problems if _level_matches(p.difficulty, difficulty)]
            if not self._problems:
                raise ValueError(f"{self.path}: no problem has difficulty {difficulty!r}: {levels}")
        self.family = family or ("math" if any_math else "numeric")

    def _load(self) -> tuple[list[Problem], bool]:
        problems: list[Problem] = []
        any_math = False
        with self.path.open(encoding="utf-8") as f:
            for idx, line in enumerate(f):
                if not line.strip():
                    continue
                lineno = idx + 1
                where = f"{self.path}:{lineno}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
                problem, is_math = _parse_record(rec, where)
                any_math |= is_math
                problems.append(
                    Problem(
                        id=f"{self.name}:{idx}",
                        question=problem["question"],
                        answer=problem["answer"],
                        difficulty=problem["difficulty"],
                        metadata={"source": str(self.path), "line": lineno, **problem["meta"]},
                    )
                )
        return problems, any_math

    def __len__(self) -> int:
        return len(self._problems)

    def problems(self, n: int, seed: int = 0) -> list[Problem]:
        """The first ``n`` problems (or a seeded sample with ``shuffle=True``); all if fewer."""
        if n < 0:
            raise ValueError(f"n must be >= 0, not {n}")
        if not self.shuffle:
            return list(self._problems[:n])
        order = list(range(len(self._problems)))
        random.Random(seed).shuffle(order)
        return [self._problems[i] for i in order[:n]]


def _str_field(rec: dict[str, Any], key: str, where: str) -> str:
    value = rec[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field {key!r} must be a non-empty string")
    return value


def _parse_record(rec: dict[str, Any], where: str) -> tuple[dict[str, Any], bool]:
    """-> ({question, answer, difficulty, meta}, is_math). Raises ValueError with ``where``."""
    meta: dict[str, Any] = {}
    if "problem" in rec:  # MATH style
        question = _str_field(rec, "problem", where)
        if "answer" in rec:
            answer = _str_field(rec, "answer", where)
        elif "solution" in rec:
            solution = _str_field(rec, "solution", where)
            boxed = answers.extract_boxed(solution)
            if boxed is None:
                raise ValueError(f"{where}: 'solution' has no \\boxed{{...}} answer")
            answer = boxed
        else:
            raise ValueError(f"{where}: MATH-style line needs an 'answer' or 'solution' field")
        if "solution" in rec:
            meta["solution"] = rec["solution"]
        is_math = True
    elif "question" in rec:  # GSM8K style
        question = _str_field(rec, "question", where)
        if "answer" not in rec:
            raise ValueError(f"{where}: missing field 'answer'")
        raw = _str_field(rec, "answer", where)
        if "####" in raw:
            answer = raw.rsplit("####", 1)[1].strip()
            meta["solution"] = raw
            if not answer:
                raise ValueError(f"{where}: nothing after '####' in 'answer'")
        else:
            answer = raw.strip()
        is_math = False
    else:
        raise ValueError(
            f"{where}: expected a 'question' (GSM8K) or 'problem' (MATH) field, got {sorted(rec)}"
        )
    difficulty = rec.get("level", rec.get("difficulty"))
    for key in ("id", "unique_id", "type", "subject"):
        if key in rec:
            meta[key] = rec[key]
    return {
        "question": question,
        "answer": answer,
        "difficulty": None if difficulty is None else str(difficulty),
        "meta": meta,
    }, is_math


def _level_matches(level: str | None, wanted: str) -> bool:
    if level is None:
        return False
    a, b = level.strip().lower(), wanted.strip().lower()
    return a == b or a.removeprefix("level").strip() == b.removeprefix("level").strip()
