"""What the HTTP server is configured with: `ServerConfig`, and the model names it answers to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerConfig:
    model_names: tuple[str, ...] = ("ttscale",)  # first: the id replies report
    api_key: str | None = None  # None: no authentication
    max_waiting: int = 256  # accepted requests not yet running; beyond: 429
    max_n: int = 64  # samples per request: n, a strategy's N and M, prompts x n
    max_prompts: int = 64  # prompts in one completions request
    retry_after_s: int = 1
    max_body_bytes: int = 4 * 2**20  # larger bodies: 413 before they are read
    # Worst-case KV that running strategy jobs may reserve together, as a fraction of the
    # pool: the rest stays for ordinary requests, so a big search cannot starve them.
    strategy_kv_share: float = 0.5

    def __post_init__(self) -> None:
        if not self.model_names:
            raise ValueError("model_names must not be empty")
        if self.max_waiting < 1 or self.max_n < 1 or self.max_prompts < 1:
            raise ValueError("max_waiting, max_n and max_prompts must be >= 1")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be >= 1024")
        if not 0 < self.strategy_kv_share <= 1:
            raise ValueError("strategy_kv_share must be in (0, 1]")


def model_names(source: str, served_name: str | None = None) -> tuple[str, ...]:
    """Names clients may use: the served name if given, then the path's basename (and stem)."""
    path = Path(source)
    names = [served_name] if served_name else []
    names += [path.name, path.stem]
    return tuple(dict.fromkeys(n for n in names if n))


__all__ = ["ServerConfig", "model_names"]
