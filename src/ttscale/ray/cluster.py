"""Joining a Ray cluster with errors that name the cause and the fix, before any slow work.

Ray's own failure modes here are slow or silent: ``ray.init(address="host:port")`` on an
unreachable head retries for minutes, and actors that ask for more CPUs than the cluster has
stay pending forever. So the address is probed with a plain TCP connect first, and every
placement is checked against ``ray.cluster_resources()`` before anything is scheduled.
"""

from __future__ import annotations

import os
import socket
from types import ModuleType
from typing import Any

INSTALL_HINT = "pip install 'ttscale[ray]'"
CONNECT_TIMEOUT_S = 5.0  # a reachable head answers a TCP connect in milliseconds
DEFAULT_PORT = 6379  # `ray start --head`'s GCS port


class RayClusterError(RuntimeError):
    """Ray is missing, the cluster cannot be reached, or it cannot hold what was asked."""


def require_ray() -> ModuleType:
    """The `ray` library, or a RayClusterError that says how to install it."""
    try:
        import ray
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] != "ray":
            raise
        raise RayClusterError(f"Ray is not installed: {INSTALL_HINT}") from None
    return ray


def require_serve() -> ModuleType:
    """`ray.serve`, which needs the [serve] extra of ray (aiohttp, starlette, ...)."""
    require_ray()
    try:
        from ray import serve
    except ModuleNotFoundError as e:
        raise RayClusterError(
            f"Ray Serve is not installed ({e.name} is missing): {INSTALL_HINT}"
        ) from None
    return serve


def _host_port(address: str) -> tuple[str, int]:
    """'ray://host:10001' / 'host:port' / 'host' -> (host, port)."""
    rest = address.split("://", 1)[-1]
    host, sep, port = rest.rpartition(":")
    if not sep:
        return rest, DEFAULT_PORT
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise RayClusterError(f"bad Ray address {address!r}: expected host:port") from None


def probe_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raises RayClusterError unless something accepts TCP connections at ``address``."""
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise RayClusterError(
            f"cannot reach a Ray cluster at {address} ({e.strerror or type(e).__name__}); "
            "start one with `ray start --head` on that machine, check the host and port "
            "(`ray status` on the head prints them), or leave --address out to start a "
            "local cluster"
        ) from None


def connect(address: str | None = None, *, num_cpus: int | None = None, **init: Any) -> None:
    """Joins (or starts) a cluster unless this process already is in one.

    ``address=None`` starts a local cluster (``num_cpus`` caps it); ``"auto"`` joins the one
    `ray start` left on this machine; ``"host:port"`` / ``"ray://host:port"`` joins a remote
    head, which is probed first so a wrong address fails in seconds.
    """
    ray = require_ray()
    if ray.is_initialized():
        return
    if address not in (None, "auto", "local"):
        probe_address(address)
    options: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False, **init}
    if address is None:
        options["num_cpus"] = num_cpus
    else:
        options["address"] = address
    try:
        ray.init(**options)
    except ConnectionError as e:  # "auto" with no cluster running here
        raise RayClusterError(
            f"no Ray cluster to join at {address!r} ({' '.join(str(e).split())[:200]}); "
            "start one with `ray start --head`, or leave --address out to start a local one"
        ) from None


def cause_line(error: BaseException | str) -> str:
    """The line of a remote traceback that names the exception (Ray wraps it in pages)."""
    text = str(error)
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line and ("Error" in line or "Exception" in line) and not line.startswith("File "):
            return line[:300]
    return " ".join(text.split())[:300] or type(error).__name__


def cluster_cpus() -> float:
    ray = require_ray()
    return float(ray.cluster_resources().get("CPU", 0.0))


def check_cpus(count: int, cpus_each: float, what: str, flag: str, address: str | None) -> None:
    """Refuses ``count`` actors of ``cpus_each`` CPUs that the cluster cannot place at once
    (Ray would leave the rest pending forever). Before a local cluster is started, this
    machine's CPU count stands in for the cluster's, so the refusal costs no start-up."""
    if count < 1:
        raise RayClusterError(f"{flag} must be >= 1")
    if cpus_each <= 0:
        raise RayClusterError("CPUs per actor must be > 0")
    ray = require_ray()
    if ray.is_initialized():
        total = cluster_cpus()
    elif address is None:
        total = float(os.cpu_count() or 1)
    else:
        return  # checked again once connected
    need = count * cpus_each
    if need > total:
        fits = int(total // cpus_each)
        fix = f"use {flag} {fits}" if fits else f"use at most {total:g} CPUs each"
        raise RayClusterError(
            f"{count} {what} x {cpus_each:g} CPU need {need:g} CPUs but the cluster has "
            f"{total:g}; {fix}, or add machines (`ray start --address HEAD:6379` on each)"
        )


__all__ = [
    "INSTALL_HINT",
    "RayClusterError",
    "cause_line",
    "check_cpus",
    "cluster_cpus",
    "connect",
    "probe_address",
    "require_ray",
    "require_serve",
]
