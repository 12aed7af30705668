"""`ttscale ui --runs DIR`: the dashboard without a model, for eval folders on disk.

The same static pages as `ttscale serve`'s `/ui`; the engine endpoint answers `offline`, so
the Engine and Playground tabs say there is no engine here and the Runs tab works as usual.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI

from ttscale.ui.pages import pages_router
from ttscale.ui.runs import runs_router


def create_offline_app(runs_dir: Path) -> FastAPI:
    if not runs_dir.is_dir():
        raise ValueError(f"--runs {runs_dir}: no such folder (an `ttscale eval --out` parent)")
    app = FastAPI(title="ttscale dashboard (offline)", version="0.1.0")
    app.state.ui_runs_dir = runs_dir
    app.include_router(pages_router())
    app.include_router(runs_router())

    @app.get("/v1/ttscale/engine")
    async def engine() -> dict[str, Any]:
        return {"offline": True, "runs_dir": str(runs_dir)}

    return app


def serve_offline(runs_dir: Path, host: str = "127.0.0.1", port: int = 8001) -> None:
    import uvicorn

    app = create_offline_app(runs_dir)
    print(f"ttscale dashboard: http://{host}:{port}/ui  (runs from {runs_dir})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


__all__ = ["create_offline_app", "serve_offline"]
