"""Serves the dashboard's static files at `/ui` (no build step: plain HTML, JS and CSS shipped
as package data; nothing is fetched from the internet)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, RedirectResponse

STATIC_DIR = Path(__file__).resolve().parent / "static"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}


def pages_router() -> APIRouter:
    """GET /ui (the single page; its tabs are #engine, #playground, #runs) and its assets.
    Only files shipped in static/ are served: a name is looked up, never joined to a path."""
    router = APIRouter(include_in_schema=False)
    files = {p.name: p for p in STATIC_DIR.iterdir() if p.suffix in _TYPES}

    @router.get("/ui")
    async def index() -> FileResponse:
        return FileResponse(files["index.html"], media_type=_TYPES[".html"])

    @router.get("/ui/{name}")
    async def asset(name: str) -> FileResponse:
        path = files.get(name)
        if path is None:
            raise HTTPException(404, f"no file {name!r} in the dashboard")
        return FileResponse(path, media_type=_TYPES[path.suffix])

    @router.get("/")
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui")

    return router


__all__ = ["STATIC_DIR", "pages_router"]
