"""Rollout and teacher replicas scaled while a run goes on, through the control API, on a real Ray cluster.

A head offering `verifier`, node A offering `rollout` (3), node B offering `teacher` (2) and `learner`; `cepo
serve --address` on it, Redis as the ledger. A 6-step tiny run (transformers engines) is scaled rollout 1 → 3 → 1
and teacher 1 → 2 between steps. After every step each current replica must serve the learner's (version,
checksum) — asked of the replica itself — every prompt of the step must have been generated and graded exactly
once, and the prompts must be the data cursor's, none lost or repeated across steps.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from raycluster import CEPO, REPO, cepo_serve, free_port, http, ray_cluster

from cepo.controller.pools import split_evenly, split_weighted


def test_split_weighted_is_proportional_contiguous_and_complete():
    assert split_weighted(12, [1.0, 1.0, 1.0]) == [(i, a, b) for i, (a, b) in enumerate(split_evenly(12, 3))]
    assert split_weighted(7, [1, 1, 1]) == [(0, 0, 3), (1, 3, 5), (2, 5, 7)]
    assert split_weighted(10, [3.0, 1.0]) == [(0, 0, 8), (1, 8, 10)]  # 7.5 / 2.5: ties to the earlier part
    assert split_weighted(2, [1.0, 100.0, 1.0]) == [(1, 0, 2)]  # empty parts dropped
    assert split_weighted(5, [0.0, 0.0]) == [(0, 0, 3), (1, 3, 5)]  # no measurement yet: even
    assert split_weighted(0, [1.0]) == [] and split_weighted(3, []) == []
    for n in range(0, 40, 7):
        for weights in ([1.0], [5.0, 0.1, 2.0], [1e-9, 1.0, 1e9]):
            parts = split_weighted(n, weights)
            assert sum(b - a for _, a, b in parts) == n
            assert all(parts[k][2] == parts[k + 1][1] for k in range(len(parts) - 1))


RUN_SETTINGS = [
    "rollout.backend=transformers",
    "teacher.backend=transformers",
    "rollout.replicas=1",
    "teacher.replicas=1",
    "learner.ranks=1",
    "rollout.prompts_per_step=6",
    "rollout.group_size=4",
    "data.size=200",
    "data.eval_suites=[]",
    "resources.probe_every=1",
    "resources.call_timeout_s=300",
    "logging.metrics_port=0",
]


def wait_for_state(url: str, run_id: str, until, timeout: float = 600.0, every: float = 0.2) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, body = http("GET", f"{url}/runs/{run_id}")
        assert status == 200, body
        if until(body):
            return body
        assert body["state"] not in ("failed", "stopped"), body
        assert time.monotonic() < deadline, f"timed out; last status {body}"
        time.sleep(every)


@pytest.mark.slow
def test_rollout_and_teacher_scale_mid_run_through_the_api(tiny_model_dir, redis_url, tmp_path):
    import redis

    head, a, b = {"verifier": 1}, {"rollout": 3}, {"teacher": 2, "learner": 1}
    with ray_cluster(tmp_path / "cluster", head, [(3, a), (3, b)]) as cluster:
        import ray

        ray.init(address=cluster.address, log_to_driver=False)
        try:
            node_a, node_b = cluster.node_of("rollout"), cluster.node_of("teacher")
        finally:
            ray.shutdown()
        env = {**cluster.env, "HF_HUB_OFFLINE": "1"}
        args = ["--address", cluster.address, "--root", str(tmp_path / "runs"), "--redis", redis_url]
        with cepo_serve(args, tmp_path / "serve.log", env, free_port()) as url:
            body = {
                "config_path": "configs/tiny.yaml",
                "overrides": [f"model.path={tiny_model_dir}", *RUN_SETTINGS],
                "steps": 6,
            }
            status, created = http("POST", f"{url}/runs", body)
            assert status == 201, created
            run_id, run_dir = created["run_id"], Path(created["run_dir"])
            wait_for_state(url, run_id, lambda s: s["state"] == "running" and s["step"] >= 1)
            status, answer = http("POST", f"{url}/runs/{run_id}/scale", {"rollout": 3, "teacher": 2})
            assert status == 202, answer
            up = wait_for_state(url, run_id, lambda s: len(s["replicas"]["rollout"]) == 3)
            assert len(up["replicas"]["teacher"]) == 2
            # back down through the CLI (the same API; CEPO_API_URL could stand for --api)
            done = subprocess.run(
                [CEPO, "scale", run_id, "--rollout", "1", "--api", url],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
            final = wait_for_state(url, run_id, lambda s: s["state"] == "finished", every=1.0)
            listed = subprocess.run(
                [CEPO, "runs", "--api", url], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
            )
            assert listed.returncode == 0 and run_id in listed.stdout and "finished" in listed.stdout
            metrics = http("GET", f"{url}/metrics")[1]
        record = redis.Redis.from_url(redis_url, decode_responses=True).hgetall(f"cepo:run:{run_id}")

    assert record["status"] == "finished", record
    assert f'cepo_api_run_replicas{{role="rollout",run="{run_id}"}} 1.0' in metrics
    assert final["step"] == 6 and final["version"] == 6 and final["error"] is None
    check_step_records(run_dir, tiny_model_dir, node_a, node_b)


def check_step_records(run_dir: Path, model_dir: Path, node_a: str, node_b: str) -> None:
    """Replica counts and what every replica served after each step; every prompt exactly once."""
    lines = [json.loads(x) for x in (run_dir / "replicas.jsonl").read_text().splitlines()]
    reports = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in reports] == list(range(6)) == [line["step"] for line in lines]
    log = [
        (line["step"] + 1, line["counts"]["rollout"], line["counts"]["teacher"], line["learner"]["version"])
        for line in lines
    ]
    print("\nstep  rollout  teacher  version")
    for row in log:
        print("{:>4}  {:>7}  {:>7}  {:>7}".format(*row))

    def runs(counts: list[int]) -> list[int]:  # consecutive repeats collapsed
        return [n for k, n in enumerate(counts) if k == 0 or counts[k - 1] != n]

    assert runs([n for _, n, _, _ in log]) == [1, 3, 1], log
    assert runs([n for _, _, n, _ in log]) == [1, 2], log
    for line, report in zip(lines, reports, strict=True):
        learner = (line["learner"]["version"], line["learner"]["checksum"])
        assert learner == (report["adapter_version"], report["adapter_checksum"])
        for role, node in (("rollout", node_a), ("teacher", node_b)):
            for replica in line["replicas"][role]:  # what each replica itself says it serves, after the step
                assert replica["healthy"] and (replica["version"], replica["checksum"]) == learner, line
                assert replica["node"] == node, replica
        assert not report["replica_restarts"] and report["probe_failures"] == 0
    assert [r["adapter_version"] for r in reports] == [1, 2, 3, 4, 5, 6]

    # no prompt lost or run twice: each step's prompts are the data cursor's next batch, each generated
    # group_size times and graded once (the step dumps hold every rollout of these small steps)
    from cepo.config import load_config
    from cepo.data import DataCursor, from_config

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"model.path={model_dir}", *RUN_SETTINGS])
    cursor = DataCursor(from_config(cfg.data).problems, cfg.data.seed)
    seen: list[str] = []
    for step in range(6):
        dump = json.loads((run_dir / "steps" / f"step_{step:05d}.json").read_text())
        expected = [p.id for p in cursor.next_batch(cfg.rollout.prompts_per_step)]
        assert [dump["problems"][str(g)]["id"] for g in range(len(expected))] == expected
        groups = sorted(r["group"] for r in dump["rollouts"])
        assert groups == sorted(list(range(len(expected))) * cfg.rollout.group_size), step
        seen += expected
    assert len(seen) == len(set(seen)) == 36


@pytest.mark.slow
def test_a_replica_pulls_only_what_it_lacks_and_checks_what_it_pulled(tmp_path):
    """EngineReplica.pull: a replica that holds (version, checksum) confirms without fetching; one that lacks it
    fetches the object and loads it; an object that is not the version it was told to serve is refused. Queued
    calls finish before a shutdown queued behind them (how a removed replica drains)."""
    import os

    import ray
    from _tiny import save_random_adapter, save_tiny_model
    from transformers import AutoTokenizer

    from cepo_proto import AdapterPayload
    from cepo_proto.pipeline import GenerateRequest, SamplingSpec
    from cepo_services.common.templates import chat_prompt_ids
    from cepo_services.rollout.replica import RolloutReplica

    model_dir = save_tiny_model(tmp_path / "model")
    first = AdapterPayload.from_dir(0, save_random_adapter(model_dir, tmp_path / "a0", seed=1))
    second = AdapterPayload.from_dir(1, save_random_adapter(model_dir, tmp_path / "a1", seed=2))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        replica = ray.remote(num_cpus=1)(RolloutReplica).remote("rollout-0", "transformers", str(model_dir))
        one, two = ray.put(first), ray.put(second)
        ack = ray.get(replica.pull.remote(0, first.checksum, [one]), timeout=300)
        assert (ack.version, ack.checksum) == (0, first.checksum)
        # holds version 0 already: confirms without fetching (the object it is pointed at is never read)
        ack = ray.get(replica.pull.remote(0, first.checksum, [two]), timeout=60)
        assert (ack.version, ack.checksum) == (0, first.checksum)
        with pytest.raises(ray.exceptions.RayTaskError, match="was told to serve version 1"):
            ray.get(replica.pull.remote(1, second.checksum, [one]), timeout=60)
        assert ray.get(replica.serving.remote(), timeout=60) == (0, first.checksum)
        ack = ray.get(replica.pull.remote(1, second.checksum, [two]), timeout=60)
        assert (ack.version, ack.checksum) == (1, second.checksum)
        tok = AutoTokenizer.from_pretrained(model_dir)
        request = GenerateRequest(
            prompts=[chat_prompt_ids(tok, "Compute 1+2.")] * 4,
            sampling=SamplingSpec(n=2, temperature=1.0, max_tokens=8),
            expected_version=1,
        )
        queued = [replica.generate.remote(request) for _ in range(3)]
        done = replica.shutdown.remote()
        results = ray.get(queued, timeout=300)  # in flight when the shutdown was asked: all finish
        ray.get(done, timeout=60)
        assert [len(r.rollouts) for r in results] == [4, 4, 4]
        ray.kill(replica)
    finally:
        if started:
            ray.shutdown()
