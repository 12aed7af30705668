"""Tasks backed by reasoning-gym's procedural datasets (offline, seeded, unlimited size).

``GymTask("chain_sum", "easy")`` wraps ``reasoning_gym.create_dataset(name, size=n, seed=...,
**config)``. reasoning-gym is imported lazily (a slow import: docs/BENCHMARKS.md), so importing
this module is cheap.

Difficulty presets (``easy`` / ``medium`` / ``hard``) exist for the datasets in
:data:`DIFFICULTY_PRESETS`: arithmetic-like sets where difficulty is the number of terms /
digits / values, chosen so that ``easy`` is within reach of a ~135M-parameter model. Any other
dataset (``gsm_symbolic`` included: reasoning-gym only supports its difficulty 1.0) ignores
``difficulty`` with a :class:`UserWarning`, and its problems carry ``difficulty=None``. Explicit
config keyword arguments override the preset. Without a difficulty a dataset uses
reasoning-gym's defaults -- for ``basic_arithmetic`` that includes ``/``, which it evaluates as
*floor* division (``7 / 2`` -> ``3``); the presets leave ``/`` out.

Answer family: from :data:`KNOWN_FAMILIES`, else ``numeric`` if the first few references of
the configured dataset all parse as numbers, else ``text``; ``family=`` overrides.

Aliases: ``arithmetic`` is ``chain_sum`` (sums/differences of integers; short single-number
answers) defaulting to ``easy`` (two terms of 1-2 digits).

Seeds: reasoning-gym seeds item ``i`` with ``seed + i``, so its seeds 0 and 1 share all but one
item. ``problems(n, seed)`` passes ``seed * SEED_STRIDE`` instead, which makes small user seeds
give disjoint problem sets (for ``n < SEED_STRIDE``); ``problems(n, seed)`` is a prefix of
``problems(m, seed)`` for ``n <= m``.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import warnings
from dataclasses import fields
from typing import Any

from ttscale.tasks import answers
from ttscale.tasks.base import Problem, Task

DIFFICULTIES: tuple[str, ...] = ("easy", "medium", "hard")
SEED_STRIDE = 1_000_003

# dataset -> difficulty -> config overrides.
DIFFICULTY_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "chain_sum": {
        "easy": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
        "medium": {"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 3},
        "hard": {"min_terms": 4, "max_terms": 6, "min_digits": 2, "max_digits": 4},
    },
    "basic_arithmetic": {
        "easy": {
            "min_terms": 2,
            "max_terms": 2,
            "min_digits": 1,
            "max_digits": 2,
            "operators": ("+", "-"),
            "allow_parentheses": False,
            "allow_negation": False,
        },
        "medium": {
            "min_terms": 2,
            "max_terms": 3,
            "min_digits": 1,
            "max_digits": 2,
            "operators": ("+", "-", "*"),
            "allow_parentheses": True,
            "allow_negation": False,
        },
        # No "/": reasoning-gym evaluates it as floor division ("-33 / -(5643)" -> "0"),
        # which no instruction tells the model.
        "hard": {
            "min_terms": 3,
            "max_terms": 5,
            "min_digits": 1,
            "max_digits": 3,
            "operators": ("+", "-", "*"),
            "allow_parentheses": True,
            "allow_negation": True,
        },
    },
    "products": {
        "easy": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
        "medium": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
        "hard": {"min_terms": 2, "max_terms": 3, "min_digits": 2, "max_digits": 3},
    },
    "decimal_chain_sum": {
        "easy": {
            "min_terms": 2,
            "max_terms": 2,
            "min_digits": 1,
            "max_digits": 1,
            "min_decimal_places": 1,
            "max_decimal_places": 1,
        },
        "medium": {
            "min_terms": 2,
            "max_terms": 3,
            "min_digits": 1,
            "max_digits": 2,
            "min_decimal_places": 1,
            "max_decimal_places": 2,
        },
        "hard": {
            "min_terms": 3,
            "max_terms": 6,
            "min_digits": 1,
            "max_digits": 3,
            "min_decimal_places": 1,
            "max_decimal_places": 3,
        },
    },
    "leg_counting": {
        "easy": {"min_animals": 1, "max_animals": 2, "min_instances": 1, "max_instances": 3},
        "medium": {"min_animals": 2, "max_animals": 4, "min_instances": 1, "max_instances": 5},
        "hard": {"min_animals": 3, "max_animals": 10, "min_instances": 1, "max_instances": 15},
    },
    "gcd": {
        "easy": {"min_value": 1, "max_value": 20},
        "medium": {"min_value": 1, "max_value": 100},
        "hard": {"min_value": 1, "max_value": 1000},
    },
    "lcm": {
        "easy": {"min_value": 1, "max_value": 10},
        "medium": {"min_value": 1, "max_value": 30},
        "hard": {"min_value": 1, "max_value": 100},
    },
    "simple_equations": {
        "easy": {
            "min_terms": 2,
            "max_terms": 2,
            "min_value": 1,
            "max_value": 10,
            "operators": ("+", "-"),
            "operators_weights": [0.5, 0.5],
        },
        "medium": {"min_terms": 2, "max_terms": 3, "min_value": 1, "max_value": 30},
        "hard": {"min_terms": 2, "max_terms": 4, "min_value": 1, "max_value": 100},
    },
    "count_bits": {
        "easy": {"min_n": 1, "max_n": 15},
        "medium": {"min_n": 1, "max_n": 255},
        "hard": {"min_n": 1, "max_n": 2**31 - 1},
    },
    "letter_counting": {
        "easy": {"min_words": 1, "max_words": 3},
        "medium": {"min_words": 3, "max_words": 8},
        "hard": {"min_words": 5, "max_words": 15},
    },
}

# alias -> (dataset, default difficulty)
ALIASES: dict[str, tuple[str, str | None]] = {"arithmetic": ("chain_sum", "easy")}

# Answer family of datasets whose answers are known; others are probed (see GymTask.family).
# "text" overrides cover answers that look numeric but whose canonical numeric form would be
# wrong: normalizing 158/346 to 79/173 would make fraction_simplification trivially correct,
# and base_conversion's binary "0101" is not the number 101.
KNOWN_FAMILIES: dict[str, str] = {
    **dict.fromkeys(
        [
            "aiw",
            "basic_arithmetic",
            "chain_sum",
            "coin_flip",
            "count_bits",
            "count_primes",
            "decimal_arithmetic",
            "decimal_chain_sum",
            "dice",
            "gcd",
            "gsm_symbolic",
            "lcm",
            "leg_counting",
            "letter_counting",
            "number_format",
            "number_sequence",
            "power_function",
            "products",
            "rectangle_count",
            "simple_equations",
            "simple_geometry",
        ],
        "numeric",
    ),
    **dict.fromkeys(
        [
            "base_conversion",
            "bitwise_arithmetic",
            "calendar_arithmetic",
            "complex_arithmetic",
            "fraction_simplification",
            "polynomial_equations",
            "prime_factorization",
            "time_intervals",
        ],
        "text",
    ),
}

# Datasets suited to a ~135M model with short single-number answers, easiest first.
RECOMMENDED: tuple[str, ...] = (
    "arithmetic",
    "chain_sum",
    "basic_arithmetic",
    "products",
    "leg_counting",
    "simple_equations",
    "gcd",
)

_PROBE_SIZE = 8


def _registry() -> dict[str, tuple[type, type]]:
    from reasoning_gym.factory import DATASETS  # lazy: a slow import

    return DATASETS


def available_datasets() -> list[str]:
    """Every name :class:`GymTask` accepts (reasoning-gym datasets and ttscale aliases)."""
    return sorted([*_registry(), *ALIASES])


def _jsonable(obj: Any) -> Any:
    """A JSON-serializable copy (tuples -> lists, anything exotic -> str)."""
    return json.loads(json.dumps(obj, default=str))


class GymTask(Task):
    """A reasoning-gym dataset as a :class:`Task`.

    ``is_correct`` is the dataset's own ``score_answer`` on the extracted answer: correct iff
    the score is >= 1.0 (scorers give partial credit to near misses: 0.01 for a wrong number in
    gsm_symbolic / decimal sets, ``len(ref)/len(answer)`` when the reference is a substring of
    the answer in the default scorer -- all < 1). For ``numeric`` datasets, equal normalized
    values are also accepted (``"5"`` vs a reference ``"5.0"`` that an exact-string scorer
    would reject); if the scorer raises, normalized string equality decides.
    """

    def __init__(
        self,
        name: str,
        difficulty: str | None = None,
        *,
        family: str | None = None,
        **config: Any,
    ) -> None:
        registry = _registry()
        dataset, alias_difficulty = ALIASES.get(name, (name, None))
        if dataset not in registry:
            raise ValueError(_unknown_message(name))
        if difficulty is None:
            difficulty = alias_difficulty
        if difficulty is not None and difficulty not in DIFFICULTIES:
            raise ValueError(
                f"difficulty must be one of {DIFFICULTIES} or None, not {difficulty!r}"
            )

        presets = DIFFICULTY_PRESETS.get(dataset)
        preset: dict[str, Any] = {}
        if difficulty is not None:
            if presets is None:
                warnings.warn(
                    f"reasoning-gym dataset {dataset!r} has no difficulty preset in ttscale; "
                    f"ignoring difficulty={difficulty!r} (presets exist for "
                    f"{', '.join(sorted(DIFFICULTY_PRESETS))})",
                    stacklevel=2,
                )
                difficulty = None
            else:
                preset = presets[difficulty]

        config_cls = registry[dataset][1]
        allowed = {f.name for f in fields(config_cls)} - {"seed", "size"}
        unknown = set(config) - allowed
        if unknown:
            raise ValueError(
                f"unknown config field(s) {sorted(unknown)} for {dataset!r}; "
                f"fields: {sorted(allowed)}"
            )

        self.name = name
        self.dataset = dataset
        self.difficulty = difficulty
        self.overrides = dict(config)
        self.config: dict[str, Any] = {**preset, **config}
        # Built once: validates the config now (reasoning-gym asserts) and serves score_answer,
        # which some datasets compute from their config (e.g. decimal tolerance).
        self._scorer = self._create(size=1, seed=0)
        self._entries: dict[str, dict[str, Any]] = {}  # problem id -> original gym entry
        if family is not None and family not in answers.FAMILIES:
            raise ValueError(f"family must be one of {answers.FAMILIES}, not {family!r}")
        self.family = family or KNOWN_FAMILIES.get(dataset) or self._probe_family()

    # ---------------------------------------------------------------------------------------

    def _create(self, *, size: int, seed: int) -> Any:
        import reasoning_gym

        try:
            return reasoning_gym.create_dataset(self.dataset, size=size, seed=seed, **self.config)
        except (AssertionError, TypeError) as e:  # reasoning-gym validates with assert
            raise ValueError(f"invalid config for {self.dataset!r} {self.config}: {e}") from e

    def _probe_family(self) -> str:
        """``numeric`` if the first few references all parse as numbers, else ``text``."""
        ds = self._create(size=_PROBE_SIZE, seed=0)
        refs = [str(ds[i]["answer"]) for i in range(_PROBE_SIZE)]
        if all(answers.normalize_number(r, allow_units=False) is not None for r in refs):
            return "numeric"
        return "text"

    @property
    def config_tag(self) -> str:
        """Difficulty plus a short hash of explicit overrides; part of every problem id."""
        tag = self.difficulty or "default"
        if self.overrides:
            blob = json.dumps(_jsonable(self.overrides), sort_keys=True).encode()
            tag += "+" + hashlib.sha1(blob).hexdigest()[:8]
        return tag

    def problems(self, n: int, seed: int = 0) -> list[Problem]:
        """``n`` problems; ids are ``"{name}:{config_tag}:s{seed}:{index}"``."""
        if n < 0:
            raise ValueError(f"n must be >= 0, not {n}")
        if n == 0:
            return []
        ds = self._create(size=n, seed=seed * SEED_STRIDE)
        out = []
        for i in range(n):
            entry = ds[i]
            pid = f"{self.name}:{self.config_tag}:s{seed}:{i}"
            self._entries[pid] = entry
            out.append(
                Problem(
                    id=pid,
                    question=str(entry["question"]),
                    answer=str(entry["answer"]),
                    difficulty=self.difficulty,
                    metadata={
                        "source": "reasoning_gym",
                        "dataset": self.dataset,
                        "seed": seed,
                        "index": i,
                        "gym": _jsonable(entry.get("metadata", {})),
                    },
                )
            )
        return out

    def score(self, problem: Problem, answer: str | None) -> float | None:
        """The dataset's own score in [0, 1] for ``answer``, or ``None`` if its scorer raised."""
        entry = self._entries.get(problem.id)
        if entry is None:  # problem rebuilt from JSON (resumed run): reconstruct the entry
            entry = {
                "question": problem.question,
                "answer": problem.answer,
                "metadata": problem.metadata.get("gym", {}),
            }
        try:
            # deepcopy: a scorer must not be able to mutate the cached entry
            return float(self._scorer.score_answer(answer, copy.deepcopy(entry)))
        except Exception:  # scorers are third-party code with format assumptions
            return None

    def is_correct(self, problem: Problem, answer: str | None) -> bool:
        if answer is None:
            return False
        score = self.score(problem, answer)
        if score is not None and score >= 1.0:
            return True
        if score is None or self.family == "numeric":
            return self.normalize(answer) == self.normalize(problem.answer)
        return False

    def __repr__(self) -> str:
        return (
            f"GymTask(name={self.name!r}, dataset={self.dataset!r}, "
            f"difficulty={self.difficulty!r}, family={self.family!r}, config={self.config!r})"
        )


def _unknown_message(name: str) -> str:
    names = available_datasets()
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return (
        f"unknown task {name!r}: not a reasoning-gym dataset or alias, nor a .jsonl path.{hint} "
        f"Recommended: {', '.join(RECOMMENDED)}; {len(names)} available in total "
        f"(ttscale.tasks.gym.available_datasets())."
    )
