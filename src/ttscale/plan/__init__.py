"""Compute-optimal test-time scaling within a budget (Snell et al. 2024: the best use of
inference compute depends on how hard a problem is for the model, measured by its pass rate).

1. :mod:`~ttscale.plan.pilot_run`: ``n`` samples per pilot problem, each judged by the task's
   oracle (used to plan, never to pick an answer); other strategies run directly.
2. :mod:`~ttscale.plan.curves` and :mod:`~ttscale.plan.bins`: problems binned by pass rate;
   per bin, each candidate's maj@k (exact over k-subsets, plug-in beyond ``n``), pass@k
   ceiling, cost (:mod:`~ttscale.plan.costs`) and where more samples saturate.
3. :mod:`~ttscale.plan.knapsack`: one candidate per bin, max accuracy within the budget.
4. :mod:`~ttscale.plan.probe`: new problems are routed by the agreement of a first wave of
   ``m`` samples, which a ``majority@k`` choice then continues; priced with its routing errors.
5. :mod:`~ttscale.plan.planner`: :func:`make_plan` prices probe, uniform and oracle routing
   and keeps the best; :mod:`~ttscale.plan.validation` checks a plan on held-out problems and
   :mod:`~ttscale.plan.report` tabulates both.

See docs/PLANNER.md for the method and its assumptions.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Imported now: the function has its module's name, and a lazily loaded name would be
# shadowed by the submodule once anything imports ttscale.plan.knapsack (it is light).
from ttscale.plan.knapsack import knapsack

if TYPE_CHECKING:
    from ttscale.plan.bins import BinPlan, Option, difficulty_thresholds
    from ttscale.plan.costs import TokenTimeModel
    from ttscale.plan.curves import DEFAULT_EPSILON, PlanCandidate, saturation_n
    from ttscale.plan.pilot_run import Pilot, PilotProblem, pilot
    from ttscale.plan.planner import DEFAULT_CANDIDATES, InfeasibleBudget, Plan, make_plan
    from ttscale.plan.probe import Probe
    from ttscale.plan.report import plan_table, validation_table
    from ttscale.plan.validation import BinValidation, Validation, validate


# Where each public name lives: loaded on first use (PEP 562), for speed as in
# ttscale/__init__.py: the planner imports the strategies, scipy and torch, and `ttscale plan
# --help` or a bad argument must answer without them.
_HOME = {
    "BinPlan": "ttscale.plan.bins",
    "Option": "ttscale.plan.bins",
    "difficulty_thresholds": "ttscale.plan.bins",
    "TokenTimeModel": "ttscale.plan.costs",
    "DEFAULT_EPSILON": "ttscale.plan.curves",
    "PlanCandidate": "ttscale.plan.curves",
    "saturation_n": "ttscale.plan.curves",
    "Pilot": "ttscale.plan.pilot_run",
    "PilotProblem": "ttscale.plan.pilot_run",
    "pilot": "ttscale.plan.pilot_run",
    "DEFAULT_CANDIDATES": "ttscale.plan.planner",
    "InfeasibleBudget": "ttscale.plan.planner",
    "Plan": "ttscale.plan.planner",
    "make_plan": "ttscale.plan.planner",
    "Probe": "ttscale.plan.probe",
    "plan_table": "ttscale.plan.report",
    "validation_table": "ttscale.plan.report",
    "BinValidation": "ttscale.plan.validation",
    "Validation": "ttscale.plan.validation",
    "validate": "ttscale.plan.validation",
}

__all__ = [
    "DEFAULT_CANDIDATES",
    "DEFAULT_EPSILON",
    "BinPlan",
    "BinValidation",
    "InfeasibleBudget",
    "Option",
    "Pilot",
    "PilotProblem",
    "Plan",
    "PlanCandidate",
    "Probe",
    "TokenTimeModel",
    "Validation",
    "difficulty_thresholds",
    "knapsack",
    "make_plan",
    "pilot",
    "plan_table",
    "saturation_n",
    "validate",
    "validation_table",
]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'ttscale.plan' has no attribute {name!r}")
