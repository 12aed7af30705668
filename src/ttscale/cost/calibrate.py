"""Measure this machine's roofline: matmul FLOP/s, memory bandwidth, memory size.

What is measured and why:
  * matmul FLOP/s, fp32 and bf16: square GEMMs of 1024-2048 (big enough to amortise the
    call and reach the BLAS kernel's steady state, small enough to take well under a second
    on a laptop), best of several reps. An n x n x n GEMM is 2*n^3 FLOPs (n^3 multiply-adds).
    This is what the engine's linear layers can reach, i.e. the practical peak, not the
    marketing one.
  * memory bandwidth: a reduction (sum) over an array much larger than the last-level cache
    (default 512 MiB), counting its bytes once (read only), and a copy between two such
    arrays, counting 2x its bytes (read + write; the write-allocate read some CPUs add is
    not counted, as in STREAM). The profile keeps the better of the two, the bandwidth the
    engine's weight and KV reads can achieve.
  * memory size: psutil if installed, else /proc/meminfo, else sysconf.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ttscale.cost.hardware import Hardware, local_profile_name

MiB = 2**20
DEFAULT_ARRAY_BYTES = 512 * MiB
GEMM_SIZES = (1024, 1536, 2048)


@dataclass(frozen=True)
class Calibration:
    """The raw figures of one calibration run (`to_hardware` makes the profile)."""

    name: str
    matmul_flops_fp32: float  # FLOP/s, best GEMM
    matmul_flops_bf16: float
    gemm_size_fp32: int  # n of the best n x n x n GEMM
    gemm_size_bf16: int
    read_bandwidth: float  # bytes/s, sum over a large array (bytes counted once)
    copy_bandwidth: float  # bytes/s, copy counted as read + write (2 x array bytes)
    array_bytes: int
    memory_bytes: int
    threads: int
    seconds: float  # wall time the measurement took
    date: str

    def __post_init__(self) -> None:
        for f in ("matmul_flops_fp32", "matmul_flops_bf16", "read_bandwidth", "copy_bandwidth"):
            if not getattr(self, f) > 0:
                raise ValueError(f"calibration measured {f}={getattr(self, f)!r}")

    @property
    def mem_bandwidth(self) -> float:
        return max(self.read_bandwidth, self.copy_bandwidth)

    def to_hardware(self) -> Hardware:
        return Hardware(
            name=self.name,
            peak_flops_fp32=self.matmul_flops_fp32,
            peak_flops_bf16=self.matmul_flops_bf16,
            mem_bandwidth=self.mem_bandwidth,
            memory_bytes=self.memory_bytes,
            source=(
                f"measured by ttscale calibrate on {self.date} ({self.threads} threads; "
                f"GEMM {self.gemm_size_fp32}^3 fp32, {self.gemm_size_bf16}^3 bf16; "
                f"bandwidth: best of sum/copy over {self.array_bytes // MiB} MiB)"
            ),
        )


def memory_size() -> int:
    """Physical memory in bytes."""
    try:
        import psutil  # optional

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024  # reported in kB (KiB)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _available_memory() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _gemm_flops(dtype: torch.dtype, budget: float) -> tuple[float, int]:
    """Best GEMM FLOP/s in `dtype` within about `budget` seconds, and the size that gave it."""
    deadline = time.perf_counter() + budget
    gen = torch.Generator().manual_seed(0)
    best_rate, best_n = 0.0, GEMM_SIZES[0]
    # Warm-up: the first call pays for thread-pool start-up and kernel selection.
    w = torch.randn(256, 256, generator=gen).to(dtype)
    torch.mm(w, w)
    for n in GEMM_SIZES:
        a = torch.randn(n, n, generator=gen).to(dtype)
        b = torch.randn(n, n, generator=gen).to(dtype)
        c = torch.empty(n, n, dtype=dtype)
        reps = 0
        size_deadline = time.perf_counter() + budget / len(GEMM_SIZES)
        # At least 2 reps per size (the first may still warm caches), more while time allows.
        while reps < 2 or time.perf_counter() < size_deadline:
            dt = _time(lambda a=a, b=b, c=c: torch.mm(a, b, out=c))
            reps += 1
            rate = 2 * n**3 / dt
            if rate > best_rate:
                best_rate, best_n = rate, n
            if reps >= 2 and time.perf_counter() + dt > size_deadline:
                break
        # Don't start a bigger GEMM (~3.4x the work of 1.5x the size) past the deadline.
        if time.perf_counter() + 3.4 * dt > deadline:
            break
    return best_rate, best_n


def _bandwidth(array_bytes: int, budget: float) -> tuple[float, float, int]:
    """(read bytes/s, copy bytes/s, array bytes) over arrays of about `array_bytes`, in about
    `budget` seconds, allocation included (at least 3 reps of each)."""
    deadline = time.perf_counter() + budget
    available = _available_memory()
    if available is not None:
        # Two arrays; leave room for the rest of the process and the system.
        array_bytes = min(array_bytes, available // 4)
    n = max(array_bytes // 4, 1 << 20)
    src = torch.empty(n, dtype=torch.float32)
    dst = torch.empty(n, dtype=torch.float32)
    # Touch every page first: the first write pays page faults, not bandwidth.
    src.fill_(1.0)
    dst.fill_(0.0)
    nbytes = src.numel() * src.element_size()
    read_bw = copy_bw = 0.0
    reps = 0
    while reps < 3 or time.perf_counter() < deadline:
        read_bw = max(read_bw, nbytes / _time(src.sum))  # reads nbytes
        copy_bw = max(copy_bw, 2 * nbytes / _time(lambda: dst.copy_(src)))  # reads + writes
        reps += 1
    return read_bw, copy_bw, nbytes


def measure(
    seconds: float = 3.0,
    num_threads: int | None = None,
    array_bytes: int = DEFAULT_ARRAY_BYTES,
) -> Calibration:
    """Run the measurements in about `seconds` (small budgets still do a minimum number of
    reps) with `num_threads` torch threads (default: torch's current)."""
    if not seconds > 0:
        raise ValueError(f"seconds={seconds!r} must be > 0")
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads={num_threads!r} must be >= 1")
    if array_bytes < 1:
        raise ValueError(f"array_bytes={array_bytes!r} must be >= 1")
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    t0 = time.perf_counter()
    try:
        threads = torch.get_num_threads()
        fp32, n32 = _gemm_flops(torch.float32, 0.35 * seconds)
        bf16, n16 = _gemm_flops(torch.bfloat16, 0.2 * seconds)
        # Bandwidth gets what is left (allocating and touching the arrays is part of it).
        left = seconds - (time.perf_counter() - t0)
        read_bw, copy_bw, nbytes = _bandwidth(array_bytes, max(left, 0.0))
    finally:
        torch.set_num_threads(old_threads)
    return Calibration(
        name=local_profile_name(),
        matmul_flops_fp32=fp32,
        matmul_flops_bf16=bf16,
        gemm_size_fp32=n32,
        gemm_size_bf16=n16,
        read_bandwidth=read_bw,
        copy_bandwidth=copy_bw,
        array_bytes=nbytes,
        memory_bytes=memory_size(),
        threads=threads,
        seconds=time.perf_counter() - t0,
        date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    )


def calibrate(
    seconds: float = 3.0,
    num_threads: int | None = None,
    array_bytes: int = DEFAULT_ARRAY_BYTES,
) -> Hardware:
    """Measure this machine and return its profile, named "local-<hostname>" (save it with
    `hardware.save_hardware`; `load_hardware("local")` finds it)."""
    return measure(seconds, num_threads, array_bytes).to_hardware()
