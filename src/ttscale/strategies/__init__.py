"""Test-time scaling strategies, built from spec strings (`ttscale.strategy_spec`): greedy,
sample, majority@N, weighted@N, bon@N, beam@N/M, dvts@N/M, tree@N, adaptive@N."""

from __future__ import annotations

from ttscale.errors import StrategySpecError
from ttscale.strategies.adaptive import AdaptiveConsistency
from ttscale.strategies.base import Candidate, Query, SearchConfig, Strategy, StrategyResult
from ttscale.strategies.search import BeamSearch, DiverseVerifierTreeSearch
from ttscale.strategies.tree import KVAwareTreeSearch
from ttscale.strategies.voting import SampleThenSelect
from ttscale.strategy_spec import parse_strategy_spec

_SELECT = {"majority": "majority", "weighted": "weighted", "bon": "best"}


def make_strategy(spec: str) -> Strategy:
    """Builds a strategy from its spec string; a bad spec raises StrategySpecError (a
    ValueError) saying why. The strategy keeps `spec` as written: results and eval records
    are labelled with it."""
    parsed = parse_strategy_spec(spec)
    name, n, m, sampling = parsed.name, parsed.n, parsed.m, parsed.sampling
    if name in ("greedy", "sample"):
        return SampleThenSelect(spec, 1, "first", greedy=name == "greedy", sampling=sampling)
    if name in _SELECT:
        return SampleThenSelect(spec, n, _SELECT[name], sampling=sampling)
    if name == "adaptive":
        return AdaptiveConsistency(spec, n, sampling=sampling)
    if name == "tree":
        return KVAwareTreeSearch(spec, n, sampling=sampling)
    if m is None:  # the grammar allows beam@N for `ttscale cost`; a search needs its width
        raise StrategySpecError(f"strategy {spec!r}: {name} needs @N/M (e.g. {name}@16/4)")
    cls = BeamSearch if name == "beam" else DiverseVerifierTreeSearch
    return cls(spec, n, m, sampling=sampling)


__all__ = [
    "Candidate",
    "Query",
    "SearchConfig",
    "Strategy",
    "StrategyResult",
    "make_strategy",
]
