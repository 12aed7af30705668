"""Tasks: answer extraction / normalization, reasoning-gym tasks, JSONL tasks, load_task."""

from __future__ import annotations

import json
import warnings

import pytest

from ttscale.tasks import (
    GymTask,
    JsonlTask,
    Problem,
    answers_equal,
    extract_answer,
    extract_boxed,
    latex_to_text,
    load_task,
    normalize_answer,
    normalize_number,
)

# --------------------------------------------------------------------------------------------
# normalization

NUMBERS = [
    ("1000", "1000"),
    ("1,000", "1000"),
    ("1000.0", "1000"),
    ("1e3", "1000"),
    ("1{,}000", "1000"),
    ("$1,000.50", "1000.5"),
    ("\\$5", "5"),
    ("-3", "-3"),
    ("\u22123", "-3"),  # unicode minus
    ("+3", "3"),
    ("-0", "0"),
    ("0.50", "0.5"),
    (".5", "0.5"),
    ("5.", "5"),
    ("3/4", "0.75"),
    ("6/8", "0.75"),
    ("2/6", "1/3"),
    ("-4/6", "-2/3"),
    ("25%", "25"),
    ("25\\%", "25"),
    ("42 apples", "42"),
    ("42 apples.", "42"),
    ("3 km/h", "3"),
    ("$42$", "42"),
    ("1,234,567", "1234567"),
    ("2.5E-2", "0.025"),
]


@pytest.mark.parametrize(("text", "expected"), NUMBERS)
def test_normalize_number(text: str, expected: str) -> None:
    assert normalize_number(text) == expected
    assert normalize_answer(text, "numeric") == expected
    # canonical forms are fixed points
    assert normalize_number(expected) == expected


@pytest.mark.parametrize(
    "text", ["abc", "0x3eb2", "12,34", "1e99999", "1/0", "x2", "3 + 4", "", "42 is 6*7"]
)
def test_not_a_number(text: str) -> None:
    assert normalize_number(text) is None


def test_equal_numbers_group_together() -> None:
    group = ["1,000", "1000.0", "1000", "+1000", "1e3", "$1,000", "1000 dollars"]
    assert {normalize_answer(a) for a in group} == {"1000"}
    assert answers_equal("3/4", "0.75")
    assert answers_equal("\\frac{1}{2}", "0.5", "math")
    assert not answers_equal("1/3", "0.333")
    assert not answers_equal(None, "1")


LATEX = [
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac{3}{4}", "0.75"),
    ("\\tfrac12", "0.5"),
    ("-\\frac{1}{3}", "-1/3"),
    ("\\frac{-2}{6}", "-1/3"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2"),
    ("\\sqrt2", "\\sqrt{2}"),
    ("\\frac{1+x}{2}", "(1+x)/2"),
    ("10\\text{ cm}", "10"),
    ("\\text{(A)}", "(A)"),
    ("90^\\circ", "90"),
    ("90^{\\circ}", "90"),
    ("x = 5", "5"),
    ("$\\$1{,}000$", "1000"),
    ("50\\%", "50"),
    ("\\frac{\\frac{1}{2}}{3}", "(1/2)/3"),  # no arithmetic on expressions
]


@pytest.mark.parametrize(("text", "expected"), LATEX)
def test_normalize_math(text: str, expected: str) -> None:
    assert normalize_answer(text, "math") == expected
    assert normalize_answer(expected, "math") == expected  # idempotent


def test_latex_to_text_and_boxed() -> None:
    assert extract_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{\\text{x}^{2}}") == "\\text{x}^{2}"
    assert extract_boxed("\\boxed{3} then \\boxed{4") == "3"  # truncated last box skipped
    assert extract_boxed("\\fbox{7}") == "7"
    assert extract_boxed("no box") is None
    assert latex_to_text("$\\boxed{\\dfrac{1}{2}}$") == "1/2"
    assert latex_to_text("\\left[ 0, \\infty \\right)") == "[ 0, \\infty )"


def test_normalize_text() -> None:
    assert normalize_answer("  mother-in-law. ", "text") == "mother-in-law"
    assert normalize_answer('"Friday"', "text") == "Friday"
    assert normalize_answer("**son**", "text") == "son"
    assert normalize_answer("Hello   World", "text") == "Hello World"  # case kept
    with pytest.raises(ValueError, match="family"):
        normalize_answer("1", "nope")


# --------------------------------------------------------------------------------------------
# extraction

EXTRACT = [
    # (completion, family, expected with fallback, expected without fallback)
    ("5 + 6 = 11.\nAnswer: 42", "numeric", "42", "42"),
    ("The answer is 42.", "numeric", "42", "42"),
    ("the final answer is: $1,000.50.", "numeric", "1000.5", "1000.5"),
    ("Natalia sold 48 clips...\n#### 72", "numeric", "72", "72"),
    ("So she has **42** apples", "numeric", "42", "42"),
    ("**Answer:** -3", "numeric", "-3", "-3"),
    ("**Answer**: 25%", "numeric", "25", "25"),
    ("Answer:\n\n17", "numeric", "17", "17"),
    ("Answer: 42 apples.", "numeric", "42", "42"),
    ("Answer: 6 * 7 = 42", "numeric", "42", "42"),
    ("Answer: \u22125", "numeric", "-5", "-5"),
    # last marker wins
    ("Answer: 41. Wait, that is wrong.\nAnswer: 43", "numeric", "43", "43"),
    ("\\boxed{41} hmm. Answer: \\boxed{42}", "numeric", "42", "42"),
    # ... unless it carries no answer: the previous marker is used
    ("Answer: 42. I am sure the answer is correct.", "numeric", "42", "42"),
    # bold spans that are not a number are not answers
    ("**Step 3**: add 5 and 6 to get 11", "numeric", "11", None),
    # the completion is just the answer
    ("42", "numeric", "42", "42"),
    (" 1,000. ", "numeric", "1000", "1000"),
    # weak fallback: last number
    ("first 5, then 7, finally 9", "numeric", "9", None),
    ("5 - 3 = 2", "numeric", "2", None),
    ("no digits at all", "numeric", None, None),
    ("", "numeric", None, None),
    ("truncated \\boxed{4", "numeric", "4", None),
    # math
    ("The final answer is $\\boxed{\\frac{1}{2}}$.", "math", "0.5", "0.5"),
    ("so \\boxed{\\left( 1, 2 \\right)}", "math", "(1,2)", "(1,2)"),
    ("\\boxed{\\dfrac{\\sqrt{3}}{2}}", "math", "\\sqrt{3}/2", "\\sqrt{3}/2"),
    ("\\boxed{10\\text{ cm}}", "math", "10", "10"),
    ("\\boxed{x = 5}", "math", "5", "5"),
    ("\\boxed 7", "math", "7", "7"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2", "math", "1", "1"),
    ("The answer is 5, since 2 + 3 = 5.", "math", "5", "5"),
    ("Answer: $\\frac{3}{4}$.", "numeric", "0.75", "0.75"),
    # text
    ("Liam is Ethan's son.\nAnswer: son.", "text", "son", "son"),
    ("Answer: mother-in-law", "text", "mother-in-law", "mother-in-law"),
    ("\\boxed{\\text{Friday}}", "text", "Friday", "Friday"),
    ("Friday", "text", "Friday", "Friday"),
    ("some\nmulti-line rambling", "text", None, None),
]


@pytest.mark.parametrize(("text", "family", "expected", "strict"), EXTRACT)
def test_extract_answer(text: str, family: str, expected: str | None, strict: str | None) -> None:
    assert extract_answer(text, family) == expected
    assert extract_answer(text, family, fallback_last_number=False) == strict
    if expected is not None:  # extracted answers are already normalized
        assert normalize_answer(expected, family) == expected


def test_extract_is_linear_on_adversarial_input() -> None:
    # Regexes must not backtrack exponentially on long near-misses.
    text = "Answer: 1" + "a" * 5000 + "!" + " 1 " * 2000 + "answer" * 500
    assert extract_answer(text) is not None
    assert normalize_number("42 " + "ab " * 3000 + "7") is None


# --------------------------------------------------------------------------------------------
# reasoning-gym tasks


@pytest.fixture(scope="module")
def arithmetic() -> GymTask:
    task = load_task("arithmetic")
    assert isinstance(task, GymTask)
    return task


def test_gym_deterministic_and_prefix_stable(arithmetic: GymTask) -> None:
    a = arithmetic.problems(8, seed=3)
    b = load_task("arithmetic").problems(8, seed=3)
    assert a == b
    assert arithmetic.problems(3, seed=3) == a[:3]
    other = arithmetic.problems(8, seed=4)
    assert {p.id for p in a}.isdisjoint(p.id for p in other)
    assert [p.question for p in a] != [p.question for p in other]
    assert a[0].id == "arithmetic:easy:s3:0"
    assert len({p.id for p in a}) == 8
    for p in a:
        json.dumps(p.to_dict())  # metadata is JSON-serializable
        assert Problem.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_gym_references_correct_wrong_answers_not(arithmetic: GymTask) -> None:
    assert arithmetic.dataset == "chain_sum" and arithmetic.family == "numeric"
    for p in arithmetic.problems(10):
        ref = arithmetic.normalize(p.answer)
        assert arithmetic.is_correct(p, p.answer)
        assert arithmetic.is_correct(p, arithmetic.extract_answer(f"Work.\nAnswer: {p.answer}"))
        assert arithmetic.is_correct(p, f"{ref}.0")  # value equality, not string equality
        assert not arithmetic.is_correct(p, str(int(ref) + 1))
        assert not arithmetic.is_correct(p, f"1{ref.lstrip('-')}")  # near miss: partial credit
        assert not arithmetic.is_correct(p, None)
    # a resumed run rebuilds problems from JSON: scoring must not need the cached entry
    p = Problem.from_dict(json.loads(json.dumps(arithmetic.problems(1, seed=9)[0].to_dict())))
    assert load_task("arithmetic").is_correct(p, p.answer)


def test_gym_prompt(arithmetic: GymTask) -> None:
    p = arithmetic.problems(1)[0]
    msgs = arithmetic.prompt(p)
    assert [m["role"] for m in msgs] == ["user"]
    assert p.question in msgs[0]["content"] and "Answer:" in msgs[0]["content"]


@pytest.mark.parametrize(
    ("name", "difficulty"),
    [("gsm_symbolic", None), ("products", "easy"), ("basic_arithmetic", "medium")],
)
def test_gym_other_datasets(name: str, difficulty: str | None) -> None:
    task = GymTask(name, difficulty)
    assert task.family == "numeric"
    ps = task.problems(4, seed=1)
    for p in ps:
        assert task.is_correct(p, task.extract_answer(f"So:\nThe answer is {p.answer}."))
        assert not task.is_correct(p, "123456789")


def test_gym_difficulty() -> None:
    easy = GymTask("chain_sum", "easy").problems(20)
    hard = GymTask("chain_sum", "hard").problems(20)
    assert max(p.metadata["gym"]["num_terms"] for p in easy) == 2
    assert min(p.metadata["gym"]["num_terms"] for p in hard) >= 4
    assert all(p.difficulty == "easy" for p in easy)
    with pytest.warns(UserWarning, match="no difficulty preset"):
        task = GymTask("gsm_symbolic", "hard")
    assert task.difficulty is None and task.problems(1)[0].difficulty is None
    with pytest.raises(ValueError, match="difficulty"):
        GymTask("chain_sum", "impossible")
    # explicit config overrides the preset and changes the ids
    custom = GymTask("chain_sum", "easy", max_digits=1)
    assert custom.config["max_digits"] == 1 and custom.config["min_terms"] == 2
    assert custom.problems(1)[0].id.startswith("chain_sum:easy+")
    with pytest.raises(ValueError, match="unknown config"):
        GymTask("chain_sum", bogus=1)
    with pytest.raises(ValueError, match="invalid config"):
        GymTask("chain_sum", min_terms=5, max_terms=2)


def test_gym_text_family() -> None:
    task = GymTask("family_relationships")
    assert task.family == "text"
    p = task.problems(1)[0]
    assert task.is_correct(p, task.extract_answer(f"Reasoning.\nAnswer: {p.answer}."))
    assert not task.is_correct(p, "nobody")


def test_load_task_errors() -> None:
    with pytest.raises(ValueError, match="chain_sum"):
        load_task("chainsum")
    with pytest.raises(ValueError, match="not found"):
        load_task("/nonexistent/file.jsonl")


# --------------------------------------------------------------------------------------------
# JSONL tasks


def _write(path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_jsonl_gsm8k(tmp_path) -> None:
    f = tmp_path / "gsm.jsonl"
    _write(
        f,
        [
            json.dumps({"question": "2+2?", "answer": "2+2=4\n#### 4"}),
            "",
            json.dumps({"question": "Big?", "answer": "It is big.\n#### 1,000"}),
            json.dumps({"question": "Plain?", "answer": "7"}),
        ],
    )
    task = load_task(str(f))
    assert isinstance(task, JsonlTask) and task.family == "numeric" and len(task) == 3
    ps = task.problems(10)
    assert [p.id for p in ps] == ["gsm:0", "gsm:2", "gsm:3"]
    assert [p.answer for p in ps] == ["4", "1,000", "7"]
    assert ps[0].metadata["solution"].startswith("2+2=4") and ps[1].metadata["line"] == 3
    assert task.is_correct(ps[1], task.extract_answer("... #### 1000"))
    assert task.is_correct(ps[1], "1000.0") and not task.is_correct(ps[1], "100")
    assert task.problems(2) == ps[:2]
    shuffled = JsonlTask(f, shuffle=True)
    assert shuffled.problems(3, seed=1) == JsonlTask(f, shuffle=True).problems(3, seed=1)
    assert sorted(p.id for p in shuffled.problems(3, seed=1)) == sorted(p.id for p in ps)


def test_jsonl_math(tmp_path) -> None:
    f = tmp_path / "math.jsonl"
    _write(
        f,
        [
            json.dumps({"problem": "Half?", "solution": "It is $\\boxed{\\frac{1}{2}}$."}),
            json.dumps({"problem": "Pt?", "answer": "\\left( 1, 2 \\right)", "level": "Level 5"}),
            json.dumps({"problem": "Root?", "answer": "\\frac{\\sqrt{3}}{2}", "level": "Level 2"}),
        ],
    )
    task = JsonlTask(f)
    assert task.family == "math"
    half, pt, root = task.problems(3)
    assert half.answer == "\\frac{1}{2}"
    assert task.is_correct(half, task.extract_answer("so \\boxed{0.5}"))
    assert task.is_correct(half, task.extract_answer("so \\boxed{\\dfrac{1}{2}}"))
    assert task.is_correct(pt, task.extract_answer("\\boxed{(1,2)}"))
    assert not task.is_correct(pt, task.extract_answer("\\boxed{(2,1)}"))
    assert task.is_correct(root, task.extract_answer("\\boxed{\\dfrac{\\sqrt3}{2}}"))
    assert [p.id for p in JsonlTask(f, difficulty="5").problems(5)] == ["math:1"]
    with pytest.raises(ValueError, match="Level 2"):
        JsonlTask(f, difficulty="hard")
    assert task.prompt(half)[0]["content"].endswith("\\boxed{42}.")


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"question": "q"}), "missing field 'answer'"),
        (json.dumps({"question": "q", "answer": ""}), "non-empty"),
        (json.dumps({"question": "q", "answer": "x\n####  "}), "nothing after"),
        (json.dumps({"problem": "p"}), "'answer' or 'solution'"),
        (json.dumps({"problem": "p", "solution": "no box"}), "boxed"),
        (json.dumps({"text": "t"}), "'question'"),
    ],
)
def test_jsonl_malformed_line_reports_line_number(tmp_path, line: str, match: str) -> None:
    f = tmp_path / "bad.jsonl"
    _write(f, [json.dumps({"question": "ok", "answer": "#### 1"}), "", line])
    with pytest.raises(ValueError, match=match) as exc:
        JsonlTask(f)
    assert "bad.jsonl:3" in str(exc.value)


def test_no_warnings_on_plain_use() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_task("arithmetic", "medium").problems(2)
