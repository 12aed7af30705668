"""What the HTTP server is configured with: `ServerConfig`, and the model names it answers to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerConfig:
    model_names: tuple[str, ...] = ("ttscale",)  # first: the id replies report
    api_key: str | None = None  # None: no authentication
    max_waiting: int = 256  # accepted requests not yet running; beyond: 429
    max_n: int = 64
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if not self.model_names:
            raise ValueError("model_names must not be empty")
        if self.max_waiting < 1 or self.max_n < 1:
            raise ValueError("max_waiting and max_n must be >= 1")


def model_names(source: str, served_name: str | None = None) -> tuple[str, ...]:
    """Names clients may use: the served name if given, then the path's basename (and stem)."""
    path = Path(source)
    names = [served_name] if served_name else []
    names += [path.name, path.stem]
    return tuple(dict.fromkeys(n for n in names if n))


__all__ = ["ServerConfig", "model_names"]
