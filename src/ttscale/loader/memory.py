"""Handing the C heap's freed pages back to the operating system after a model loads."""

from __future__ import annotations

import ctypes
import sys
from functools import cache


@cache
def _malloc_trim():  # glibc's malloc_trim, or None
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc's; musl and others have none
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Returns free pages of the C heap to the OS (glibc's `malloc_trim(0)`; elsewhere a
    no-op).

    Why: loading converts every weight through temporaries of a few MiB (dequantized rows,
    requantized codes, the checkpoint's own copies). glibc serves allocations of that size
    from its heap once its mmap threshold has adapted to them, and keeps the heap's pages
    when they are freed, so a process that has loaded a model looks larger than what it
    holds (the embedded model: ~150 MiB of freed pages in a 550 MiB `[heap]` after `LLM()`,
    docs/PERF_RSS.md). Later allocations would reuse them, but resident memory is what
    `top`, a container's limit and a second process on the machine see.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
