"""ttscale on a Ray cluster: engine actors for evaluation (`EnginePool`, `solve_many`,
`run_eval`) and engine replicas behind Ray Serve (`ttscale.ray.serving`). Nothing here imports
the `ray` library until it is used, and a missing Ray says which extra installs it.

Always imported as ``ttscale.ray``: inside this package ``import ray`` is the Ray library.
"""

from ttscale.ray.cluster import RayClusterError, connect
from ttscale.ray.eval import run_eval
from ttscale.ray.pool import EnginePool, solve_many
from ttscale.ray.worker import EngineWorker, WorkerConfig

__all__ = [
    "EnginePool",
    "EngineWorker",
    "RayClusterError",
    "WorkerConfig",
    "connect",
    "run_eval",
    "solve_many",
]
