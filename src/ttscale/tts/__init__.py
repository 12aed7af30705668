"""The lowest test-time-scaling layer: what strategies and scorers share.

`Session` is one problem's branches on a shared engine, `Wait` what a strategy or scorer
generator yields, `drive` the loop that steps one engine for many of them; `majority_vote`
counts answers' votes for the voting strategies and for evaluation's maj@k.
"""

from __future__ import annotations

from ttscale.tts.session import (
    Branch,
    Session,
    SessionStats,
    StrategyGen,
    Wait,
    drive,
    run_prompts,
)
from ttscale.tts.votes import majority_vote

__all__ = [
    "Branch",
    "Session",
    "SessionStats",
    "StrategyGen",
    "Wait",
    "drive",
    "majority_vote",
    "run_prompts",
]
