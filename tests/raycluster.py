"""A real multi-node Ray cluster on this machine: ``ray start --head`` plus worker nodes, each a ``ray start
--block`` process of ours offering role resources, torn down by killing exactly those process trees (never
``ray stop``, which would stop every Ray on the machine, other tests' included)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    address: str  # HOST:PORT of the head's GCS
    temp_dir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def nodes(self) -> dict[str, dict[str, float]]:
        """node id → its resources, from a driver of this cluster (ray.init(address=...) must be done)."""
        import ray

        return {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}

    def node_of(self, resource: str) -> str:
        """The id of the one live node that offers ``resource``."""
        found = [node for node, res in self.nodes().items() if res.get(resource, 0) > 0]
        assert len(found) == 1, f"{resource}: offered by {found}"
        return found[0]


def _node_ports() -> list[str]:
    """Every port a node binds, chosen free: several nodes on one machine (and other tests' Rays) must not meet
    on Ray's fixed defaults (the dashboard agent's 52365, ...)."""
    names = (
        "node-manager-port",
        "object-manager-port",
        "metrics-export-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
    )
    return [f"--{name}={free_port()}" for name in names]


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [RAY, "start", "--block", "--disable-usage-stats", *_node_ports(), *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to every process of our ``ray start`` trees (workers first), then SIGKILL what is left."""
    tree: list[psutil.Process] = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            parent = psutil.Process(proc.pid)
            tree += [*parent.children(recursive=True), parent]
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.wait(timeout=5)


@contextlib.contextmanager
def ray_cluster(
    tmp: Path, head: dict[str, float], workers: list[tuple[int, dict[str, float]]]
) -> Iterator[Cluster]:
    """A head offering ``head`` resources (1 CPU) and one node per (cpus, resources) in ``workers``."""
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}
    port = free_port()
    temp_dir = Path("/tmp") / f"rc{port}"  # short: Ray's socket paths must stay under 108 bytes
    cluster = Cluster(f"127.0.0.1:{port}", temp_dir, env=env)
    try:
        cluster.procs.append(
            _start(
                [
                    "--head",
                    f"--port={port}",
                    "--num-cpus=1",
                    f"--resources={json.dumps(head)}",
                    "--include-dashboard=false",
                    f"--temp-dir={temp_dir}",
                    f"--ray-client-server-port={free_port()}",
                ],
                tmp / "head.log",
                env,
            )
        )
        _wait_nodes(cluster, 1, tmp / "head.log")
        for i, (cpus, resources) in enumerate(workers):
            cluster.procs.append(
                _start(
                    [
                        f"--address={cluster.address}",
                        f"--num-cpus={cpus}",
                        f"--resources={json.dumps(resources)}",
                    ],
                    tmp / f"worker{i}.log",
                    env,
                )
            )
            _wait_nodes(cluster, 2 + i, tmp / f"worker{i}.log")  # one at a time: no two start at once
        yield cluster
    finally:
        _stop(cluster.procs)


def _wait_nodes(cluster: Cluster, count: int, log: Path, timeout: float = 120.0) -> None:
    """Wait until ``count`` nodes are alive (asked in a subprocess, so this process stays off the cluster)."""
    probe = (
        "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
        "print(sum(1 for n in ray.nodes() if n['Alive']))"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in cluster.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        out = subprocess.run(
            [sys.executable, "-c", probe, cluster.address],
            capture_output=True,
            text=True,
            env=cluster.env,
            timeout=60,
            check=False,
        )
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(1)
    raise TimeoutError(f"{count} Ray nodes not up within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


# ---------------------------------------------------------------------------------------------- `cepo serve`
CEPO = str(Path(sys.executable).with_name("cepo"))


def http(method: str, url: str, body: object = None, token: str | None = None, raw: bytes | None = None):
    """(status, parsed JSON or text) of one request; never raises for an HTTP error status."""
    import urllib.error
    import urllib.request

    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


@contextlib.contextmanager
def cepo_serve(args: list[str], log: Path, env: dict[str, str], port: int, token: str | None = None):
    """`cepo serve --port PORT ARGS` as a process of ours; yields its URL once /readyz answers 200; SIGINT at
    the end (then its whole process tree is killed if anything is left)."""
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [CEPO, "serve", "--port", str(port), *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"cepo serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if http("GET", url + "/readyz", token=token)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"cepo serve not ready in 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        tree = []
        with contextlib.suppress(psutil.NoSuchProcess):
            tree = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
