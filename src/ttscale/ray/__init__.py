"""ttscale on a Ray cluster: engine actors for evaluation (`EnginePool`, `solve_many`,
`run_eval`) and engine replicas behind Ray Serve (`ttscale.ray.serving`). Nothing here imports
the `ray` library until it is used, and a missing Ray says which extra installs it.

Always imported as ``ttscale.ray``: inside this package ``import ray`` is the Ray library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ttscale.ray.cluster import RayClusterError, connect

if TYPE_CHECKING:
    from ttscale.ray.eval import run_eval
    from ttscale.ray.pool import EnginePool, solve_many
    from ttscale.ray.worker import EngineWorker, WorkerConfig

# Loaded on first use (PEP 562), as `ttscale.LLM` is, for speed: `ttscale eval --help` and
# `ttscale serve --help` import `ttscale.ray.cli`, which runs this file, and the engine behind
# these names pulls in torch.
_LAZY = {
    "EnginePool": "ttscale.ray.pool",
    "solve_many": "ttscale.ray.pool",
    "run_eval": "ttscale.ray.eval",
    "EngineWorker": "ttscale.ray.worker",
    "WorkerConfig": "ttscale.ray.worker",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ttscale.ray' has no attribute {name!r}")


__all__ = [
    "EnginePool",
    "EngineWorker",
    "RayClusterError",
    "WorkerConfig",
    "connect",
    "run_eval",
    "solve_many",
]
