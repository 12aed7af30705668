"""Hardware profiles and the roofline.

A profile is what the roofline needs: peak compute per dtype, memory bandwidth, memory size.
Presets are data-sheet figures (dense, i.e. without 2:4 structured sparsity, which the data
sheets headline at twice the dense rate); the profile of this machine comes from
`ttscale calibrate` (see calibrate.py) and is stored as JSON in
`~/.cache/ttscale/hardware/<name>.json`.

Roofline: a piece of work with F FLOPs and B bytes takes at least
    t = max(F / peak_flops, B / mem_bandwidth)
and is compute-bound when the first term is larger, memory-bound otherwise.
"""

from __future__ import annotations

import json
import math
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ttscale.cost.pricing import StepCost

Bound = Literal["compute", "memory"]

DEFAULT_PROFILE_DIR = Path("~/.cache/ttscale/hardware")
PROFILE_FORMAT = 1

# Bytes per element of the dtypes the cost model knows. fp16 runs at the bf16 rate on every
# preset (the tensor cores do both at the same speed), so profiles store fp32 and bf16 only.
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}
_DTYPE_ALIASES = {
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
    "f32": "fp32",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "f16": "fp16",
}


def normalize_dtype(dtype: str) -> str:
    """Canonical dtype name: "fp32", "bf16" or "fp16"."""
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPE_BYTES)}")
    return _DTYPE_ALIASES[key]


@dataclass(frozen=True)
class Hardware:
    """Peak compute, memory bandwidth and memory size of one accelerator (or CPU)."""

    name: str
    peak_flops_fp32: float  # FLOP/s, fp32 (non-tensor-core on GPUs)
    peak_flops_bf16: float  # FLOP/s, bf16/fp16 dense (tensor cores on GPUs)
    mem_bandwidth: float  # bytes/s
    memory_bytes: float  # bytes
    source: str = ""  # where the figures come from (data sheet, or calibration run)

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"invalid hardware name {self.name!r}")
        for f in ("peak_flops_fp32", "peak_flops_bf16", "mem_bandwidth", "memory_bytes"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"invalid hardware {f}={value!r}: must be a number")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"invalid hardware {f}={value!r}: must be finite and > 0")
            object.__setattr__(self, f, float(value))

    def peak_flops(self, dtype: str = "bf16") -> float:
        """Peak FLOP/s for matmuls in `dtype` (fp16 at the bf16 rate)."""
        return self.peak_flops_fp32 if normalize_dtype(dtype) == "fp32" else self.peak_flops_bf16

    def intensity(self, dtype: str = "bf16") -> float:
        """Ridge point I = peak_flops / mem_bandwidth, FLOPs per byte: work with a higher
        arithmetic intensity is compute-bound. Kinetics' eFLOPs charge each byte I FLOPs."""
        return self.peak_flops(dtype) / self.mem_bandwidth

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "name": self.name,
            "peak_flops": {"fp32": self.peak_flops_fp32, "bf16": self.peak_flops_bf16},
            "mem_bandwidth": self.mem_bandwidth,
            "memory_bytes": self.memory_bytes,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hardware:
        try:
            peak = data["peak_flops"]
            return cls(
                name=data["name"],
                peak_flops_fp32=peak["fp32"],
                peak_flops_bf16=peak["bf16"],
                mem_bandwidth=data["mem_bandwidth"],
                memory_bytes=data["memory_bytes"],
                source=data.get("source", ""),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"invalid hardware profile: missing or bad field {e}") from None


GiB = 2**30

# Data-sheet figures. Memory sizes: the data sheets' "80GB" etc. are binary (an H100 80GB
# shows 81559 MiB in nvidia-smi), so GiB is used; bandwidths are decimal (TB/s = 1e12 B/s).
PRESETS: dict[str, Hardware] = {
    h.name: h
    for h in (
        Hardware(
            name="h100-sxm",
            peak_flops_fp32=67e12,
            peak_flops_bf16=989e12,  # 1979 with sparsity
            mem_bandwidth=3.35e12,
            memory_bytes=80 * GiB,
            source="NVIDIA H100 Tensor Core GPU data sheet, H100 SXM: FP32 67 TFLOPS, "
            "BF16 Tensor Core 989 TFLOPS dense (1,979 sparse), 80 GB HBM3 at 3.35 TB/s",
        ),
        Hardware(
            name="h200",
            peak_flops_fp32=67e12,
            peak_flops_bf16=989e12,
            mem_bandwidth=4.8e12,
            memory_bytes=141 * GiB,
            source="NVIDIA H200 Tensor Core GPU data sheet, H200 SXM: FP32 67 TFLOPS, "
            "BF16 Tensor Core 989 TFLOPS dense (1,979 sparse), 141 GB HBM3e at 4.8 TB/s",
        ),
        Hardware(
            name="a100-80gb-sxm",
            peak_flops_fp32=19.5e12,
            peak_flops_bf16=312e12,  # 624 with sparsity
            mem_bandwidth=2.039e12,
            memory_bytes=80 * GiB,
            source="NVIDIA A100 Tensor Core GPU data sheet, A100 80GB SXM: FP32 19.5 TFLOPS, "
            "BF16 Tensor Core 312 TFLOPS dense (624 sparse), 80 GB HBM2e at 2,039 GB/s",
        ),
        Hardware(
            name="l4",
            peak_flops_fp32=30.3e12,
            peak_flops_bf16=121e12,  # data sheet headlines 242 with sparsity
            mem_bandwidth=300e9,
            memory_bytes=24 * GiB,
            source="NVIDIA L4 Tensor Core GPU data sheet: FP32 30.3 TFLOPS, BF16 Tensor Core "
            "242 TFLOPS with sparsity = 121 dense, 24 GB GDDR6 at 300 GB/s",
        ),
    )
}
# Short names users type.
PRESET_ALIASES = {
    "h100": "h100-sxm",
    "h100-sxm5": "h100-sxm",
    "h200-sxm": "h200",
    "a100": "a100-80gb-sxm",
    "a100-80gb": "a100-80gb-sxm",
    "a100-sxm": "a100-80gb-sxm",
}


# ------------------------------------------------------------------------------ roofline
def compute_time(cost: StepCost, hw: Hardware, dtype: str = "bf16") -> float:
    """Seconds at peak compute: FLOPs / peak_flops."""
    return cost.flops / hw.peak_flops(dtype)


def memory_time(cost: StepCost, hw: Hardware) -> float:
    """Seconds at full bandwidth: bytes / mem_bandwidth."""
    return cost.bytes / hw.mem_bandwidth


def roofline_time(cost: StepCost, hw: Hardware, dtype: str = "bf16") -> float:
    """Lower bound on the time of the work: max(FLOPs / peak, bytes / bandwidth).

    Apply it per step, not to a sum of steps: a run whose steps are each memory-bound does
    not get faster because its FLOPs and bytes, summed, look balanced.
    """
    return max(compute_time(cost, hw, dtype), memory_time(cost, hw))


def bound(cost: StepCost, hw: Hardware, dtype: str = "bf16") -> Bound:
    """ "compute" when FLOPs / peak >= bytes / bandwidth, else "memory"."""
    return "compute" if compute_time(cost, hw, dtype) >= memory_time(cost, hw) else "memory"


def efflops(cost: StepCost, hw: Hardware, dtype: str = "bf16") -> float:
    """Kinetics' eFLOPs (Sadhukhan et al., 2025): FLOPs + I * bytes, I = peak / bandwidth.
    eFLOPs / peak_flops = FLOPs / peak + bytes / bandwidth, the time if compute and traffic
    did not overlap: between 1x and 2x the roofline time."""
    return cost.efflops(hw.intensity(dtype))


# ------------------------------------------------------------------------------ profiles
def profile_dir(directory: str | Path | None = None) -> Path:
    return Path(directory if directory is not None else DEFAULT_PROFILE_DIR).expanduser()


def local_profile_name(hostname: str | None = None) -> str:
    """The name `ttscale calibrate` gives this machine's profile: "local-<hostname>"."""
    host = hostname if hostname is not None else socket.gethostname()
    host = re.sub(r"[^A-Za-z0-9._-]+", "_", host.split(".")[0]) or "unknown"
    return f"local-{host}"


def save_hardware(hw: Hardware, directory: str | Path | None = None) -> Path:
    """Write `hw` to `<directory>/<name>.json` (default ~/.cache/ttscale/hardware)."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", hw.name) or hw.name.startswith("."):
        raise ValueError(f"hardware name {hw.name!r} cannot be a file name")
    return write_profile(profile_dir(directory) / f"{hw.name}.json", hw.to_dict())


def write_profile(path: Path, data: dict[str, Any]) -> Path:
    """Writes `data` as JSON to `path` atomically: a reader never sees half a profile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def read_profile(path: str | Path, what: str) -> dict[str, Any]:
    """The JSON object in `path`; a ValueError naming `what` it should have been otherwise."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not a JSON {what} ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: not a JSON {what}")
    return data


def read_hardware(path: str | Path) -> Hardware:
    """Load a profile from a JSON file."""
    return Hardware.from_dict(read_profile(path, "hardware profile"))


# Step-time calibrations (steptime.py) live in the same folder as `<machine>.steps.*.json`.
STEP_PROFILE_MARK = ".steps."


def saved_profiles(directory: str | Path | None = None) -> list[str]:
    d = profile_dir(directory)
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.json") if STEP_PROFILE_MARK not in p.name)


def available_hardware(directory: str | Path | None = None) -> list[str]:
    return [*PRESETS, *PRESET_ALIASES, "local", *saved_profiles(directory)]


def load_hardware(name_or_path: str | Path, directory: str | Path | None = None) -> Hardware:
    """Find a profile by preset name (or alias), "local" (this machine's calibrated profile),
    a saved profile's name, or the path of a JSON profile file."""
    raw = str(name_or_path).strip()
    key = raw.lower()
    if key in PRESETS or key in PRESET_ALIASES:
        return PRESETS[PRESET_ALIASES.get(key, key)]
    d = profile_dir(directory)
    if key == "local":
        path = d / f"{local_profile_name()}.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no calibrated profile for this machine ({path}): run `ttscale calibrate` first"
            )
        return read_hardware(path)
    if re.fullmatch(r"[A-Za-z0-9._-]+", raw) and (d / f"{raw}.json").is_file():
        return read_hardware(d / f"{raw}.json")
    p = Path(raw).expanduser()
    if p.is_file():
        return read_hardware(p)
    raise ValueError(
        f"unknown hardware {raw!r}: use a preset ({', '.join([*PRESETS, *PRESET_ALIASES])}), "
        f"'local', a saved profile in {d}, or a JSON profile file"
    )
