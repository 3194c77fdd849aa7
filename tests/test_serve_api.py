"""The control API (`cepo serve`) for real: a token off loopback, bodies that are too big or malformed, a fuzz of
its OpenAPI schema, and a run submitted, listed and stopped (checkpointed) through the API and the CLI.

The server listens on 0.0.0.0 (so it needs CEPO_API_TOKEN) on a local Ray it starts itself; every request goes
to 127.0.0.1. HF_HUB_OFFLINE is set: a fuzzed config naming a Hub model is refused at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from raycluster import CEPO, REPO, cepo_serve, free_port, http

pytestmark = pytest.mark.slow
TOKEN = "test-token-0123456789"


@pytest.fixture(scope="module")
def api(tmp_path_factory, redis_url):
    tmp = tmp_path_factory.mktemp("serve")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "CEPO_API_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}
    args = ["--host", "0.0.0.0", "--root", str(tmp / "runs"), "--redis", redis_url]
    with cepo_serve(args, tmp / "serve.log", env, free_port(), token=TOKEN) as url:
        yield url, env, tmp


def test_off_loopback_without_a_token_it_refuses_to_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CEPO_API_TOKEN"}
    done = subprocess.run(
        [CEPO, "serve", "--host", "0.0.0.0", "--port", str(free_port()), "--root", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "CEPO_API_TOKEN" in done.stderr and "not a loopback address" in done.stderr


def test_every_route_but_healthz_needs_the_token(api):
    url, _, _ = api
    assert http("GET", f"{url}/healthz") == (200, {"ok": True})
    for method, path, body in (
        ("GET", "/readyz", None),
        ("GET", "/metrics", None),
        ("GET", "/openapi.json", None),
        ("GET", "/runs", None),
        ("GET", "/runs/x", None),
        ("POST", "/runs", {"config_path": "configs/tiny.yaml"}),
        ("POST", "/runs/x/stop", None),
        ("POST", "/runs/x/scale", {"rollout": 2}),
    ):
        for token in (None, "wrong", TOKEN + "x", ""):
            status, answer = http(method, url + path, body, token=token)
            assert status == 401, (method, path, token, answer)
    assert http("GET", f"{url}/readyz", token=TOKEN) == (200, {"ready": True})
    assert http("GET", f"{url}/runs", token=TOKEN)[0] == 200
    status, schema = http("GET", f"{url}/openapi.json", token=TOKEN)
    assert status == 200 and {"/runs", "/runs/{run_id}", "/runs/{run_id}/scale"} <= set(schema["paths"])


def test_bad_bodies_are_4xx_naming_the_problem(api):
    url, _, tmp = api

    def post(path: str, body: object = None, raw: bytes | None = None) -> tuple[int, object]:
        status, answer = http("POST", url + path, body, token=TOKEN, raw=raw)
        assert 400 <= status < 500, (path, status, answer)
        return status, answer

    assert post("/runs", raw=b"x" * (2 << 20))[0] == 413
    assert post("/runs", raw=b"[" * 100_000)[0] == 422  # deeper than any parser should recurse
    assert post("/runs", raw=b"{not json")[0] == 422
    assert post("/runs", raw=b"[1, 2]")[0] == 422
    assert post("/runs", raw=b"\xff\xfe")[0] == 422
    assert post("/runs", {"config_path": 5})[0] == 422
    assert post("/runs", {"nonsense": True})[0] == 422
    assert post("/runs", {"steps": 0})[0] == 422
    status, answer = post("/runs", {"config_path": "configs/tiny.yaml", "overrides": ["rollout.replicas=0"]})
    assert status == 422 and "rollout.replicas" in answer["detail"]
    status, answer = post(
        "/runs", {"config_path": "configs/tiny.yaml", "config": {"learner": {"lr": "fast"}}}
    )
    assert status == 422 and "learner.lr" in answer["detail"]
    status, answer = post("/runs", {"config_path": "configs/tiny.yaml", "config": {"logging": 5}})
    assert status == 422 and "logging" in answer["detail"]
    status, answer = post("/runs", {"config": {"model": {"path": "models/nope"}}})
    assert status == 422 and "model.path" in answer["detail"]
    status, answer = post("/runs", {"config_path": "nope.yaml"})
    assert status == 422 and "nope.yaml" in answer["detail"]
    status, answer = post("/runs", {"config_path": "configs/tiny.yaml", "run_dir": "../../elsewhere"})
    assert status == 422 and "root" in answer["detail"]
    assert post("/runs/nope/scale", {"rollout": 2})[0] == 404
    assert post("/runs/nope/scale", {"rollout": 0})[0] == 422
    assert post("/runs/nope/scale", {"rollout": "many"})[0] == 422
    assert post("/runs/nope/stop")[0] == 404
    assert http("GET", f"{url}/runs/nope", token=TOKEN)[0] == 404
    assert not (tmp / "runs").exists() or not any((tmp / "runs").iterdir())  # nothing was started


def test_fuzzing_the_openapi_schema_finds_no_server_error(api):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    url, _, _ = api
    auth = {"Authorization": f"Bearer {TOKEN}"}
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=auth)
    tried = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=25,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def fuzz(case) -> None:
            response = case.call(base_url=url, headers=auth)
            case.validate_response(response, checks=[not_a_server_error])

        fuzz()
        tried.append(operation.label)
    assert len(tried) == 8, tried  # every route of the schema


def test_a_run_is_submitted_listed_and_stopped_with_a_checkpoint(api, tiny_model_dir, redis_url):
    import redis

    url, env, _ = api
    body = {
        "config_path": "configs/tiny.yaml",
        "overrides": [
            f"model.path={tiny_model_dir}",
            "rollout.backend=transformers",
            "teacher.backend=transformers",
            "rollout.replicas=1",
            "learner.ranks=1",
            "rollout.prompts_per_step=4",
            "rollout.group_size=4",
            "data.size=200",
            "data.eval_suites=[]",
        ],
        "steps": 200,
    }
    status, created = http("POST", f"{url}/runs", body, token=TOKEN)
    assert status == 201, created
    run_id, run_dir = created["run_id"], Path(created["run_dir"])
    assert http("POST", f"{url}/runs", {**body, "run_dir": run_dir.name}, token=TOKEN)[0] == 409  # in use
    deadline = time.monotonic() + 600
    while True:
        status, run = http("GET", f"{url}/runs/{run_id}", token=TOKEN)
        assert status == 200 and run["state"] in ("starting", "running"), run
        if run["step"] >= 1:
            break
        assert time.monotonic() < deadline, run
        time.sleep(0.5)
    assert [r["name"] for r in run["replicas"]["rollout"]] == ["rollout-0"]
    assert all(r["healthy"] for rows in run["replicas"].values() for r in rows)
    assert run["last_metrics"]["adapter_version"] == run["version"]
    cli_env = {**env, "CEPO_API_URL": url}
    listed = subprocess.run(
        [CEPO, "runs"], cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0 and run_id in listed.stdout, listed.stderr
    refused = subprocess.run(
        [CEPO, "stop", run_id],
        cwd=REPO,
        env={**cli_env, "CEPO_API_TOKEN": "wrong-token"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and "401" in refused.stderr
    stopped = subprocess.run(
        [CEPO, "stop", run_id], cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=120
    )
    assert stopped.returncode == 0, stopped.stderr
    while True:
        run = http("GET", f"{url}/runs/{run_id}", token=TOKEN)[1]
        if run["state"] not in ("starting", "running"):
            break
        assert time.monotonic() < deadline, run
        time.sleep(0.5)
    assert run["state"] == "stopped" and run["error"] is None and 1 <= run["step"] < 200, run
    assert (run_dir / "checkpoints" / f"step_{run['step']:05d}" / "state.json").is_file()
    steps = len((run_dir / "metrics.jsonl").read_text().splitlines())
    assert steps == run["step"]
    record = redis.Redis.from_url(redis_url, decode_responses=True).hgetall(f"cepo:run:{run_id}")
    assert record["status"] == "interrupted" and int(record["step"]) == steps, record
    assert json.loads((run_dir / "replicas.jsonl").read_text().splitlines()[-1])["step"] == steps - 1
