"""The cost of a run as the engine reports it in a request's usage."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunCost:
    """Accumulated cost of a request (or of the whole engine)."""

    flops: float = 0.0
    bytes: float = 0.0
    efflops: float | None = None  # FLOPs + I * bytes (Kinetics); None without a hardware profile
    roofline_time: float | None = None  # max(FLOPs / peak, bytes / bandwidth), summed per step
    measured_time: float = 0.0  # model time actually spent on its share of steps

    @property
    def utilization(self) -> float | None:
        """roofline / measured: the fraction of the hardware limit achieved."""
        if self.roofline_time is None or self.measured_time <= 0:
            return None
        return self.roofline_time / self.measured_time

    def add(self, other: RunCost) -> None:
        self.flops += other.flops
        self.bytes += other.bytes
        self.measured_time += other.measured_time
        if other.efflops is not None:
            self.efflops = (self.efflops or 0.0) + other.efflops
        if other.roofline_time is not None:
            self.roofline_time = (self.roofline_time or 0.0) + other.roofline_time

    def to_dict(self) -> dict[str, float | None]:
        return {
            "flops": self.flops,
            "bytes": self.bytes,
            "efflops": self.efflops,
            "roofline_time": self.roofline_time,
            "measured_time": self.measured_time,
            "utilization": self.utilization,
        }
