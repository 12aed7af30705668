"""`ttscale serve`: the OpenAI-compatible server on uvicorn.

Register with `app.command("serve")(serve)` on the main typer app; this module also runs
standalone: `python -m ttscale.server.cli --help`.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated

import typer
from rich.console import Console

from ttscale.eval.cli import DtypeOpt, QuantizeOpt

err = Console(stderr=True)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="HF folder or .gguf file (default: embedded SmolLM2)"),
    ] = None,
    host: Annotated[str, typer.Option(help="bind address (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="TTSCALE_API_KEY", help="require 'Authorization: Bearer <key>'"),
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="model id reported to clients (default: file name)")
    ] = None,
    max_num_seqs: Annotated[int, typer.Option(help="sequences per engine step")] = 256,
    max_num_batched_tokens: Annotated[int, typer.Option(help="tokens per engine step")] = 2048,
    max_model_len: Annotated[int | None, typer.Option(help="context length cap")] = None,
    kv_cache_gb: Annotated[float | None, typer.Option(help="KV cache size (GiB)")] = None,
    max_waiting: Annotated[
        int, typer.Option(help="accepted requests not yet running; beyond: 429")
    ] = 256,
    max_n: Annotated[
        int, typer.Option(help="largest n per request, and N/M of a ttscale strategy")
    ] = 64,
    max_body_mb: Annotated[
        float, typer.Option(help="request bodies larger than this (MiB) get 413")
    ] = 4.0,
    strategy_kv_share: Annotated[
        float, typer.Option(help="fraction of the KV pool strategy jobs may reserve together")
    ] = 0.5,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch")] = None,
    quantize: QuantizeOpt = "auto",
    dtype: DtypeOpt = "float32",
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, ...)."""
    import uvicorn

    from ttscale.errors import ModelLoadError
    from ttscale.llm import LLM
    from ttscale.loader.default_model import DEFAULT_MODEL_NAME
    from ttscale.server.app import create_app
    from ttscale.server.config import ServerConfig, model_names

    if not _is_loopback(host) and not api_key:
        err.print(f"[yellow]warning:[/yellow] serving on {host} without --api-key")
    options = dict(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
    if kv_cache_gb is not None:
        options["kv_cache_gb"] = kv_cache_gb
    try:
        limits = dict(
            max_waiting=max_waiting,
            max_n=max_n,
            max_body_bytes=int(max_body_mb * 2**20),
            strategy_kv_share=strategy_kv_share,
        )
        ServerConfig(**limits)  # fail before the (slow) load
        llm = LLM(
            model,
            num_threads=threads,
            max_model_len=max_model_len,
            quantize=quantize,
            dtype=dtype,
            **options,
        )
    except (ModelLoadError, FileNotFoundError, ValueError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    err.print(f"[dim]loaded {llm.source} in {llm.load_seconds:.1f} s[/dim]")
    names = model_names(llm.source, served_model_name)
    if model is None and served_model_name is None:
        names = (DEFAULT_MODEL_NAME, *names)
    config = ServerConfig(model_names=names, api_key=api_key, **limits)
    err.print(f"[dim]serving {config.model_names[0]!r} on http://{host}:{port}/v1[/dim]")
    uvicorn.run(
        create_app(llm, config),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=5,
    )


def main() -> None:
    typer.run(serve)


if __name__ == "__main__":
    main()
