"""Quiet consoles: engine output (written at the file-descriptor level, by child processes too) goes to a log
file, with --verbose to the console as well; progress lines say `k/N · ETA`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from rich.console import Console

from cepo.progress import Progress, duration, ticking
from cepo_services.common.logs import captured

# A child process that writes as vLLM's engine core does: straight to the inherited descriptors.
CHILD = [sys.executable, "-c", "import os; os.write(1, b'child stdout\\n'); os.write(2, b'child stderr\\n')"]


def _run(code: str, tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("echo", [False, True])
def test_captured_sends_engine_output_to_the_log_and_keeps_the_console(tmp_path: Path, echo: bool) -> None:
    done = _run(
        f"""
        import os, subprocess, sys
        from cepo_services.common.logs import captured
        with captured("logs/x.log", echo={echo}, terminal="stderr") as terminal:
            print("python print")
            os.write(2, b"c-level stderr\\n")
            subprocess.run({CHILD!r}, check=True)
            terminal.write("progress line\\n")
        print("after: stdout is back")
        sys.stderr.write("after: stderr is back\\n")
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "logs" / "x.log").read_text()
    for line in ("python print", "c-level stderr", "child stdout", "child stderr"):
        assert line in log
        assert (line in done.stdout + done.stderr) is echo  # --verbose: on the console too
    assert "progress line" in done.stderr and "progress line" not in log
    assert "after: stdout is back" in done.stdout and "after: stderr is back" in done.stderr
    assert "after" not in log


def test_captured_appends_and_restores_after_an_error(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_text("earlier run\n")
    saved = os.fstat(2).st_ino
    with pytest.raises(RuntimeError), captured(log, terminal="stderr"):
        raise RuntimeError("boom")
    assert os.fstat(2).st_ino == saved  # stderr is the original again
    assert log.read_text().startswith("earlier run\n--- ")


@pytest.mark.parametrize("echo", ["0", "1"])
def test_ray_worker_hook_writes_the_worker_log(tmp_path: Path, echo: str) -> None:
    """`setup_worker` is what Ray runs first in each service process (runtime_env worker_process_setup_hook)."""
    done = _run(
        f"""
        import os, subprocess
        from cepo_services.common.logs import setup_worker
        setup_worker()
        print("worker says", flush=True)
        subprocess.run({CHILD!r}, check=True)
        """,
        tmp_path,
        {"CEPO_LOG_DIR": str(tmp_path / "logs"), "CEPO_LOG_ECHO": echo},
    )
    assert done.returncode == 0, done.stderr
    [log] = (tmp_path / "logs").glob("worker-*.log")
    text = log.read_text()
    assert "worker says" in text and "child stdout" in text and "child stderr" in text
    assert ("worker says" in done.stdout) is (echo == "1")  # echoed: Ray forwards it to the driver


def test_ray_worker_hook_without_a_log_dir_changes_nothing(tmp_path: Path) -> None:
    done = _run(
        "from cepo_services.common.logs import setup_worker\nsetup_worker()\nprint('plain')",
        tmp_path,
        {"CEPO_LOG_DIR": ""},
    )
    assert done.stdout == "plain\n" and not list(tmp_path.iterdir())


def test_progress_counts_and_estimates() -> None:
    assert [duration(s) for s in (0, 42.4, 185, 3725)] == ["0s", "42s", "3m05s", "1h02m"]
    progress = Progress(4)
    assert str(progress) == "0/4"  # no pace yet: no estimate
    progress._t0 -= 10.0  # one unit took 10 s
    assert progress.advance() == "1/4 · ETA 30s"
    progress.advance(3)
    assert str(progress).startswith("4/4 · ")  # done: the time it took, no ETA
    assert "ETA" not in str(progress)
    resumed = Progress(30, done=10)  # a resumed run: the earlier steps do not set the pace
    resumed.start()
    resumed._t0 -= 6.0
    assert resumed.advance() == "11/30 · ETA 1m54s"


def test_ticking_prints_one_line_when_not_a_terminal(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    with out.open("w") as fh:
        console = Console(file=fh, force_terminal=False)
        with ticking(console, "starting services") as update:
            update("still starting")
            time.sleep(0.01)
    assert out.read_text() == "starting services\n"
