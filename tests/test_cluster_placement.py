"""`cepo train --address` on a real multi-node Ray cluster: every service lands on a node offering its role.

Three `ray start` nodes on this machine: a head offering `verifier`, node A offering `rollout` (2) and `learner`
(1), node B offering `teacher` and `learner` (1) — so the two learner ranks sit on different nodes and meet at
rank 0's node address. The run is the tiny model with the transformers engines, 2 steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from raycluster import ray_cluster

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CEPO = str(Path(sys.executable).with_name("cepo"))


def tiny_overrides(model_dir: Path) -> list[str]:
    return [
        f"model.path={model_dir}",
        "rollout.backend=transformers",
        "teacher.backend=transformers",
        "rollout.prompts_per_step=4",
        "rollout.group_size=4",
        "data.size=200",
        "data.eval_suites=[]",
        "resources.probe_every=1",
        "resources.call_timeout_s=300",
    ]


def actor_nodes(address: str) -> dict[str, list[str]]:
    """Class name → the node ids of its actors (alive or dead), from the cluster's GCS."""
    import ray

    ray.init(address=address, log_to_driver=False)
    try:
        table = ray._private.state.actors()
    finally:
        ray.shutdown()
    nodes: dict[str, list[str]] = {}
    for info in table.values():
        nodes.setdefault(info["ActorClassName"].rpartition(".")[2], []).append(info["Address"]["NodeID"])
    return nodes


def test_cepo_train_attaches_to_a_cluster_and_places_every_service_by_role(tiny_model_dir, tmp_path):
    head, a, b = {"verifier": 1}, {"rollout": 2, "learner": 1}, {"teacher": 1, "learner": 1}
    with ray_cluster(tmp_path / "cluster", head, [(3, a), (2, b)]) as cluster:
        run_dir = tmp_path / "run"
        sets = [
            *tiny_overrides(tiny_model_dir),
            "rollout.replicas=2",
            "teacher.replicas=1",
            "learner.ranks=2",
        ]
        cmd = [CEPO, "train", "-c", "configs/tiny.yaml", "--address", cluster.address, "--steps", "2"]
        cmd += ["--run-dir", str(run_dir), *(x for s in sets for x in ("--set", s))]
        done = subprocess.run(cmd, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        nodes = actor_nodes(cluster.address)
        import ray

        ray.init(address=cluster.address, log_to_driver=False)
        try:
            head_node, node_a, node_b = (cluster.node_of(r) for r in ("verifier", "rollout", "teacher"))
        finally:
            ray.shutdown()
    reports = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["policy_version"], r["adapter_version"]) for r in reports] == [(0, 1), (1, 2)]
    assert all(r["probe_failures"] == 0 and not r["replica_restarts"] for r in reports)
    assert nodes["RolloutReplica"] == [node_a, node_a]
    assert nodes["TeacherReplica"] == [node_b]
    assert nodes["VerifierReplica"] == [head_node]
    assert sorted(nodes["LearnerRank"]) == sorted([node_a, node_b])  # one rank per node: rank 0's address
