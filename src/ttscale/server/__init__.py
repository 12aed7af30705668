"""OpenAI-compatible HTTP server: `create_app(llm, ServerConfig(...))`, `ttscale serve`."""

from ttscale.server.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
