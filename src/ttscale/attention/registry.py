"""Attention backends by name. A backend is a class built once per step from
`(KVCache, AttentionMetadata, layer specs)` and called by every layer (see base.py)."""

from __future__ import annotations

from ttscale.attention.base import PagedAttentionBase
from ttscale.attention.paged import PagedAttention
from ttscale.attention.reference import ReferencePagedAttention

_BACKENDS: dict[str, type[PagedAttentionBase]] = {
    "fast": PagedAttention,
    "reference": ReferencePagedAttention,
}


def register_backend(name: str, cls: type[PagedAttentionBase]) -> None:
    if name in _BACKENDS:
        raise ValueError(f"attention backend {name!r} is already registered")
    _BACKENDS[name] = cls


def get_backend(name: str) -> type[PagedAttentionBase]:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"attention must be one of {sorted(_BACKENDS)}, not {name!r}") from None


def backend_names() -> list[str]:
    return sorted(_BACKENDS)
