#!/usr/bin/env python3
"""Publish what Prometheus should scrape in a compose (or any Ray cluster) deployment, for file_sd.

Runs on the Ray head (``cepo-node head`` starts it) and rewrites, every ``--interval`` seconds, the files of
``--targets`` (the ``targets`` volume, which Prometheus reads through deploy/compose/prometheus.yml):

- ``ray.json``: every Ray node's metrics endpoint — the head and each replica of every worker service, however
  many ``--scale`` started — from Ray's own service-discovery file (``prom_metrics_service_discovery.json`` in
  the head's Ray temp folder, kept current by the Ray dashboard as nodes join and leave), labelled
  ``job=ray``;
- ``prometheus.json``: Prometheus itself (``--prometheus``), labelled ``job=prometheus``;
- ``api/cepo-api.json`` and ``api/token``: the control API's ``/metrics`` (``cepo serve``), labelled
  ``job=cepo-api``, and the bearer token Prometheus sends it (``CEPO_API_TOKEN``; a placeholder when the API is
  on loopback without one);
- ``run-<id>.json``: the services of every run in progress under ``--runs`` (its ``prometheus_targets.json``,
  written by every run with ``logging.metrics_port`` set: controller, rollout / teacher / verifier replicas,
  learner ranks), kept while the run's Redis record says ``running`` (without Redis: until its
  ``summary.json`` appears) and removed when it ends, so a finished run leaves no target down.

Files are replaced atomically, so Prometheus never reads half a file. Standard library only (the Redis status is
read with redis-py when it is installed, as it is in the image).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path


def write_json(path: Path, entries: list) -> None:
    write_text(path, json.dumps(entries, indent=1, sort_keys=True))


def write_text(path: Path, text: str) -> None:
    if path.is_file() and path.read_text() == text:
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def ray_targets(ray_tmp: Path) -> list | None:
    """Ray's service-discovery entries with job=ray (None when Ray has not written them yet)."""
    source = ray_tmp / "prom_metrics_service_discovery.json"
    try:
        entries = json.loads(source.read_text())
    except (OSError, ValueError):
        return None
    out = []
    for entry in entries if isinstance(entries, list) else []:
        targets = [t for t in entry.get("targets", []) if isinstance(t, str) and t]
        if targets:
            out.append({"targets": targets, "labels": {**entry.get("labels", {}), "job": "ray"}})
    return out


def run_status(redis_client, run_id: str) -> str | None:
    if redis_client is None:
        return None
    try:
        status = redis_client.hget(f"cepo:run:{run_id}", "status")
    except Exception:  # Redis away: keep what the folder says
        return None
    return status.decode() if isinstance(status, bytes) else status


def run_targets(runs: Path, redis_client, max_depth: int = 3) -> dict[str, list]:
    """{file stem: entries} for every run in progress under ``runs``."""
    found: dict[str, list] = {}
    if not runs.is_dir():
        return found
    for path in runs.rglob("prometheus_targets.json"):
        if len(path.relative_to(runs).parts) > max_depth + 1:
            continue
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        ids = {str(e.get("labels", {}).get("run", "")) for e in entries if isinstance(e, dict)}
        ids.discard("")
        if len(ids) != 1:
            continue
        run_id = ids.pop()
        status = run_status(redis_client, run_id)
        running = status == "running" if status else not (path.parent / "summary.json").exists()
        if running:
            found["run-" + re.sub(r"[^A-Za-z0-9._-]", "_", run_id)] = entries
    return found


def publish(args: argparse.Namespace, redis_client) -> list[str]:
    out = Path(args.targets)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, list] = {}
    ray = ray_targets(Path(args.ray_tmp))
    if ray is not None:
        files["ray"] = ray
    if args.prometheus:
        files["prometheus"] = [{"targets": [args.prometheus], "labels": {"job": "prometheus"}}]
    files.update(run_targets(Path(args.runs), redis_client))
    for name, entries in files.items():
        write_json(out / f"{name}.json", entries)
    api = out / "api"
    api.mkdir(exist_ok=True)
    write_text(api / "token", os.environ.get("CEPO_API_TOKEN") or "none")
    write_json(
        api / "cepo-api.json", [{"targets": [args.api], "labels": {"job": "cepo-api", "service": "api"}}]
    )
    for stale in out.glob("run-*.json"):
        if stale.stem not in files:
            stale.unlink(missing_ok=True)
    return sorted(files)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=os.environ.get("CEPO_TARGETS_DIR", "/targets"))
    parser.add_argument("--runs", default=os.environ.get("CEPO_RUNS_DIR", "/work/runs"))
    parser.add_argument("--ray-tmp", default="/tmp/ray")
    parser.add_argument(
        "--api",
        default=f"127.0.0.1:{os.environ.get('CEPO_API_PORT', '8000')}",
        help="host:port of cepo serve",
    )
    parser.add_argument(
        "--prometheus",
        default=f"127.0.0.1:{os.environ['CEPO_PROMETHEUS_PORT']}"
        if os.environ.get("CEPO_PROMETHEUS_PORT")
        else None,
        help="host:port of Prometheus itself",
    )
    parser.add_argument("--redis", default=os.environ.get("CEPO_REDIS_URL"))
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--once", action="store_true")
    args = parser.parse_args(argv)
    redis_client = None
    if args.redis:
        try:
            import redis

            redis_client = redis.Redis.from_url(args.redis, socket_timeout=2, socket_connect_timeout=2)
        except ImportError:
            pass
    last = None
    while True:
        try:
            names = publish(args, redis_client)
            if names != last:
                print(f"publish_targets: {', '.join(names)}", flush=True)
                last = names
        except OSError as exc:
            print(f"publish_targets: {exc}", file=sys.stderr, flush=True)
        if args.once:
            return 0
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
