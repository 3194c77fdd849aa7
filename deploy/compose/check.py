#!/usr/bin/env python3
"""The checks of the compose test (deploy/compose/test.sh), against a running docker-compose.yml deployment:

1. the control API is ready and every Ray node has joined with its role's resource (``--nodes``);
2. a tiny run (configs/tiny.yaml, ``--steps`` steps, small overrides) submitted with ``POST /runs`` finishes;
   while it runs, Prometheus scrapes its services (controller, replicas, learner ranks) and they are up;
3. its Redis record (cepo/ledger/store.py's ``cepo:run:{id}``) says ``finished`` after ``--steps`` steps;
4. every Prometheus target is up: each Ray node (one per compose container running Ray; Ray's discovery also
   lists the head's dashboard and autoscaler metrics), the API, Prometheus.

Standard library plus redis-py (the project's .venv).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter

FINAL = ("finished", "failed", "stopped")


def say(message: str) -> None:
    print(f"[check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def http(method: str, url: str, body: object = None, timeout: float = 30.0) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as exc:
        text, status = exc.read().decode(errors="replace"), exc.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def wait(what: str, probe, timeout: float, every: float = 3.0):
    """Call ``probe`` until it returns something truthy; its last answer goes into the error."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            ok, last = probe()
        except (OSError, urllib.error.URLError) as exc:
            ok, last = False, repr(exc)
        if ok:
            return last
        time.sleep(every)
    raise SystemExit(f"FAILED: {what} within {timeout:.0f} s; last: {last}")


def ray_nodes(head: str) -> list[dict]:
    code = (
        "import json, ray; ray.init(address='auto', logging_level='ERROR', log_to_driver=False); "
        "print(json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))"
    )
    out = subprocess.run(
        ["podman", "exec", head, "python3", "-c", code], capture_output=True, text=True, timeout=120
    )
    if out.returncode != 0:
        raise OSError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def targets(prometheus: str) -> list[dict]:
    status, body = http("GET", f"{prometheus}/api/v1/targets?state=active")
    if status != 200 or not isinstance(body, dict):
        raise OSError(f"Prometheus /api/v1/targets: {status} {body}")
    return body["data"]["activeTargets"]


def describe(active: list[dict]) -> str:
    return ", ".join(
        f"{t['labels'].get('job')}/{t['labels'].get('replica') or t['scrapeUrl']}={t['health']}"
        + (f" ({t['lastError']})" if t.get("lastError") else "")
        for t in active
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--api", required=True)
    parser.add_argument("--prometheus", required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--head", required=True, help="the head's container (for `ray.nodes()`)")
    parser.add_argument("--nodes", default="rollout=2,teacher=1,learner=1,verifier=1")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds the run may take")
    args = parser.parse_args(argv)
    want = {k: int(v) for k, v in (item.split("=") for item in args.nodes.split(","))}

    # 1. API ready, nodes joined
    wait("the API answers /readyz", lambda: (http("GET", f"{args.api}/readyz")[0] == 200, "not ready"), 300)
    say("API ready")

    def nodes_joined():
        nodes = ray_nodes(args.head)
        have = Counter(role for n in nodes for role in want if n.get(role))
        return all(have[r] == c for r, c in want.items()), (len(nodes), dict(have))

    count, have = wait(f"Ray nodes offering {want}", nodes_joined, 300, every=5)
    say(f"Ray: {count} nodes alive, nodes per role {have}")

    # 2. a tiny run through the API
    overrides = [
        f"rollout.replicas={want.get('rollout', 1)}",
        f"teacher.replicas={want.get('teacher', 1)}",
        "rollout.prompts_per_step=4",
        "rollout.group_size=4",
        "data.size=64",
        "data.eval_suites=[]",
        "logging.metrics_port=0",
        f"logging.redis_url={args.redis}",
    ]
    body = {"config_path": "configs/tiny.yaml", "overrides": overrides, "steps": args.steps}
    status, answer = http("POST", f"{args.api}/runs", body)
    if status != 201:
        raise SystemExit(f"FAILED: POST /runs → {status} {answer}")
    run_id = answer["run_id"]
    say(f"submitted run {run_id} ({answer.get('run_dir')}): {args.steps} steps, overrides {overrides}")

    seen_run_targets: dict[str, str] = {}
    deadline = time.monotonic() + args.timeout
    state: dict = {}
    while time.monotonic() < deadline:
        status, state = http("GET", f"{args.api}/runs/{run_id}")
        if status != 200:
            raise SystemExit(f"FAILED: GET /runs/{run_id} → {status} {state}")
        if state.get("state") in FINAL:
            break
        try:  # the run's own services, scraped while it runs
            for t in targets(args.prometheus):
                job = t["labels"].get("job", "")
                if job.startswith("cepo-") and job != "cepo-api" and t["labels"].get("run") == run_id:
                    key = t["labels"].get("replica") or t["scrapeUrl"]
                    if seen_run_targets.get(key) != "up":
                        seen_run_targets[key] = t["health"]
        except OSError:
            pass
        time.sleep(3)
    say(f"run {run_id}: {state.get('state')} after {state.get('step')} steps; {state.get('error') or ''}")
    if state.get("state") != "finished":
        raise SystemExit(f"FAILED: run {run_id} ended {state.get('state')!r}, not finished: {state}")
    say(f"the run's services scraped while it ran: {seen_run_targets}")
    if not seen_run_targets or any(h != "up" for h in seen_run_targets.values()):
        raise SystemExit(f"FAILED: the run's services were not all scraped up: {seen_run_targets}")

    # 3. Redis
    import redis

    record = {
        k.decode(): v.decode()
        for k, v in redis.Redis.from_url(args.redis).hgetall(f"cepo:run:{run_id}").items()
    }
    say(f"Redis cepo:run:{run_id}: status={record.get('status')} step={record.get('step')}")
    if record.get("status") != "finished" or int(record.get("step", -1)) != args.steps:
        raise SystemExit(f"FAILED: Redis record {record.get('status')!r} at step {record.get('step')!r}")

    # 4. every target up (the finished run's targets are withdrawn by the head's publisher)
    def all_up():
        active = targets(args.prometheus)
        jobs = Counter(t["labels"].get("job") for t in active)
        ok = (
            all(t["health"] == "up" for t in active)
            and len({t["scrapeUrl"] for t in active if t["labels"].get("job") == "ray"}) >= count
            and jobs["prometheus"] == 1
            and jobs["cepo-api"] == 1
        )
        return ok, describe(active)

    final = wait("every Prometheus target up", all_up, 90, every=5)
    say(f"Prometheus targets all up: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
