"""Prometheus metrics of the services (rollout, teacher, verifier, learner) and the endpoint that serves them.

Every service runs in its own process (a Ray actor), records into prometheus-client's default registry of that
process and serves it over HTTP with :func:`serve_metrics` (replicas and learner ranks: their
``metrics_endpoint(port)`` actor method, returning ``(node ip, bound port)`` via :func:`endpoint`). Metrics are
defined once per process, at import. The full table — the controller's metrics included — is documented in
``cepo/telemetry.py``; :data:`METRICS` here holds the services' rows.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

__all__ = [
    "METRICS",
    "RequestTimer",
    "define",
    "endpoint",
    "observe_learner_update",
    "observe_verdicts",
    "serve_metrics",
    "set_adapter_version",
    "track_rollout",
    "track_teacher",
]

# seconds: a short verify call up to a long vLLM batch on CPU
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, float("inf"))

# name (as exposed) → (type, label names, help)
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    # rollout
    "cepo_rollout_tokens_total": ("counter", ("replica",), "Generated tokens."),
    "cepo_rollout_request_seconds": ("histogram", ("replica",), "Seconds per generate request."),
    "cepo_rollout_queue_depth": ("gauge", ("replica",), "Generate requests in flight in the actor."),
    "cepo_rollout_adapter_version": ("gauge", ("replica",), "Adapter version loaded (-1: none)."),
    "cepo_rollout_requests_total": ("counter", ("replica",), "Generate requests finished."),
    # teacher
    "cepo_teacher_tokens_total": ("counter", ("replica",), "Scored response tokens."),
    "cepo_teacher_request_seconds": ("histogram", ("replica",), "Seconds per score request."),
    "cepo_teacher_adapter_version": ("gauge", ("replica",), "Adapter version loaded (-1: none)."),
    # verifier
    "cepo_verifier_verdicts_total": ("counter", ("replica", "reason"), "Verdicts by reason."),
    "cepo_verifier_timeouts_total": ("counter", ("replica",), "Verdicts whose reason is timeout."),
    "cepo_verifier_request_seconds": ("histogram", ("replica",), "Seconds per grade_batch call."),
    # learner
    "cepo_learner_loss": ("gauge", ("rank",), "This rank's loss of its last update."),
    "cepo_learner_grad_norm": ("gauge", ("rank",), "Global gradient norm of the last update."),
    "cepo_learner_ppo_clip_fraction": ("gauge", ("rank",), "PPO-clipped token fraction of the last update."),
    "cepo_learner_step_seconds": ("histogram", ("rank",), "Seconds per update call."),
    "cepo_learner_updates_total": ("counter", ("rank",), "Update calls finished."),
}

_TYPES = {"gauge": Gauge, "counter": Counter, "histogram": Histogram}


def define(name: str, kind: str, labels: tuple[str, ...], doc: str) -> Any:
    """The collector of ``name``: registered once per process (a re-import finds the existing one)."""
    existing = getattr(REGISTRY, "_names_to_collectors", {}).get(name)
    if existing is not None:
        return existing
    kwargs: dict[str, Any] = {"buckets": _BUCKETS} if kind == "histogram" else {}
    return _TYPES[kind](name, doc, labels, **kwargs)


_M = {name: define(name, *spec) for name, spec in METRICS.items()}


# ---------------------------------------------------------------------------------------------- serving
_servers: dict[tuple[int, str, int], int] = {}  # (pid, host, requested port) → bound port
_servers_lock = threading.Lock()


def serve_metrics(port: int = 0, host: str = "0.0.0.0") -> int:
    """Serve this process's default registry over HTTP once per (process, port); returns the bound port.

    ``port`` 0 picks an ephemeral port, and a second call with 0 returns the port already served (one endpoint
    per process is enough). A port in use raises OSError.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in [0, 65535], got {port}")
    pid = os.getpid()
    with _servers_lock:
        key = (pid, host, port)
        if key in _servers:
            return _servers[key]
        if port == 0:
            mine = [bound for (p, h, _), bound in _servers.items() if p == pid and h == host]
            if mine:
                return mine[0]
        server, _thread = start_http_server(port, addr=host)
        bound = int(server.server_port)
        _servers[key] = bound
        _servers[(pid, host, bound)] = bound
        return bound


def endpoint(port: int, host: str = "0.0.0.0") -> tuple[str, int]:
    """What a service actor's ``metrics_endpoint(port)`` returns: (this node's ip, bound port)."""
    bound = serve_metrics(port, host)
    address = "127.0.0.1"
    try:
        import ray
        from ray.util import get_node_ip_address

        if ray.is_initialized():
            address = get_node_ip_address()
    except Exception:  # no ray, or no node ip: the local address is the best guess
        pass
    return address, bound


# ---------------------------------------------------------------------------------------------- replicas
class RequestTimer:
    """Times one request: ``with track_rollout(name) as t: ...; t.tokens = n``.

    On exit (also when the body raises) it observes the latency, adds ``tokens`` and counts the request; while
    inside, the in-flight gauge (if any) is one higher.
    """

    def __init__(
        self, seconds: Any, tokens: Any, requests: Any | None = None, in_flight: Any | None = None
    ) -> None:
        self._seconds, self._tokens, self._requests, self._in_flight = seconds, tokens, requests, in_flight
        self.tokens = 0
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> RequestTimer:
        if self._in_flight is not None:
            self._in_flight.inc()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start
        if self._in_flight is not None:
            self._in_flight.dec()
        self._seconds.observe(self.seconds)
        self._tokens.inc(max(0, int(self.tokens)))
        if self._requests is not None:
            self._requests.inc()


def track_rollout(replica: str) -> RequestTimer:
    """Latency, tokens, requests and in-flight depth of one rollout ``generate`` call."""
    return RequestTimer(
        _M["cepo_rollout_request_seconds"].labels(replica=replica),
        _M["cepo_rollout_tokens_total"].labels(replica=replica),
        _M["cepo_rollout_requests_total"].labels(replica=replica),
        _M["cepo_rollout_queue_depth"].labels(replica=replica),
    )


def track_teacher(replica: str) -> RequestTimer:
    """Latency and scored tokens of one teacher ``score`` call."""
    return RequestTimer(
        _M["cepo_teacher_request_seconds"].labels(replica=replica),
        _M["cepo_teacher_tokens_total"].labels(replica=replica),
    )


def set_adapter_version(service: str, replica: str, version: int | None) -> None:
    """The adapter version ``replica`` of ``service`` ("rollout" or "teacher") serves; None → -1."""
    if service not in ("rollout", "teacher"):
        raise ValueError(f"adapter versions are kept for 'rollout' and 'teacher', not {service!r}")
    _M[f"cepo_{service}_adapter_version"].labels(replica=replica).set(-1 if version is None else int(version))


def observe_verdicts(replica: str, verdicts: Iterable[Any], seconds: float) -> None:
    """One grade_batch call: verdicts (objects with ``.reason``, or reason strings) and its seconds."""
    timeouts = 0
    for verdict in verdicts:
        reason = str(getattr(verdict, "reason", verdict))
        _M["cepo_verifier_verdicts_total"].labels(replica=replica, reason=reason).inc()
        timeouts += reason == "timeout"
    _M["cepo_verifier_timeouts_total"].labels(replica=replica).inc(timeouts)  # 0 too: the series exists
    _M["cepo_verifier_request_seconds"].labels(replica=replica).observe(float(seconds))


# ---------------------------------------------------------------------------------------------- learner
def observe_learner_update(
    rank: int | str, loss: float, grad_norm: float, clip_frac: float, seconds: float
) -> None:
    """One optimizer step on learner ``rank``."""
    rank = str(rank)
    _M["cepo_learner_loss"].labels(rank=rank).set(float(loss))
    _M["cepo_learner_grad_norm"].labels(rank=rank).set(float(grad_norm))
    _M["cepo_learner_ppo_clip_fraction"].labels(rank=rank).set(float(clip_frac))
    _M["cepo_learner_step_seconds"].labels(rank=rank).observe(float(seconds))
    _M["cepo_learner_updates_total"].labels(rank=rank).inc()
