"""Torch CPU threading helpers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Runs torch single-threaded for a block of many small memory-bound ops (dequantizing,
    weight packing): an OpenMP barrier per op made them 7-25x slower on a busy 2-core machine
    (GGUF dequantization 0.6 s -> 11-17 s; weight packing 0.7 s -> 5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
