"""Test-time scaling strategies, named by spec strings: greedy, sample, majority@N, weighted@N,
bon@N, beam@N/M, dvts@N/M, tree@N, adaptive@N."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ttscale.strategies.base import Strategy

STRATEGY_NAMES = (
    "greedy",
    "sample",
    "majority",
    "weighted",
    "bon",
    "beam",
    "dvts",
    "tree",
    "adaptive",
)


def make_strategy(spec: str) -> Strategy:
    """Builds a strategy from its spec string; a bad spec raises ValueError saying why."""
    from ttscale.strategies.adaptive import AdaptiveConsistency
    from ttscale.strategies.base import parse_spec
    from ttscale.strategies.search import BeamSearch, DiverseVerifierTreeSearch
    from ttscale.strategies.tree import KVAwareTreeSearch
    from ttscale.strategies.voting import SampleThenSelect

    name, n, m = parse_spec(spec)
    if name in ("greedy", "sample"):
        if n not in (None, 1) or m is not None:
            raise ValueError(f"{spec}: {name} takes no @N")
        return SampleThenSelect(spec, 1, "first", greedy=name == "greedy")
    if name in ("majority", "weighted", "bon", "adaptive", "tree"):
        if n is None or m is not None:
            raise ValueError(f"{spec}: {name} needs @N (e.g. {name}@16)")
        if name == "adaptive":
            return AdaptiveConsistency(spec, n)
        if name == "tree":
            return KVAwareTreeSearch(spec, n)
        select = {"majority": "majority", "weighted": "weighted", "bon": "best"}[name]
        return SampleThenSelect(spec, n, select)
    if name in ("beam", "dvts"):
        if n is None or m is None:
            raise ValueError(f"{spec}: {name} needs @N/M (e.g. {name}@16/4)")
        cls = BeamSearch if name == "beam" else DiverseVerifierTreeSearch
        return cls(spec, n, m)
    raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGY_NAMES)}")


# Lazy exports (PEP 562): scorers import strategies.session, and strategies import scorers.
_EXPORTS = {
    "Branch": "session",
    "Session": "session",
    "Wait": "session",
    "drive": "session",
    "Candidate": "base",
    "Query": "base",
    "SearchConfig": "base",
    "Strategy": "base",
    "StrategyResult": "base",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"ttscale.strategies.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'ttscale.strategies' has no attribute {name!r}")


__all__ = [
    "STRATEGY_NAMES",
    "Branch",
    "Candidate",
    "Query",
    "SearchConfig",
    "Session",
    "Strategy",
    "StrategyResult",
    "Wait",
    "drive",
    "make_strategy",
]
