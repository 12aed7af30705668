"""Admission control by resources: what a request or a strategy job may hold in the KV pool at
worst, checked before anything reaches the engine.

The engine survives an over-full pool (it preempts and recomputes), but a request whose own
samples cannot all fit at once never finishes, and one huge job would hold the pool against
everyone else. So every request states its worst case up front: prompt blocks, shared by its
samples, plus each live sample's generated tokens, plus one copy-on-write block per sample
for the prompt's partial last block (`kv_blocks`). A request whose worst case exceeds the
pool, or a strategy job whose worst case exceeds its share of the pool, is refused with a
400 saying what would fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from ttscale.errors import StrategySpecError
from ttscale.server.errors import APIError
from ttscale.strategies.base import SearchConfig
from ttscale.strategy_spec import parse_strategy_spec


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def kv_blocks(prompt_len: int, n: int, gen: int, block_size: int) -> int:
    """Worst-case KV blocks of `n` samples of `gen` tokens each after a `prompt_len` prompt:
    the prompt once (samples fork it), then per sample its own blocks (the partial prompt
    block is copied on write, hence the +1)."""
    if n == 1:
        return _ceil_div(prompt_len + gen, block_size)
    return _ceil_div(prompt_len, block_size) + n * (_ceil_div(gen, block_size) + 1)


def max_gen_that_fits(prompt_len: int, n: int, blocks: int, block_size: int) -> int:
    """The largest per-sample generation length whose worst case fits in `blocks` (0 if none)."""
    if n == 1:
        return max(0, blocks * block_size - prompt_len)
    per_sample = (blocks - _ceil_div(prompt_len, block_size)) // n - 1
    return max(0, per_sample * block_size)


@dataclass(frozen=True)
class Pool:
    """The KV pool's fixed size (read once from `LLMEngine.kv_stats()`)."""

    num_blocks: int
    block_size: int

    def share(self, fraction: float) -> int:
        return max(1, int(self.num_blocks * fraction))


@dataclass(frozen=True)
class Footprint:
    """A request's worst case: `width` live samples of up to `gen` tokens after the prompt."""

    prompt_len: int
    width: int
    gen: int

    def blocks(self, block_size: int) -> int:
        return kv_blocks(self.prompt_len, self.width, self.gen, block_size)


def check_fits(fp: Footprint, pool_blocks: int, block_size: int, what: str, param: str) -> int:
    """The footprint's worst-case blocks, or a 400 naming `param` and saying what fits."""
    need = fp.blocks(block_size)
    if need <= pool_blocks:
        return need
    fits = max_gen_that_fits(fp.prompt_len, fp.width, pool_blocks, block_size)
    hint = (
        f"at most {fits} tokens per sample fit with this prompt"
        if fits > 0
        else "this prompt leaves no room for that many samples"
    )
    raise APIError(
        400,
        f"{what} could hold {need} KV blocks at worst ({fp.width} x {fp.gen} generated tokens "
        f"after a {fp.prompt_len}-token prompt), more than the {pool_blocks} blocks "
        f"({pool_blocks * block_size} tokens) available to it: {hint}; lower max_tokens or "
        "the number of samples",
        param=param,
        code="kv_cache_exceeded",
    )


def strategy_footprint(
    spec: str,
    prompt_len: int,
    max_tokens: int,
    max_model_len: int,
    max_n: int,
    search: SearchConfig | None = None,
) -> Footprint:
    """Worst case of a strategy spec: N/M checked against `max_n` (400 naming
    `ttscale.strategy`), at most N branches alive at once, each up to its generation bound.

    Sampling strategies (majority, weighted, bon, adaptive) draw N samples of `max_tokens`.
    Step-level searches (beam, dvts, tree) keep N branches; a branch grows one step of at
    most `min(max_step_tokens, max_tokens)` tokens per level, stops once it has spent
    `max_tokens` (so it may overshoot by one step less a token) or at `max_depth` levels.
    """
    try:
        parsed = parse_strategy_spec(spec)
    except StrategySpecError as e:
        raise APIError(400, str(e), param="ttscale.strategy") from None
    for name, value in (("N", parsed.n), ("M", parsed.m)):
        if value is not None and value > max_n:
            raise APIError(
                400,
                f"strategy {spec!r}: {name}={value} exceeds this server's limit of {max_n} "
                "samples per request (--max-n)",
                param="ttscale.strategy",
            )
    gen = max_tokens
    if parsed.name in ("beam", "dvts", "tree"):
        s = search or SearchConfig()
        step = min(s.max_step_tokens, max_tokens)
        gen = min(max_tokens + step - 1, s.max_depth * step)
    gen = min(gen, max_model_len - prompt_len)
    return Footprint(prompt_len, parsed.n, gen)


def largest_max_tokens(
    spec: str,
    prompt_len: int,
    upper: int,
    max_model_len: int,
    max_n: int,
    pool: Pool,
    blocks: int,
) -> int:
    """The largest max_tokens <= `upper` whose strategy footprint fits `blocks` (at least 1:
    the caller's check then says what fits). The footprint grows with max_tokens."""

    def fits(mt: int) -> bool:
        fp = strategy_footprint(spec, prompt_len, mt, max_model_len, max_n)
        return fp.blocks(pool.block_size) <= blocks

    if upper <= 1 or fits(upper):
        return max(1, upper)
    lo, hi = 1, upper - 1  # the answer is in [lo, hi], or 1 if nothing fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


__all__ = [
    "Footprint",
    "Pool",
    "check_fits",
    "kv_blocks",
    "largest_max_tokens",
    "max_gen_that_fits",
    "strategy_footprint",
]
