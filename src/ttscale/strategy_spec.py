"""The one grammar of strategy spec strings, shared by `solve`, `eval`, `plan`, `cost` and the
server: `NAME`, `NAME@N` or `NAME@N/M`, case-insensitive.

    greedy          one greedy answer (`greedy@1` too)
    sample          one sampled answer (`sample@1` too)
    majority@N      N samples, majority vote (self-consistency); `sample@N`, `vote@N` alias it
    weighted@N      N samples, score-weighted vote
    bon@N           best of N by score; `best-of@N`, `best_of@N`, `bestofn@N` alias it
    beam@N/M        beam search, N beams, each kept beam forked M ways
    dvts@N/M        diverse verifier tree search, N/M subtrees of width M
    tree@N          KV-aware tree search over N branches
    adaptive@N      self-consistency that stops early, at most N samples

`sample@N` (N > 1) means N independent samples: that is what `majority@N` draws (the cost model
prices both alike, the planner estimates both from the same samples), so it is an alias, not a
strategy of its own. The grammar checks only the spec's shape; what a strategy needs beyond it
(beam search needs M to run, and N a multiple of M) is checked where it is built.

Sampling settings are part of a strategy: after a `:`, `t=` (temperature) and `p=` (top-p),
comma-separated, override the run's (`majority@16:t=0.5`, `bon@16:t=0.7,p=0.95`). The best
temperature depends on how samples are combined: a vote wants diverse but not wild samples.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from ttscale.errors import StrategySpecError


@dataclass(frozen=True)
class _Arity:
    n: str  # "none": no @N (N = 1) | "optional": @N defaults to 1 | "required"
    m: str  # "none" | "optional" | "required" (`beam@16` prices in `cost`, fails to build)
    example: str


_ARITY: dict[str, _Arity] = {
    "greedy": _Arity("none", "none", "greedy"),
    "sample": _Arity("optional", "none", "sample"),
    "majority": _Arity("required", "none", "majority@16"),
    "weighted": _Arity("required", "none", "weighted@16"),
    "bon": _Arity("required", "none", "bon@16"),
    "beam": _Arity("required", "optional", "beam@16/4"),
    "dvts": _Arity("required", "optional", "dvts@16/4"),
    "tree": _Arity("required", "none", "tree@16"),
    "adaptive": _Arity("required", "none", "adaptive@16"),
}
STRATEGY_NAMES: tuple[str, ...] = tuple(_ARITY)
ALIASES: dict[str, str] = {
    "best-of": "bon",
    "best_of": "bon",
    "bestofn": "bon",
    "vote": "majority",
}

_SPEC = re.compile(r"^(?P<name>[a-z][a-z_-]*)(?:@(?P<n>\d+)(?:/(?P<m>\d+))?)?$")


@dataclass(frozen=True)
class StrategySpec:
    """A parsed spec in canonical form: `name` is a canonical name (aliases resolved), `n`
    the samples / branches (1 for greedy and sample), `m` the width of beam@N/M and
    dvts@N/M (None when not given)."""

    name: str
    n: int = 1
    m: int | None = None
    temperature: float | None = None  # None: the run's
    top_p: float | None = None

    @property
    def canonical(self) -> str:
        """The one spelling of this spec (`SAMPLE@8` and `vote@8` -> `majority@8`)."""
        if _ARITY[self.name].n == "none" or (self.name == "sample" and self.n == 1):
            head = self.name
        else:
            head = f"{self.name}@{self.n}" + (f"/{self.m}" if self.m is not None else "")
        opts = [
            f"{k}={v:g}" for k, v in (("t", self.temperature), ("p", self.top_p)) if v is not None
        ]
        return head + (":" + ",".join(opts) if opts else "")

    @property
    def sampling(self) -> dict[str, float]:
        """The SamplingParams fields this spec sets."""
        out = {"temperature": self.temperature, "top_p": self.top_p}
        return {k: v for k, v in out.items() if v is not None}

    def __str__(self) -> str:
        return self.canonical


def parse_strategy_spec(spec: str) -> StrategySpec:
    """Parses a spec string; a malformed one raises StrategySpecError saying what to write
    (with a "did you mean" for a misspelt name)."""
    text = str(spec).strip().lower()
    head, colon, options = text.partition(":")
    sampling = _parse_options(spec, options) if colon else {}
    match = _SPEC.match(head)
    if not match:
        raise StrategySpecError(
            f"bad strategy spec {spec!r}: expected NAME, NAME@N or NAME@N/M (e.g. majority@16 "
            "or beam@16/4)"
        )
    name = ALIASES.get(match["name"], match["name"])
    if name not in _ARITY:
        raise StrategySpecError(_unknown_name(spec, match))
    n = int(match["n"]) if match["n"] is not None else None
    m = int(match["m"]) if match["m"] is not None else None
    arity = _ARITY[name]
    if (n is not None and n < 1) or (m is not None and m < 1):
        raise StrategySpecError(f"strategy {spec!r}: N and M must be >= 1")
    if arity.n == "none" and n not in (None, 1):
        raise StrategySpecError(f"strategy {spec!r}: {name} takes no @N (write {name})")
    if arity.n == "required" and n is None:
        raise StrategySpecError(f"strategy {spec!r}: {name} needs @N (e.g. {arity.example})")
    if m is not None and arity.m == "none":
        raise StrategySpecError(f"strategy {spec!r}: {name} takes no /M")
    if m is not None and n is not None and m > n:
        raise StrategySpecError(f"strategy {spec!r}: M must be in [1, N]")
    if name == "sample" and n is not None and n > 1:
        name = "majority"  # N independent samples: see the module docstring
    if name == "greedy" and sampling:
        raise StrategySpecError(f"strategy {spec!r}: greedy takes no sampling options")
    return StrategySpec(name, n or 1, m, **sampling)


_OPTION_KEYS = {"t": "temperature", "temperature": "temperature", "p": "top_p", "top_p": "top_p"}


def _parse_options(spec: str, options: str) -> dict[str, float]:
    """`t=0.5,p=0.9` -> {"temperature": 0.5, "top_p": 0.9}, checked like SamplingParams."""
    out: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, eq, value = item.partition("=")
        field = _OPTION_KEYS.get(key.strip())
        if not eq or field is None:
            raise StrategySpecError(
                f"strategy {spec!r}: bad option {item!r}; write t=<temperature> or p=<top_p> "
                "(e.g. majority@16:t=0.5)"
            )
        try:
            number = float(value)
        except ValueError:
            raise StrategySpecError(f"strategy {spec!r}: {key} must be a number") from None
        if field == "temperature" and not 0 <= number <= 100:
            raise StrategySpecError(f"strategy {spec!r}: t must be in [0, 100]")
        if field == "top_p" and not 0 < number <= 1:
            raise StrategySpecError(f"strategy {spec!r}: p must be in (0, 1]")
        out[field] = number
    if not out:
        raise StrategySpecError(f"strategy {spec!r}: nothing after ':' (e.g. majority@16:t=0.5)")
    return out


def _unknown_name(spec: str, match: re.Match[str]) -> str:
    written = match["name"]
    known = [*_ARITY, *ALIASES]
    close = difflib.get_close_matches(written, known, n=1, cutoff=0.6)
    message = f"unknown strategy {written!r} in {spec!r}; known: {', '.join(_ARITY)}"
    if close:
        rest = match.string[match.end("name") :]
        message += f"; did you mean {ALIASES.get(close[0], close[0])}{rest}?"
    return message


__all__ = ["ALIASES", "STRATEGY_NAMES", "StrategySpec", "parse_strategy_spec"]
