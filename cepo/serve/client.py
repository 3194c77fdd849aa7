"""A small client of the control API (``cepo runs|scale|stop --api URL``), standard library only."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

__all__ = ["ApiError", "call", "format_runs"]


class ApiError(RuntimeError):
    """The API answered with an error status, or could not be reached."""


def call(api: str, method: str, path: str, body: Any = None, *, timeout: float = 60.0) -> Any:
    """``method path`` on the API at ``api`` (``http://host:port``) with a JSON ``body``; the JSON answer.
    The bearer token is ``$CEPO_API_TOKEN`` when set."""
    from cepo.serve import TOKEN_ENV

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(api.rstrip("/") + path, data=data, method=method)
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    token = os.environ.get(TOKEN_ENV)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail")
        except Exception:
            detail = exc.reason
        raise ApiError(f"{method} {path}: {exc.code} {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ApiError(f"cannot reach the control API at {api}: {reason}") from None


def format_runs(runs: list[dict[str, Any]]) -> list[str]:
    """One line per run: id, state, step/steps, version, replicas per role."""
    lines = []
    for run in runs:
        replicas = " ".join(f"{role} {len(rows)}" for role, rows in (run.get("replicas") or {}).items())
        error = f"  error: {run['error']}" if run.get("error") else ""
        lines.append(
            f"{run['run_id']}  {run['state']}  step {run['step']}/{run['steps']}  "
            f"version {run.get('version')}  {replicas}{error}"
        )
    return lines
