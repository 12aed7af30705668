"""OpenAI-compatible HTTP server: `create_app(llm, ServerConfig(...))`, `ttscale serve`."""

from ttscale.server.app import create_app
from ttscale.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
