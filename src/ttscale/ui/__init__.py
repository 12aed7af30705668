"""The web dashboard: three pages (Engine, Playground, Runs) as plain static files in
`static/`, the routes that serve them and the eval folders (`pages.py`, `runs.py`), and the
offline app of `ttscale ui --runs DIR` (`offline.py`). `ttscale serve` adds the live routes
(`ttscale.server.ui_routes`: engine stats, playground runs as server-sent events) to the same
pages at `/ui`. See docs/UI.md.
"""

from __future__ import annotations

from ttscale.ui.pages import STATIC_DIR, pages_router
from ttscale.ui.runs import runs_router

__all__ = ["STATIC_DIR", "pages_router", "runs_router"]
