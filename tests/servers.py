"""Real servers for tests: redis-server and prometheus from Debian, started on free local ports.

Missing binaries are an error, never a skip: CI installs them (``apt-get install redis-server prometheus``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REDIS_SERVER = "/usr/bin/redis-server"
PROMETHEUS = "/usr/bin/prometheus"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(
    predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.5, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); TimeoutError(what) after timeout_s.
    Exceptions raised by the predicate count as "not yet"."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except Exception as exc:
            last_error = exc
        else:
            if value:
                return value
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what}{detail}")
        time.sleep(interval_s)


def _require(binary: str, package: str) -> str:
    if os.access(binary, os.X_OK):
        return binary
    found = shutil.which(Path(binary).name)
    if found:
        return found
    raise RuntimeError(
        f"{binary} not found: install the Debian package '{package}' (apt-get install -y {package})"
    )


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace_s)


def _start(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    log = log_path.open("wb")
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    finally:
        log.close()  # the child holds its own descriptor


@contextlib.contextmanager
def _serving(
    cmd: list[str], log_path: Path, ready: Callable[[], bool], timeout_s: float, interval_s: float, what: str
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``cmd`` (output to ``log_path``), wait until ``ready()``, stop it on exit; failures carry the log."""
    proc = _start(cmd, log_path)
    name = Path(cmd[0]).name

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode}")
        return ready()

    try:
        try:
            wait_for(up, timeout_s, interval_s, what=what)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"{exc}\n--- {log_path} ---\n{_log_tail(log_path)}") from exc
        yield proc
    finally:
        _stop(proc)


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A throw-away redis-server (no persistence) on a free port; yields ``redis://127.0.0.1:PORT/0``."""
    import redis

    binary = _require(REDIS_SERVER, "redis-server")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / "redis-server.log"
    cmd = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
        "--daemonize", "no",
        "--protected-mode", "yes",
    ]  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"

    def ping() -> bool:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()

    with _serving(cmd, log_path, ping, 20.0, 0.1, f"redis-server on port {port} to answer PING"):
        yield url


class RestartableRedis:
    """A redis-server that a test can really stop (SIGTERM, the process exits) and start again on the SAME port
    and data dir. Persistence is on (append-only file, fsync on every write), so what Redis acknowledged
    survives the restart. Use as a context manager: started on entry, stopped on exit."""

    def __init__(self, workdir: Path) -> None:
        self.binary = _require(REDIS_SERVER, "redis-server")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = self.workdir / "redis-server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def _cmd(self) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--dir", str(self.workdir),
            "--daemonize", "no",
            "--protected-mode", "yes",
        ]  # fmt: skip

    def ping(self) -> bool:
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()

    def start(self, timeout_s: float = 20.0) -> None:
        """Start redis-server (again) on this port and data dir; return once it answers PING."""
        if self.running:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        self.starts += 1
        log_path = self.log_path.with_name(f"redis-server.{self.starts}.log")
        proc = self.proc = _start(self._cmd(), log_path)

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {proc.returncode}")
            return self.ping()

        try:
            wait_for(up, timeout_s, 0.1, what=f"redis-server on port {self.port} to answer PING")
        except (TimeoutError, RuntimeError) as exc:
            _stop(proc)
            raise RuntimeError(f"{exc}\n--- {log_path} ---\n{_log_tail(log_path)}") from exc

    def stop(self) -> None:
        """Terminate the process (SIGTERM: it writes its data and exits) and wait until the port is closed."""
        if self.proc is None:
            return
        _stop(self.proc)
        self.proc = None

        def closed() -> bool:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                return sock.connect_ex(("127.0.0.1", self.port)) != 0

        wait_for(closed, 10.0, 0.05, what=f"port {self.port} to close")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> RestartableRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def prometheus_server(config_text: str, workdir: Path) -> Iterator[str]:
    """Prometheus with ``config_text`` as prometheus.yml on a free port; yields ``http://127.0.0.1:PORT``."""
    binary = _require(PROMETHEUS, "prometheus")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(config_text)
    port = free_port()
    log_path = workdir / "prometheus.log"
    cmd = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as resp:
            return resp.status == 200

    with _serving(cmd, log_path, ready, 60.0, 0.25, f"prometheus on port {port} to report /-/ready"):
        yield base


def prometheus_query(base_url: str, expr: str) -> list[dict]:
    """Instant query ``expr`` against Prometheus at ``base_url``; returns ``data.result``."""
    url = f"{base_url.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 400/422 carry a JSON error body
        raw = exc.read()
        try:
            body = json.loads(raw)
        except ValueError:
            raise RuntimeError(f"prometheus query {expr!r} failed: HTTP {exc.code}: {raw[:500]!r}") from exc
    if body.get("status") != "success":
        raise RuntimeError(
            f"prometheus query {expr!r} failed: {body.get('errorType', '?')}: {body.get('error', body)}"
        )
    return body["data"]["result"]


CHROMIUM = Path("/usr/bin/chromium")


def chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    """Run headless Chromium (Debian's ``chromium``) once with ``args``; fail clearly when it is missing."""
    if not CHROMIUM.exists():
        raise RuntimeError(
            "Chromium is required for the heatmap tests: install the Debian package `chromium` "
            "(apt-get install chromium), which provides /usr/bin/chromium"
        )
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(home)}
    cmd = [
        str(CHROMIUM),
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp / 'profile'}",
        *args,
    ]
    # stderr carries harmless dbus complaints on this machine; only the exit status and stdout matter
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc
