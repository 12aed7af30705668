"""Cost model: every run priced in FLOPs and bytes and held against the hardware roofline.

Pure: shapes in, FLOPs / bytes / seconds out. shapes.py holds the descriptions (`ModelShape`
from the one `ModelConfig`, the engine's `StepShape`), pricing.py the formulas (after Kinetics,
Sadhukhan et al., 2025), hardware.py the roofline and profiles, steptime.py the fitted
step-time model, analytic.py the what-if mode, meter.py the engine's per-step bill, and
calibrate.py measures this machine's roofline with plain matmuls (`from ttscale.cost.calibrate
import calibrate`; kept out of here as it times torch). Calibration that drives the engine
lives above it, in `ttscale.calibration`.
"""

from ttscale.cost.analytic import (
    Estimate,
    PhaseEstimate,
    RunSpec,
    StrategyCostProfile,
    estimate,
    estimate_by_steps,
    run_steps,
    strategy_cost_profile,
)
from ttscale.cost.hardware import (
    PRESETS,
    Hardware,
    bound,
    efflops,
    load_hardware,
    roofline_time,
    save_hardware,
)
from ttscale.cost.pricing import StepCost, step_cost
from ttscale.cost.shapes import KNOWN_CONFIGS, ModelShape, StepShape, load_shape

__all__ = [
    "KNOWN_CONFIGS",
    "PRESETS",
    "Estimate",
    "Hardware",
    "ModelShape",
    "PhaseEstimate",
    "RunSpec",
    "StepCost",
    "StepShape",
    "StrategyCostProfile",
    "bound",
    "efflops",
    "estimate",
    "estimate_by_steps",
    "load_hardware",
    "load_shape",
    "roofline_time",
    "run_steps",
    "save_hardware",
    "step_cost",
    "strategy_cost_profile",
]
