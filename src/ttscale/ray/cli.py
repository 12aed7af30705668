"""The ``--ray`` options of ``ttscale eval`` and ``ttscale serve``.

`eval.cli` and `server.cli` sit below this package in the layer order, so they cannot call it;
instead the main CLI registers this module's ``eval_cmd`` and ``serve_cmd``: the same commands
with the Ray options appended to their signatures. Without ``--ray`` the
original command runs untouched; with it, the arguments go to `ray.eval` / `ray.serving`.
Options the Ray path does not implement are refused by name rather than ignored.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from ttscale.eval import cli as _eval_cli
from ttscale.server import cli as _server_cli

err = Console(stderr=True)

RayOpt = Annotated[bool, typer.Option("--ray", help="run on a Ray cluster (needs the ray extra)")]
AddressOpt = Annotated[
    str | None,
    typer.Option(
        help="with --ray: the cluster to join (auto: the one `ray start` runs here; "
        "host:port: a remote head); default: start a local one"
    ),
]
WorkersOpt = Annotated[int, typer.Option(min=1, help="with --ray: engine actors")]
ReplicasOpt = Annotated[int, typer.Option(min=1, help="with --ray: engine replicas")]
CpusOpt = Annotated[
    float | None,
    typer.Option(help="with --ray: CPUs (and torch threads) per replica (default: --threads or 1)"),
]

EVAL_RAY = {"ray": False, "address": None, "workers": 2}
SERVE_RAY = {"ray": False, "address": None, "replicas": 2, "cpus_per_replica": None}
# What the Ray paths pass on; any other option of the command must keep its default.
EVAL_HANDLED = {
    "task", "n_problems", "strategies", "out", "model", "scorer", "max_tokens", "temperature",
    "top_p", "seed", "difficulty", "concurrency", "threads", "kv_cache_gb", "quantize",
    "dtype", "json_out", "wide", "no_resume", "hygiene",
}  # fmt: skip
SERVE_HANDLED = {
    "model", "host", "port", "api_key", "served_model_name", "max_num_seqs",
    "max_num_batched_tokens", "max_model_len", "kv_cache_gb", "max_waiting", "max_n",
    "max_body_mb", "strategy_kv_share", "threads", "quantize", "dtype", "log_level",
}  # fmt: skip


def _fail(message: object) -> None:
    text = " ".join(str(message).split()) or type(message).__name__
    err.print(f"[red]error:[/red] {escape(text)}", soft_wrap=True)
    raise typer.Exit(2)


def _with_options(
    command: Callable[..., Any],
    extra: dict[str, tuple[Any, Any]],
    handled: set[str],
    run_ray: Callable[..., None],
) -> Callable[..., Any]:
    """``command`` with the ``extra`` options (name -> (annotation, default)) appended."""
    signature = inspect.signature(command, eval_str=True)  # typer needs real annotations
    params = list(signature.parameters.values())
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann)
        for name, (ann, default) in extra.items()
    ]

    @functools.wraps(command)
    def run(**kwargs: Any) -> Any:
        ray_args = {name: kwargs.pop(name, default) for name, (_, default) in extra.items()}
        if not ray_args["ray"]:
            changed = [n for n, (_, d) in extra.items() if n != "ray" and ray_args[n] != d]
            if changed:
                flags = ", ".join("--" + n.replace("_", "-") for n in changed)
                _fail(f"{flags} only apply with --ray")
            return command(**kwargs)
        from ttscale.ray.cluster import RayClusterError, require_ray

        try:  # first: without Ray nothing else matters
            require_ray()
        except RayClusterError as e:
            _fail(e)
        unsupported = [
            "--" + p.name.replace("_", "-")
            for p in params
            if p.name not in handled and kwargs.get(p.name, p.default) != p.default
        ]
        if unsupported:
            _fail(f"{', '.join(unsupported)} is not supported with --ray")
        return run_ray(ray_args, **kwargs)

    run.__signature__ = signature.replace(parameters=[*params, *added])  # type: ignore[attr-defined]
    run.__annotations__ = {**command.__annotations__, **{n: a for n, (a, _) in extra.items()}}
    return run


def with_ray_eval(eval_cmd: Callable[..., Any]) -> Callable[..., Any]:
    extra = {
        "ray": (RayOpt, False),
        "address": (AddressOpt, None),
        "workers": (WorkersOpt, 2),
    }
    return _with_options(eval_cmd, extra, EVAL_HANDLED, _eval_on_ray)


def with_ray_serve(serve: Callable[..., Any]) -> Callable[..., Any]:
    extra = {
        "ray": (RayOpt, False),
        "address": (AddressOpt, None),
        "replicas": (ReplicasOpt, 2),
        "cpus_per_replica": (CpusOpt, None),
    }
    return _with_options(serve, extra, SERVE_HANDLED, _serve_on_ray)


def _local_source(model: str | None) -> str | None:
    """What the workers' `LLM.source` will be, if the model resolves on this machine too (on a
    cluster it may exist on the workers only; then the run's settings come from them)."""
    from ttscale.errors import ModelLoadError
    from ttscale.loader import resolve_model_path
    from ttscale.loader.default_model import default_model_path

    try:
        return str(default_model_path() if model is None else resolve_model_path(model))
    except (ModelLoadError, FileNotFoundError):
        return None


def _eval_on_ray(ray_args: dict[str, Any], **kw: Any) -> None:
    # eval.cli's own checks and report, so `--ray` refuses and prints exactly what a local
    # run does; only the engine part differs.
    from ttscale.eval.cli import _eval_report, _params, _strategies, check_scorer
    from ttscale.eval.store import RECORDS_FILE, check_out_dir, load_records, run_settings
    from ttscale.eval.summary import summarize_records
    from ttscale.ray.cluster import RayClusterError
    from ttscale.ray.eval import run_eval
    from ttscale.ray.pool import EnginePool
    from ttscale.ray.worker import WorkerConfig
    from ttscale.tasks import load_task
    from ttscale.tts.hygiene import Hygiene

    specs = list(dict.fromkeys(_strategies(kw["strategies"])))
    check_scorer(kw["scorer"])
    params = _params(
        max_tokens=kw["max_tokens"],
        temperature=kw["temperature"],
        top_p=kw["top_p"],
        seed=kw["seed"],
    )
    out, hygiene = Path(kw["out"]), Hygiene(enabled=kw["hygiene"])
    try:  # everything cheap first: a typo must not cost a cluster start
        task = load_task(kw["task"], kw["difficulty"])
        problems = task.problems(kw["n_problems"], kw["seed"])
        options = {} if kw["kv_cache_gb"] is None else {"kv_cache_gb": kw["kv_cache_gb"]}
        config = WorkerConfig(kw["model"], kw["threads"] or 1, kw["quantize"], kw["dtype"], options)
    except ValueError as e:
        _fail(e)
    if not problems:
        _fail(f"task {kw['task']!r} gave no problems")
    source = _local_source(kw["model"])
    if source is not None and not kw["no_resume"]:  # a finished run starts no cluster
        settings = run_settings(
            source, task, params, kw["seed"], kw["scorer"], None, hygiene, config.numerics()
        )
        try:
            if check_out_dir(out, settings):
                ids = [p.id for p in problems]
                records = load_records(out / RECORDS_FILE)
                records = [r for r in records if r["strategy"] in specs]
                if {(r["strategy"], r["problem_id"]) for r in records} >= {
                    (s, i) for s in specs for i in ids
                }:
                    err.print(f"[dim]{escape(str(out))} has every result: nothing to run[/dim]")
                    rows = summarize_records(records, ids, specs)
                    summary = {"settings": settings, "n_problems": len(ids), "strategies": rows}
                    _eval_report(summary, out, kw["json_out"], kw["wide"])
                    return
        except ValueError as e:  # SettingsMismatch, a corrupt records file
            _fail(e)
    t0 = time.perf_counter()
    try:
        with EnginePool(config, ray_args["workers"], address=ray_args["address"]) as pool:
            err.print(
                f"[dim]{len(pool)} workers loaded {escape(pool.source)} "
                f"in {time.perf_counter() - t0:.1f} s[/dim]"
            )
            if kw["max_tokens"] >= pool.infos[0]["max_model_len"]:
                _fail(
                    f"--max-tokens {kw['max_tokens']} does not fit the context of "
                    f"{pool.infos[0]['max_model_len']} tokens (prompt included)"
                )
            summary = run_eval(
                pool,
                task,
                specs,
                kw["n_problems"],
                out,
                seed=kw["seed"],
                params=params,
                scorer_spec=kw["scorer"],
                concurrency=kw["concurrency"],
                resume=not kw["no_resume"],
                progress=True,
                hygiene=hygiene,
            )
    except (RayClusterError, ValueError) as e:  # SettingsMismatch is a ValueError
        _fail(e)
    except KeyboardInterrupt:  # the actors are gone (the pool's exit); the records stay
        saved = len(load_records(out / RECORDS_FILE))
        err.print(
            f"\ninterrupted: {escape(str(out / RECORDS_FILE))} holds {saved} results (a "
            "chunk cut midway is not saved); the same command resumes",
            soft_wrap=True,
        )
        raise typer.Exit(130) from None
    cluster = summary["cluster"]
    err.print(f"[dim]{cluster['workers']} workers, {cluster['elapsed_s']:.1f} s[/dim]")
    _eval_report(summary, out, kw["json_out"], kw["wide"])


def _serve_on_ray(ray_args: dict[str, Any], **kw: Any) -> None:
    from ttscale.loader.default_model import DEFAULT_MODEL_NAME
    from ttscale.ray.cluster import RayClusterError
    from ttscale.ray.serving import RayServeConfig, deploy, shutdown
    from ttscale.ray.worker import WorkerConfig
    from ttscale.server.config import ServerConfig, model_names

    threads = kw["threads"] or 1
    cpus = ray_args["cpus_per_replica"] or float(threads)
    engine = dict(
        max_num_seqs=kw["max_num_seqs"],
        max_num_batched_tokens=kw["max_num_batched_tokens"],
        max_model_len=kw["max_model_len"],
    )
    if kw["kv_cache_gb"] is not None:
        engine["kv_cache_gb"] = kw["kv_cache_gb"]
    try:
        limits = dict(
            max_waiting=kw["max_waiting"],
            max_n=kw["max_n"],
            max_body_bytes=int(kw["max_body_mb"] * 2**20),
            strategy_kv_share=kw["strategy_kv_share"],
        )
        # The name clients use: the path's, as `ttscale serve` does (no model loaded here).
        source = kw["model"] or DEFAULT_MODEL_NAME
        names = model_names(source, kw["served_model_name"])
        if kw["model"] is None and kw["served_model_name"] is None:
            names = (DEFAULT_MODEL_NAME, *names)
        server = ServerConfig(
            model_names=tuple(dict.fromkeys(names)), api_key=kw["api_key"], **limits
        )
        config = RayServeConfig(
            replicas=ray_args["replicas"],
            cpus_per_replica=cpus,
            host=kw["host"],
            port=kw["port"],
            address=ray_args["address"],
        )
        worker = WorkerConfig(kw["model"], max(1, int(cpus)), kw["quantize"], kw["dtype"], engine)
    except ValueError as e:
        _fail(e)
    t0 = time.perf_counter()
    try:
        url = deploy(worker, server, config)
    except RayClusterError as e:
        _fail(e)
    err.print(
        f"[dim]{config.replicas} replicas loaded in {time.perf_counter() - t0:.1f} s; serving "
        f"{server.model_names[0]!r} on {url}/v1 (Ctrl-C stops)[/dim]"
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        shutdown()


# What the main CLI registers as `ttscale eval` and `ttscale serve` (cli.py's SUBCOMMANDS).
eval_cmd = with_ray_eval(_eval_cli.eval_cmd)
serve_cmd = with_ray_serve(_server_cli.serve)

__all__ = ["eval_cmd", "serve_cmd", "with_ray_eval", "with_ray_serve"]
