"""Final-answer extraction and normalization.

Everything the voting layer groups on goes through :func:`normalize_answer`, so two answers are
"the same vote" iff their normalized strings are equal. Three answer *families*:

``numeric``
    A single rational number. Canonical form (:func:`normalize_number`):

    * integers print as integers: ``1,000`` = ``1000`` = ``1000.0`` = ``+1000`` = ``1e3`` ->
      ``1000``; ``-0`` -> ``0``;
    * currency symbols (``$ £ € ¥``, ``\\$``), thousands separators (``1,000``, ``1{,}000``,
      strict 3-digit groups only) and a trailing percent sign are dropped:
      ``$1,000.50`` -> ``1000.5``, ``25%`` -> ``25`` (no /100 scaling: "what percent ..."
      questions expect ``25``);
    * a non-integer whose decimal expansion terminates prints as a decimal without trailing
      zeros (``0.50`` -> ``0.5``, ``3/4`` -> ``0.75``, ``\\frac{1}{2}`` -> ``0.5``); any other
      rational prints as a reduced fraction ``a/b`` with the sign on ``a`` (``2/6`` -> ``1/3``,
      ``-4/6`` -> ``-2/3``). So a fraction equals its decimal exactly when the decimal is exact;
      ``0.333`` is *not* ``1/3``. One canonical form (rather than "keep what the model wrote")
      is what makes ``3/4`` and ``0.75`` land in the same vote bucket;
    * scientific notation is accepted (``1e3``, ``2.5E-2``) with ``|exponent| <= 1000``;
    * words after the number are units and are dropped (``42 apples`` -> ``42``).

``math``
    LaTeX answers (MATH-style ``\\boxed{}``). :func:`latex_to_text` strips the typesetting
    (``\\left``/``\\right``, ``\\text{}``, ``\\dfrac``/``\\tfrac`` -> ``\\frac``, ``\\frac{a}{b}``
    -> ``a/b``, spacing commands, ``^\\circ``, ``$``); if what is left is a number (optionally
    followed by unit words) it gets the numeric canonical form, else all whitespace is removed
    (``\\left( 1, 2 \\right)`` -> ``(1,2)``, ``\\frac{\\sqrt{3}}{2}`` -> ``\\sqrt{3}/2``). No
    symbolic equivalence (``x+1`` vs ``1+x`` differ) -- that needs a CAS.

``text``
    Free-form strings: whitespace collapsed, surrounding quotes / markdown emphasis and a
    trailing period removed. Case is kept (some tasks are case-sensitive, and the dataset's own
    scorer sees this string).

Extraction (:func:`extract_answer`) looks for, in order of strength:

1. the *last* answer marker in the text, where the markers are ``\\boxed{...}`` /
   ``\\fbox{...}`` (nested braces handled), ``Answer:`` / ``Final answer:`` / ``The answer is``
   (also ``would be`` / ``should be`` / ``=``), and ``#### <x>``; the marker that starts last
   wins, so ``Answer: \\boxed{42}`` and ``\\boxed{41} ... Answer: 42`` both behave. If the last
   marker carries no usable answer (``... the answer is correct.`` in a numeric task) the
   previous one is tried. After a text marker the answer is the first non-empty line; for
   numeric tasks, the first number on it, after its last ``=`` if any
   (``Answer: 42 apples.`` -> ``42``, ``Answer: 6 * 7 = 42`` -> ``42``);
2. the last ``**bold**`` span that is a number (numeric / math families only);
3. the whole completion when it is nothing but an answer (``"42."``; for text, one line);
4. optional, weaker: the last number anywhere in the text (numeric / math only,
   ``fallback_last_number=True``). It recovers answers from models that ignore the format,
   but on a truncated or rambling completion it returns an intermediate result, so it is
   biased towards *some* answer rather than none; turn it off to measure format compliance.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Literal

Family = Literal["numeric", "math", "text"]
FAMILIES: tuple[str, ...] = ("numeric", "math", "text")

# A number token inside free text. The look-behind keeps "x2", "H2O" and the "3" of "1.2.3"
# out; a sign only counts when it does not follow a word character (so "5-3" is 5 and 3, not
# 5 and -3). Thousands groups must be exactly 3 digits, so "1,2,3" is three numbers.
_NUM_CORE = (
    r"(?:\d{1,3}(?:(?:,|\{,\})\d{3})+|\d+)(?:\.\d+)?"  # 1,000 / 1{,}000 / 1000 / 1000.5
    r"|\.\d+"  # .5
)
_NUMBER_RE = re.compile(
    r"(?<![\w.])"
    r"(?P<sign>[-+\u2212]?)"
    r"(?P<cur>\\?\$|£|€|¥)?\s?"
    r"(?P<body>" + _NUM_CORE + r")"
    r"(?P<exp>[eE][-+]?\d+)?"
    r"(?:\s?/\s?(?P<den>\d+)(?![\d.]))?"
    r"(?P<pct>\s?\\?%)?"
    r"(?!\d)"
)
# Unit words allowed after a number that is the whole answer ("42 apples", "5 cm", "3 km/h").
# Words are maximal runs separated by mandatory whitespace, so the regex cannot backtrack
# exponentially on a long non-matching string.
_UNITS_RE = re.compile(r"[A-Za-z][A-Za-z.'/\-]*(?:\s+[A-Za-z][A-Za-z.'/\-]*)*")

_MAX_EXP = 1000  # Fraction("1e999999999") would allocate a huge int; treat as not-a-number.

_ANSWER_MARKER_RE = re.compile(
    r"(?:"
    r"\banswer[*_]*(?:\s+(?:is|would\s+be|should\s+be|will\s+be)\b[*_]*\s*[:=]?|\s*[:=])"
    r"|####"
    r")",
    re.IGNORECASE,
)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*(?=[{\s])")
_BOLD_RE = re.compile(r"\*\*([^*\n]+?)\*\*")
_UNICODE_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u00a0": " "})


# --------------------------------------------------------------------------------------------
# numbers


def _fraction_to_str(value: Fraction) -> str:
    """Canonical string of a rational: integer, terminating decimal, or reduced ``a/b``."""
    num, den = value.numerator, value.denominator
    if den == 1:
        return str(num)
    # A decimal expansion terminates iff the reduced denominator is 2^a * 5^b.
    d, twos, fives = den, 0, 0
    while d % 2 == 0:
        d //= 2
        twos += 1
    while d % 5 == 0:
        d //= 5
        fives += 1
    if d != 1:
        return f"{num}/{den}"
    places = max(twos, fives)
    scaled = abs(num) * (10**places // den)
    digits = str(scaled).rjust(places + 1, "0")
    int_part, frac_part = digits[:-places], digits[-places:].rstrip("0")
    sign = "-" if num < 0 else ""
    return f"{sign}{int_part}.{frac_part}"


def _match_to_fraction(m: re.Match[str]) -> Fraction | None:
    body = m.group("body").replace("{,}", "").replace(",", "")
    exp = m.group("exp")
    if exp is not None:
        if abs(int(exp[1:])) > _MAX_EXP:
            return None
        body += exp
    try:
        value = Fraction(body)
        den = m.group("den")
        if den is not None:
            if int(den) == 0:
                return None
            value /= int(den)
    except (ValueError, ZeroDivisionError):  # e.g. > 4300 digits (int max_str_digits)
        return None
    if m.group("sign") in ("-", "\u2212"):
        value = -value
    return value


def normalize_number(text: str, *, allow_units: bool = True) -> str | None:
    """Canonical form of ``text`` if it is a single number, else ``None``.

    ``text`` may carry surrounding whitespace, ``$...$`` math delimiters, a currency symbol,
    thousands separators, a percent sign, a trailing period and (``allow_units``) trailing unit
    words. See the module docstring for the canonical form.
    """
    s = _strip_outer(text.translate(_UNICODE_MINUS))
    s = s.rstrip(".;,!").strip()
    m = _NUMBER_RE.match(s)
    if m is None:
        return None
    rest = s[m.end() :].strip()
    if rest and (not allow_units or _UNITS_RE.fullmatch(rest) is None):
        return None
    value = _match_to_fraction(m)
    return None if value is None else _fraction_to_str(value)


def find_numbers(text: str) -> list[str]:
    """All number tokens in ``text``, in order, each in canonical form."""
    out = []
    for m in _NUMBER_RE.finditer(text.translate(_UNICODE_MINUS)):
        value = _match_to_fraction(m)
        if value is not None:
            out.append(_fraction_to_str(value))
    return out


# --------------------------------------------------------------------------------------------
# LaTeX


def _match_brace(s: str, open_idx: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_idx``, or -1 if unbalanced."""
    depth = 0
    for i in range(open_idx, len(s)):
        c = s[i]
        if c == "\\":  # \{ and \} are literal braces, not grouping
            continue
        if c == "{" and (i == 0 or s[i - 1] != "\\"):
            depth += 1
        elif c == "}" and (i == 0 or s[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return i
    return -1


def _read_arg(s: str, i: int) -> tuple[str, int] | None:
    """Read one TeX argument starting at ``i`` (skipping spaces): ``{...}`` or one token."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None
    if s[i] == "{":
        j = _match_brace(s, i)
        if j < 0:
            return None
        return s[i + 1 : j], j + 1
    if s[i] == "\\":  # a control sequence such as \pi
        m = re.match(r"\\[A-Za-z]+", s[i:])
        if m:
            return m.group(0), i + m.end()
    return s[i], i + 1


def _read_box(s: str, i: int) -> tuple[str, int] | None:
    """Argument of ``\\boxed`` at ``i``: a braced group, or (``\\boxed 42``) the next word."""
    while i < len(s) and s[i] in " \t":
        i += 1
    if i < len(s) and s[i] == "{":
        return _read_arg(s, i)
    m = re.compile(r"[^\s$]+").match(s, i)
    return (m.group(0), m.end()) if m else None


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` in ``text`` (nested
    braces handled, ``\\boxed 5`` accepted), or ``None``. An unterminated last box (truncated
    generation) is skipped in favour of the previous complete one."""
    for m in reversed(list(_BOXED_RE.finditer(text))):
        arg = _read_box(text, m.end())
        if arg is not None:
            return arg[0]
    return None


def _unwrap(s: str, commands: tuple[str, ...]) -> str:
    """Replace ``\\cmd{X}`` by ``X`` for each command (innermost handled by repetition)."""
    pattern = re.compile(r"\\(?:" + "|".join(commands) + r")\s*\{")
    for _ in range(64):  # bounded: each pass removes one command
        m = pattern.search(s)
        if m is None:
            break
        j = _match_brace(s, m.end() - 1)
        if j < 0:  # unbalanced: drop the command word, keep the rest
            s = s[: m.start()] + s[m.end() :]
            continue
        s = s[: m.start()] + s[m.end() : j] + s[j + 1 :]
    return s


def _simple(arg: str) -> bool:
    return re.fullmatch(r"-?[\w.]+|\\[A-Za-z]+(?:\{[^{}]*\})?", arg.strip()) is not None


def _replace_fracs(s: str) -> str:
    """``\\frac{a}{b}`` -> ``a/b`` (parenthesised when a part is compound), ``\\frac12`` too."""
    for _ in range(64):
        k = s.find("\\frac")
        if k < 0:
            break
        a = _read_arg(s, k + len("\\frac"))
        b = _read_arg(s, a[1]) if a is not None else None
        if a is None or b is None:
            s = s[:k] + s[k + len("\\frac") :]
            continue
        num, den = a[0].strip(), b[0].strip()
        num = num if _simple(num) else f"({num})"
        den = den if _simple(den) else f"({den})"
        s = s[:k] + f"{num}/{den}" + s[b[1] :]
    return s


def _clean_latex(s: str) -> str:
    """Typesetting removal shared by :func:`latex_to_text` and the last-number fallback."""
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\left\s*|\\right\s*", "", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°", "", s)
    s = _unwrap(s, ("text", "textbf", "textit", "mathrm", "mathbf", "mbox", "operatorname"))
    s = re.sub(r"\\[,;:! ]|~", " ", s)  # spacing commands
    s = s.replace("\\%", "%").replace("\\$", "$").replace("{,}", ",")
    s = re.sub(r"\\(?:displaystyle|quad|qquad)(?![A-Za-z])", " ", s)
    s = re.sub(r"\\sqrt\s*([0-9A-Za-z])", r"\\sqrt{\1}", s)  # \sqrt2 -> \sqrt{2}
    return _replace_fracs(s)


def latex_to_text(s: str) -> str:
    """Strip LaTeX typesetting from an answer string (see module docstring): the last
    ``\\boxed{}`` is unwrapped, then math delimiters and typesetting commands removed.
    Whitespace is collapsed but not removed, so unit words stay separable from the number."""
    s = s.translate(_UNICODE_MINUS).strip()
    boxed = extract_boxed(s)
    if boxed is not None:
        s = boxed
    s = _clean_latex(_strip_outer(s)).replace("$", "")
    return re.sub(r"\s+", " ", s).strip()


def _strip_outer(s: str) -> str:
    """Remove one layer of surrounding math delimiters / markdown emphasis / quotes."""
    s = s.strip()
    for left, right in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")):
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            inner = s[len(left) : len(s) - len(right)]
            if left != "$" or "$" not in inner:  # "$5 and $6" is currency, not math
                s = inner.strip()
                break
    s = s.strip("*_`").strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
        s = s[1:-1].strip()
    return s


# --------------------------------------------------------------------------------------------
# normalization


def normalize_math(text: str) -> str:
    """Canonical form of a LaTeX / math answer (numeric canonical form when it is a number)."""
    s = latex_to_text(text).rstrip(".;,").strip()
    # "x = 5" / "k=3": a lone variable assignment is the value.
    s = re.sub(r"^[A-Za-z]\s*=\s*(?=\S)", "", s)
    number = normalize_number(s)
    if number is not None:
        return number
    return re.sub(r"\s+", "", s)


def normalize_text(text: str) -> str:
    """Canonical form of a free-text answer: trimmed, single-spaced, no trailing period."""
    s = _strip_outer(text.translate(_UNICODE_MINUS))
    s = re.sub(r"\s+", " ", s).strip()
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    return s


def normalize_answer(text: str, family: str = "numeric") -> str:
    """Canonical form used to group votes and compare with a reference.

    Never returns ``None``: a numeric-family string that is not a number normalizes as math
    (so a reference like ``"0x3eb2"`` still compares with itself).
    """
    _check_family(family)
    if family == "numeric":
        number = normalize_number(latex_to_text(text))
        return number if number is not None else normalize_math(text)
    if family == "math":
        return normalize_math(text)
    return normalize_text(text)


def answers_equal(a: str | None, b: str | None, family: str = "numeric") -> bool:
    """True iff both are answers and their normalized forms are equal."""
    if a is None or b is None:
        return False
    return normalize_answer(a, family) == normalize_answer(b, family)


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown answer family {family!r}; expected one of {FAMILIES}")


# --------------------------------------------------------------------------------------------
# extraction

# In a math answer after "The answer is", words such as "since" start the justification.
_MATH_SPAN_END_RE = re.compile(r",?\s+(?:since|because|which|as|so|where|when|then)\b", re.I)


def _from_span(raw: str, family: str, *, boxed: bool) -> str | None:
    """Normalized answer in a raw answer span (box content or line after a marker), or None.

    numeric: the span as one number (with units), else its first number (after the last
    ``=`` of a marker line);
    math: the span as one number, else its normalized LaTeX;
    text: the span with typesetting removed.
    """
    if family == "text":
        return normalize_text(latex_to_text(raw) if boxed else raw) or None
    if not boxed:
        raw = raw.rstrip(".")
        if family == "math":
            raw = _MATH_SPAN_END_RE.split(raw, maxsplit=1)[0]
        elif "=" in raw:  # "Answer: 2 + 3 = 5", "Answer: x = 5": the value is after the last =
            raw = raw.rsplit("=", 1)[1]
    cleaned = latex_to_text(raw)
    number = normalize_number(cleaned)
    if number is not None:
        return number
    if family == "numeric":
        nums = find_numbers(cleaned)
        return nums[0] if nums else None
    return normalize_math(cleaned) or None


def _marker_span(text: str, start: int) -> str:
    """The first non-empty line after position ``start``, without leading markdown."""
    rest = text[start:].lstrip(" \t\r\n*_:")
    return rest.split("\n", 1)[0].strip()


def extract_answer(
    text: str, family: str = "numeric", *, fallback_last_number: bool = True
) -> str | None:
    """The final answer of a completion, normalized, or ``None`` if none is found.

    See the module docstring for the patterns tried and their order.
    """
    _check_family(family)
    if not text or not text.strip():
        return None
    text = text.translate(_UNICODE_MINUS)

    # 1. markers, the one starting last first
    markers = [(m.start(), True, m.end()) for m in _BOXED_RE.finditer(text)]
    markers += [(m.start(), False, m.end()) for m in _ANSWER_MARKER_RE.finditer(text)]
    for _start, boxed, end in sorted(markers, reverse=True):
        if boxed:
            arg = _read_box(text, end)
            if arg is None:  # unterminated box (truncated generation)
                continue
            cand = _from_span(arg[0], family, boxed=True)
        else:
            cand = _from_span(_marker_span(text, end), family, boxed=False)
        if cand is not None:
            return cand

    stripped = text.strip()
    if family == "text":
        # 3. a one-line completion is the answer; no number fallback for text
        if "\n" in stripped:
            return None
        return normalize_text(stripped) or None

    # 2. bold numbers
    for m in reversed(list(_BOLD_RE.finditer(text))):
        number = normalize_number(latex_to_text(m.group(1)))
        if number is not None:
            return number

    # 3. the completion is nothing but the answer
    number = normalize_number(latex_to_text(stripped))
    if number is not None:
        return number

    # 4. weak fallback
    if fallback_last_number:
        nums = find_numbers(_clean_latex(text))
        if nums:
            return nums[-1]
    return None
