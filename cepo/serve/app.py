"""The control API: a FastAPI app served by Ray Serve (``cepo serve``).

========================  =====================================================================================
``GET /healthz``          200 ``{"ok": true}`` while the process answers (never needs the token)
``GET /readyz``           200 when Ray is connected and runs can start, else 503
``GET /metrics``          Prometheus text: runs by state, replicas per run and role, API requests
``GET /openapi.json``     the schema
``POST /runs``            ``{"config_path", "config", "overrides", "steps", "run_dir"}`` → 201 ``{"run_id",
                          "run_dir"}``; the config is validated as ``cepo config validate`` does (422 naming the
                          field)
``GET /runs``             every run this server started, newest last
``GET /runs/{run_id}``    state (starting, running, finished, failed, stopped), step, steps, version, replicas
                          (name, healthy, version, checksum per rollout and teacher replica), last metrics, error
``POST /runs/{id}/stop``  finish the current step, checkpoint, stop → 202
``POST /runs/{id}/scale`` ``{"rollout": n, "teacher": m}`` (either may be null) → 202; applied between steps
========================  =====================================================================================

Each run executes in its own Ray actor (:class:`cepo.serve.runner.RunActor`, driving the Trainer), so the API
stays responsive. With a token (required off loopback) every request but ``/healthz`` needs
``Authorization: Bearer <token>``. Request bodies over ``MAX_BODY_BYTES`` are refused (413).
"""

from __future__ import annotations

import asyncio
import hmac
import os
import secrets
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["MAX_BODY_BYTES", "RunRequest", "RunsApi", "ScaleRequest", "build_app"]

MAX_BODY_BYTES = 1 << 20
MAX_REPLICAS = 20  # the metrics port layout's limit per role
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config_path: str | None = Field(
        None, max_length=4096, description="A YAML run configuration on the server (relative: to its cwd)."
    )
    config: dict[str, Any] | None = Field(
        None, description="Configuration keys (sections as objects), merged over config_path's."
    )
    overrides: list[str] = Field(
        default_factory=list,
        max_length=200,
        description="`dotted.key=value` as `cepo train --set` takes them.",
    )
    steps: int | None = Field(None, ge=1, le=1_000_000, description="Steps to train (None: algorithm.steps).")
    run_dir: str | None = Field(
        None, max_length=4096, description="Run folder below the server's --root (None: <root>/<run_id>)."
    )


class ScaleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rollout: int | None = Field(None, ge=1, le=MAX_REPLICAS, description="Rollout replicas wanted.")
    teacher: int | None = Field(None, ge=1, le=MAX_REPLICAS, description="Teacher replicas wanted.")


class RunCreated(BaseModel):
    run_id: str
    run_dir: str


class ReplicaState(BaseModel):
    name: str
    healthy: bool
    version: int | None = None
    checksum: str | None = None


class RunStatus(BaseModel):
    run_id: str
    run_dir: str
    state: str
    step: int
    steps: int
    version: int | None = None
    replicas: dict[str, list[ReplicaState]]
    last_metrics: dict[str, Any]
    error: str | None = None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


class RunsApi:
    """What the routes do: start runs as actors, keep their handles, ask them for status, stop and scale."""

    def __init__(self, root: str, redis_url: str | None = None, cwd: str | None = None) -> None:
        self.cwd = Path(cwd or os.getcwd())
        root_path = Path(root)
        self.root = (root_path if root_path.is_absolute() else self.cwd / root_path).resolve()
        self.redis_url = redis_url
        self.runs: dict[str, Any] = {}  # run_id → RunActor handle
        self.run_dirs: dict[str, str] = {}
        self.requests = 0

    # ------------------------------------------------------------------ helpers
    def _path(self, text: str) -> Path:
        path = Path(text).expanduser()
        return path if path.is_absolute() else self.cwd / path

    def validate(self, body: RunRequest) -> Any:
        """The RunConfig of a request (ConfigError naming the field), with server-side defaults."""
        from cepo.config import ConfigError, _validate, apply_overrides, check_model_path, load_config

        if body.config_path is not None:
            path = self._path(body.config_path)
            if not path.is_file():
                raise ConfigError(f"config_path {body.config_path}: no such file on the server")
            data = load_config(path).model_dump(mode="json")
            source = str(body.config_path)
        else:
            data, source = {}, "request"
        if body.config is not None:
            data = _merge(data, body.config)
            source += " with config"
        if body.overrides:
            data = apply_overrides(data, list(body.overrides))
            source += " with overrides " + " ".join(body.overrides)
        logging = data.get("logging")
        if self.redis_url and (
            logging is None or (isinstance(logging, dict) and not logging.get("redis_url"))
        ):
            data = _merge(data, {"logging": {"redis_url": self.redis_url}})
        cfg = _validate(data, source)
        model = self._path(cfg.model.path)
        if model.exists():  # a local model folder: absolute, so every process finds it
            cfg = cfg.model_copy(
                update={"model": cfg.model.model_copy(update={"path": str(model.resolve())})}
            )
        try:  # as `cepo config validate`: a missing local model, or a Hub model offline, is refused now
            check_model_path(cfg.model.path, hub=True)
        except FileNotFoundError as exc:
            raise ConfigError(str(exc)) from None
        return cfg

    def _run_dir(self, run_id: str, wanted: str | None) -> Path:
        if wanted is None:
            return self.root / run_id
        path = Path(wanted)
        path = (path if path.is_absolute() else self.root / path).resolve()
        if path != self.root and self.root not in path.parents:
            raise ValueError(f"run_dir {wanted}: must be inside the server's root {self.root}")
        return path

    # ------------------------------------------------------------------ operations
    def create(self, body: RunRequest) -> tuple[int, dict[str, Any]]:
        import ray

        from cepo.config import ConfigError
        from cepo.serve.runner import RunActor

        try:
            cfg = self.validate(body)
        except ConfigError as exc:
            return 422, {"detail": str(exc)}
        except (OSError, ValueError, TypeError, AttributeError, LookupError, RecursionError) as exc:
            return 422, {"detail": f"invalid run request: {type(exc).__name__}: {exc}"}
        run_id = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        try:
            run_dir = self._run_dir(run_id, body.run_dir)
        except (ValueError, OSError) as exc:
            return 422, {"detail": str(exc)}
        if (run_dir / "metrics.jsonl").exists() or (run_dir / "config.yaml").exists():
            return 409, {"detail": f"run_dir {run_dir} already holds a run"}
        if any(Path(d) == run_dir for d in self.run_dirs.values()):
            return 409, {"detail": f"run_dir {run_dir} is in use by another run of this server"}
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        # the run's controller beside the API (the head): same folders, same working directory
        actor = ray.remote(max_concurrency=8, num_cpus=0, scheduling_strategy=here)(RunActor).remote(
            run_id, cfg.model_dump(mode="json"), str(run_dir), body.steps, str(self.cwd)
        )
        self.runs[run_id] = actor
        self.run_dirs[run_id] = str(run_dir)
        return 201, {"run_id": run_id, "run_dir": str(run_dir)}

    async def status(self, run_id: str) -> dict[str, Any] | None:
        actor = self.runs.get(run_id)
        if actor is None:
            return None
        try:
            return await asyncio.wait_for(_await(actor.status.remote()), timeout=30)
        except Exception as exc:  # the run's actor died or hangs
            return {
                "run_id": run_id,
                "run_dir": self.run_dirs[run_id],
                "state": "failed",
                "step": 0,
                "steps": 0,
                "version": None,
                "replicas": {"rollout": [], "teacher": []},
                "last_metrics": {},
                "error": f"the run's actor does not answer: {type(exc).__name__}",
            }


async def _await(ref: Any) -> Any:
    return await ref


MAX_DEPTH = 64


def _too_deep(body: bytes) -> bool:
    """Is the JSON nested deeper than MAX_DEPTH (a parser would recurse past its limit)? Brackets inside strings
    count too: a conservative bound, never too lax."""
    depth = deepest = 0
    for byte in body.translate(None, delete=bytes(b for b in range(256) if b not in b"[]{}")):
        depth += 1 if byte in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest > MAX_DEPTH


class Guard:
    """ASGI middleware in front of every route: the bearer token (all but /healthz), the body size limit (the
    body is read here, at most ``MAX_BODY_BYTES``, then replayed to the route) and a request counter."""

    def __init__(self, app: Any, *, expected: bytes | None, counter: Any) -> None:
        self.app, self.expected, self.counter = app, expected, counter

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.counter.labels(code=str(message["status"])).inc()
            await send(message)

        async def refuse(status: int, detail: str, **headers: str) -> None:
            await JSONResponse({"detail": detail}, status_code=status, headers=headers)(
                scope, receive, counted
            )

        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        authorized = self.expected is None or scope.get("path") == "/healthz"
        if not authorized and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            detail = "a valid bearer token is required (Authorization: Bearer <CEPO_API_TOKEN>)"
            await refuse(401, detail, **{"WWW-Authenticate": "Bearer"})
            return
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await refuse(400, "bad Content-Length header")
                return
            if int(length) > MAX_BODY_BYTES:
                await refuse(413, f"request body over {MAX_BODY_BYTES} bytes")
                return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY_BYTES:
                await refuse(413, f"request body over {MAX_BODY_BYTES} bytes")
                return
        if body and _too_deep(body):
            await refuse(422, f"JSON nested deeper than {MAX_DEPTH} levels")
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, counted)


def build_app(api: RunsApi, token: str | None) -> FastAPI:
    """The FastAPI app over ``api``; with ``token`` every route but /healthz needs it as a bearer token."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

    app = FastAPI(
        title="CEPO control API",
        version="1",
        description="Submit, list, stop and scale CEPO training runs on a Ray cluster.",
    )
    registry = CollectorRegistry()
    requests_total = Counter(
        "cepo_api_requests_total", "API requests by status code.", ["code"], registry=registry
    )
    runs_gauge = Gauge("cepo_api_runs", "Runs of this server by state.", ["state"], registry=registry)
    replicas_gauge = Gauge(
        "cepo_api_run_replicas", "Replicas per run and role.", ["run", "role"], registry=registry
    )
    expected = f"Bearer {token}".encode() if token else None

    app.add_middleware(Guard, expected=expected, counter=requests_total)

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/readyz", responses={503: {"description": "Ray not connected"}})
    async def readyz() -> JSONResponse:
        import ray

        try:
            ready = ray.is_initialized() and any(n.get("Alive") for n in ray.nodes())
        except Exception:
            ready = False
        return JSONResponse({"ready": bool(ready)}, status_code=200 if ready else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        states: dict[str, int] = {}
        for run_id in list(api.runs):
            status = await api.status(run_id)
            if status is None:
                continue
            states[status["state"]] = states.get(status["state"], 0) + 1
            for role, rows in status["replicas"].items():
                replicas_gauge.labels(run=run_id, role=role).set(len(rows))
        for state in ("starting", "running", "finished", "failed", "stopped"):
            runs_gauge.labels(state=state).set(states.get(state, 0))
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    @app.post(
        "/runs",
        status_code=201,
        response_model=RunCreated,
        responses={409: {"description": "run_dir already holds a run"}, 422: {"description": "bad config"}},
    )
    async def create_run(body: RunRequest) -> JSONResponse:
        code, content = await asyncio.get_running_loop().run_in_executor(None, api.create, body)
        return JSONResponse(content, status_code=code)

    @app.get("/runs", response_model=list[RunStatus])
    async def list_runs() -> list[dict[str, Any]]:
        rows = [await api.status(run_id) for run_id in list(api.runs)]
        return [row for row in rows if row is not None]

    def _missing(run_id: str) -> JSONResponse:
        return _error(404, f"no run {run_id!r} on this server")

    @app.get("/runs/{run_id}", response_model=RunStatus, responses={404: {"description": "no such run"}})
    async def get_run(run_id: str) -> Any:
        status = await api.status(run_id)
        return _missing(run_id) if status is None else status

    @app.post("/runs/{run_id}/stop", status_code=202, responses={404: {"description": "no such run"}})
    async def stop_run(run_id: str) -> Any:
        actor = api.runs.get(run_id)
        if actor is None:
            return _missing(run_id)
        status = await asyncio.wait_for(_await(actor.stop.remote()), timeout=30)
        return JSONResponse({"run_id": run_id, "state": status["state"], "stopping": True}, status_code=202)

    @app.post(
        "/runs/{run_id}/scale",
        status_code=202,
        responses={404: {"description": "no such run"}, 409: {"description": "cannot be had"}},
    )
    async def scale_run(run_id: str, body: ScaleRequest) -> Any:
        actor = api.runs.get(run_id)
        if actor is None:
            return _missing(run_id)
        counts = {
            role: n for role, n in (("rollout", body.rollout), ("teacher", body.teacher)) if n is not None
        }
        if not counts:
            return _error(422, "give rollout and/or teacher")
        problem = await asyncio.wait_for(_await(actor.check_scale.remote(counts)), timeout=30)
        if problem is not None:
            return _error(409, problem)
        status = await asyncio.wait_for(_await(actor.scale.remote(counts)), timeout=30)
        return JSONResponse(
            {"run_id": run_id, "requested": counts, "pending": status["pending_scale"]}, status_code=202
        )

    return app
