"""Where a process's own output goes: engine logs (vLLM, Triton, NUMA notices, warnings) into a log file, the
console kept for what a user reads. Works at the file-descriptor level, so output written by C extensions and
by child processes started meanwhile (vLLM's engine core) is caught too.

``captured(path)`` is for a command's own process; ``setup_worker`` is the Ray ``worker_process_setup_hook``
that sends each service process's output to ``$CEPO_LOG_DIR/worker-<pid>.log`` (``$CEPO_LOG_ECHO=1``: also to
the worker's own stdout/stderr, which Ray forwards to the driver when ``log_to_driver`` is on)."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Literal

__all__ = ["LOG_DIR_ENV", "LOG_ECHO_ENV", "captured", "setup_worker"]

LOG_DIR_ENV = "CEPO_LOG_DIR"
LOG_ECHO_ENV = "CEPO_LOG_ECHO"


def _pump(read_fd: int, sinks: list[int]) -> None:
    """Copy everything from ``read_fd`` to each of ``sinks`` until the pipe's last writer closes."""
    with contextlib.suppress(OSError):
        while chunk := os.read(read_fd, 65536):
            for fd in sinks:
                with contextlib.suppress(OSError):
                    os.write(fd, chunk)
    os.close(read_fd)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


@contextlib.contextmanager
def captured(
    log_path: str | Path, *, echo: bool = False, terminal: Literal["stdout", "stderr"] = "stdout"
) -> Iterator[IO[str]]:
    """Send this process's stdout and stderr to ``log_path`` (appended) for the duration; with ``echo`` also to
    where they went before. Yields a text stream on the former ``terminal`` (stdout or stderr) for the lines a
    user should read."""
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _flush()
    fds = [2, 1]
    saved = {fd: os.dup(fd) for fd in fds}
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(log_fd, f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n".encode())
    pumps: list[threading.Thread] = []
    writers: list[int] = []
    for fd in fds:
        if echo:  # a pipe per stream, copied to the log and to the stream's former target
            read_fd, write_fd = os.pipe()
            pump = threading.Thread(target=_pump, args=(read_fd, [log_fd, saved[fd]]), daemon=True)
            pump.start()
            pumps.append(pump)
            writers.append(write_fd)
            os.dup2(write_fd, fd)
        else:
            os.dup2(log_fd, fd)
    shown = os.fdopen(os.dup(saved[1 if terminal == "stdout" else 2]), "w", buffering=1, encoding="utf-8")
    try:
        yield shown
    finally:
        _flush()
        shown.close()
        for fd, original in saved.items():
            os.dup2(original, fd)
            os.close(original)
        for write_fd in writers:
            os.close(write_fd)
        for pump in pumps:  # a child that still holds the pipe keeps it open: do not wait for it forever
            pump.join(timeout=2.0)
        os.close(log_fd)


def setup_worker() -> None:
    """Ray ``worker_process_setup_hook``: this worker's stdout and stderr into ``$CEPO_LOG_DIR/worker-<pid>.log``
    (a worker on a node that cannot write there keeps Ray's own log files)."""
    log_dir = os.environ.get(LOG_DIR_ENV)
    if not log_dir:
        return
    path = Path(log_dir) / f"worker-{os.getpid()}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        return
    os.write(
        log_fd,
        f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} on {socket.gethostname()}\n".encode(),
    )
    _flush()
    if os.environ.get(LOG_ECHO_ENV) == "1":
        for fd in (1, 2):
            read_fd, write_fd = os.pipe()
            threading.Thread(target=_pump, args=(read_fd, [log_fd, os.dup(fd)]), daemon=True).start()
            os.dup2(write_fd, fd)
            os.close(write_fd)
    else:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
