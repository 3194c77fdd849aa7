"""``cepo serve``: the control plane — a FastAPI app on Ray Serve that submits, lists, stops and scales runs.

The routes are in :mod:`cepo.serve.app`; each run executes in a Ray actor (:mod:`cepo.serve.runner`) that drives
the Trainer over the rollout, teacher, verifier and learner services of the same Ray cluster.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["TOKEN_ENV", "ServeError", "is_loopback", "serve_forever", "start"]

TOKEN_ENV = "CEPO_API_TOKEN"
APP_NAME = "cepo"
LOCAL_CPUS = 32
HEAD_RESOURCE = "node:__internal_head__"  # Ray's marker resource of the head node


class ServeError(RuntimeError):
    """The control API cannot start (no token off loopback, the port taken, Ray unreachable)."""


def is_loopback(host: str) -> bool:
    """Is ``host`` a loopback address or name (127.0.0.0/8, ::1, localhost)?"""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def _build_app(token: str | None, root: str, redis_url: str | None, cwd: str) -> Any:
    """The ASGI app, built in the Serve replica (not pickled from here)."""
    from cepo.serve.app import RunsApi, build_app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    return build_app(RunsApi(root, redis_url, cwd), token)


def _deployment(token: str | None, root: str, redis_url: str | None, cwd: str) -> Any:
    from ray import serve

    def builder() -> Any:  # a function: Serve calls it in the replica to get the app
        return _build_app(token, root, redis_url, cwd)

    # on the head, beside its HTTP proxy: the runs it starts write below --root there
    options = {"num_cpus": 0, "resources": {HEAD_RESOURCE: 0.001}}

    @serve.deployment(name="cepo-api", num_replicas=1, max_ongoing_requests=64, ray_actor_options=options)
    @serve.ingress(builder)
    class ControlApi:
        pass

    return ControlApi.bind()


def start(
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    root: str = "runs",
    redis_url: str | None = None,
    token: str | None = None,
) -> str:
    """Connect to (or start) Ray and deploy the API on ``host:port``; returns its URL. Off loopback a token
    (``token`` or ``$CEPO_API_TOKEN``) is required; with one, every request but /healthz must carry it."""
    import ray
    from ray import serve

    from cepo.controller.cluster import local_role_resources

    token = token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(host) and not token:
        raise ServeError(
            f"--host {host} is not a loopback address: set {TOKEN_ENV} to a secret token first (every request "
            "will then need `Authorization: Bearer <token>`)"
        )
    if token is not None and len(token) < 8:
        raise ServeError(f"{TOKEN_ENV} is too short: use at least 8 characters")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            # a local Ray is one node of every role; its CPUs are logical: enough for a few runs' services
            cpus = max(os.cpu_count() or 1, LOCAL_CPUS)
            ray.init(
                num_cpus=cpus, resources=local_role_resources(), include_dashboard=False, log_to_driver=False
            )
    # one HTTP proxy, on the head: the API's address is the head's (nodes may share a machine)
    serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
    serve.run(_deployment(token, root, redis_url, os.getcwd()), name=APP_NAME, route_prefix="/")
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def serve_forever(on_ready: Callable[[str], None] | None = None, **kwargs: Any) -> None:
    """:func:`start`, then block until SIGINT or SIGTERM; then shut the API (and a local Ray) down."""
    import ray
    from ray import serve

    stop = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    started_ray = not ray.is_initialized() and not kwargs.get("address")
    try:
        url = start(**kwargs)
        for sig in previous:  # after Ray started: its core worker installs a SIGTERM handler of its own
            signal.signal(sig, lambda *_: stop.set())
        if on_ready is not None:
            on_ready(url)
        while not stop.wait(0.5):
            pass
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        with contextlib.suppress(Exception):
            serve.shutdown()
        if started_ray or kwargs.get("address"):
            ray.shutdown()
