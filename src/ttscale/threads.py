"""Torch CPU threading helpers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Runs torch single-threaded for a block of many small memory-bound ops (dequantizing,
    weight packing): an OpenMP barrier per op costs more than the op, many times over on a
    busy machine (measurements: docs/BENCHMARKS.md, "Measurements behind code choices")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
