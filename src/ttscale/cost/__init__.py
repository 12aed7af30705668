"""Cost model: every run priced in FLOPs and bytes and held against the hardware roofline.

See model.py for the formulas (after Kinetics, Sadhukhan et al., 2025), hardware.py for the
roofline and profiles, analytic.py for the what-if mode, calibrate.py for measuring this
machine (`from ttscale.cost.calibrate import calibrate`; kept out of here as it needs torch).
"""

from ttscale.cost.analytic import (
    Estimate,
    PhaseEstimate,
    RunSpec,
    Strategy,
    estimate,
    estimate_by_steps,
    parse_strategy,
    run_steps,
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
from ttscale.cost.model import KNOWN_CONFIGS, ModelShape, StepCost, StepShape, load_shape, step_cost

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
    "Strategy",
    "bound",
    "efflops",
    "estimate",
    "estimate_by_steps",
    "load_hardware",
    "load_shape",
    "parse_strategy",
    "roofline_time",
    "run_steps",
    "save_hardware",
    "step_cost",
]
