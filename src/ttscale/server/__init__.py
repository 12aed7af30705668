"""OpenAI-compatible HTTP server (the `server` extra): `ttscale.server.app.create_app(llm,
ServerConfig(...))` with `ServerConfig` from `ttscale.server.config`, and `ttscale serve`.

Nothing is imported here: `ttscale.server.cli` registers `serve` on the main CLI, which must
load without fastapi installed."""
