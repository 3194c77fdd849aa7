"""The buffered ledger through a real Redis outage: redis-server is really stopped and started again on the same
port and data dir; no write raises, nothing is lost, order is kept, and a dead process's spool is replayed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import RestartableRedis, free_port

from cepo.ledger import BufferedLedger, LedgerError, RunLedger
from cepo.ledger.buffered import REJECTED_NAME, SPOOL_NAME

REPO = Path(__file__).resolve().parents[1]


def _report(step: int) -> dict:
    return {"step": step, "adapter_version": step + 1, "reward_mean": 0.1 * step, "accuracy": 0.5}


def _samples(step: int) -> list[dict]:
    return [{"prompt": f"p{step}", "response": f"r{step}", "answer": "1", "reward": 1.0, "correct": True}]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RestartableRedis]:
    with RestartableRedis(tmp_path / "redis") as srv:
        yield srv


def _prefix() -> str:
    return f"outage-{uuid.uuid4().hex[:8]}:"


def _start(buf: BufferedLedger, run_id: str, run_dir: Path) -> None:
    buf.start_run(run_id, name="tiny", method="cepo", config={"name": "tiny"}, run_dir=str(run_dir))


def test_outage_mid_run_loses_nothing(server: RestartableRedis, tmp_path: Path) -> None:
    run_dir, prefix, run_id, logs = tmp_path / "run", _prefix(), "run-outage", []
    buf = BufferedLedger(RunLedger(server.url, prefix=prefix), run_dir, log=logs.append, retry_interval_s=0.5)
    spool = run_dir / SPOOL_NAME
    _start(buf, run_id, run_dir)
    for step in (0, 1):
        buf.record_step(run_id, _report(step), _samples(step))
    assert buf.pending == 0 and not spool.exists() and logs == []

    server.stop()  # the process is gone: connection refused from here on
    started = time.monotonic()
    for step in (2, 3):
        buf.record_step(run_id, _report(step), _samples(step))  # no exception: queued
    buf.add_checkpoint(run_id, 4, str(run_dir / "checkpoints" / "step_00004"))
    assert time.monotonic() - started < 5.0  # a dead Redis costs little per write
    assert buf.down and buf.pending == 3 and buf.queued == 3 and buf.replayed == 0
    spooled = [json.loads(line) for line in spool.read_text().splitlines()]
    assert [(e["op"], e["args"].get("report", {}).get("step")) for e in spooled] == [
        ("record_step", 2),
        ("record_step", 3),
        ("add_checkpoint", None),
    ]
    assert len(logs) == 1 and "unreachable" in logs[0] and f"127.0.0.1:{server.port}" in logs[0]

    restarted_at = time.time()
    server.start()  # same port, same data dir: the first two steps survived the restart
    time.sleep(0.6)  # past the retry interval, so the next write tries Redis again
    buf.record_step(run_id, _report(4), _samples(4))
    assert buf.pending == 0 and buf.replayed == 3 and not buf.down
    assert not spool.exists() and not (run_dir / "ledger_spool.replayed").exists()
    assert len(logs) == 2 and "is back" in logs[1] and "replayed 3 queued write(s)" in logs[1]
    buf.finish(run_id)
    assert buf.flush(timeout_s=5.0)
    buf.close()

    with RunLedger(server.url, prefix=prefix) as reader:
        record = reader.get_run(run_id)
        assert record["status"] == "finished" and record["step"] == 5 and record["policy_version"] == 5
        assert [c["step"] for c in record["checkpoints"]] == [4]
        assert record["checkpoints"][0]["path"].endswith("step_00004")
        steps = reader.steps(run_id)
        assert [s["report"]["step"] for s in steps] == [0, 1, 2, 3, 4]
        assert [s["samples"][0]["prompt"] for s in steps] == ["p0", "p1", "p2", "p3", "p4"]
        # replayed writes keep the time they were made, during the outage
        assert record["checkpoints"][0]["at"] < restarted_at < record["finished_at"]
    assert not (run_dir / REJECTED_NAME).exists()


def test_no_retry_storm_while_down(server: RestartableRedis, tmp_path: Path) -> None:
    run_dir, prefix, run_id = tmp_path / "run", _prefix(), "run-storm"
    ledger = RunLedger(server.url, prefix=prefix)
    buf = BufferedLedger(ledger, run_dir, log=lambda _m: None, retry_interval_s=60.0)
    _start(buf, run_id, run_dir)
    attempts = []
    real_record_step = ledger.record_step

    def counting(*args, **kwargs):
        attempts.append(args[1]["step"])
        return real_record_step(*args, **kwargs)

    ledger.record_step = counting
    server.stop()
    started = time.monotonic()
    for step in range(20):
        buf.record_step(run_id, _report(step), _samples(step))
    assert time.monotonic() - started < 5.0
    assert attempts == [0] and buf.pending == 20  # one attempt, then only queueing until the interval is up
    assert not buf.flush(timeout_s=0)  # flush tries once more (Redis is still down) and keeps everything
    assert attempts == [0, 0] and buf.pending == 20
    server.start()
    assert buf.flush(timeout_s=10.0) and buf.pending == 0
    assert attempts == [0, 0, *range(20)]
    assert [s["report"]["step"] for s in ledger.steps(run_id)] == list(range(20))
    buf.close()


def test_hung_redis_costs_about_one_timeout(server: RestartableRedis, tmp_path: Path) -> None:
    """A Redis that accepts connections but never answers (SIGSTOP): one socket timeout per attempt, not
    redis-py's default ten retries with back-off."""
    run_dir, prefix, run_id = tmp_path / "run", _prefix(), "run-hung"
    buf = BufferedLedger(RunLedger(server.url, prefix=prefix, timeout_s=0.5), run_dir, log=lambda _m: None)
    _start(buf, run_id, run_dir)
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        buf.record_step(run_id, _report(0), _samples(0))
        assert time.monotonic() - started < 1.6  # 0.5 s timeout (+ slack on a busy machine)
        assert buf.pending == 1 and buf.down
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert buf.flush(timeout_s=10.0)
    assert [s["report"]["step"] for s in buf.ledger.steps(run_id)] == [0]
    buf.close()


def test_bad_writes_still_raise_at_once(server: RestartableRedis, tmp_path: Path) -> None:
    run_dir, prefix, run_id = tmp_path / "run", _prefix(), "run-bad"
    buf = BufferedLedger(RunLedger(server.url, prefix=prefix), run_dir, log=lambda _m: None)
    _start(buf, run_id, run_dir)
    with pytest.raises(LedgerError, match="step report cannot be recorded"):
        buf.record_step(run_id, {"no_step": 1}, [])
    with pytest.raises(LedgerError, match="no run 'nobody'"):  # Redis up: the ledger's own refusal, as before
        buf.record_step("nobody", _report(0), [])
    server.stop()
    with pytest.raises(LedgerError, match="step report cannot be recorded"):
        buf.record_step(run_id, {"step": 0, "x": object()}, [])
    with pytest.raises(LedgerError, match="run status must be one of"):
        buf.finish(run_id, "exploded")
    assert buf.pending == 0 and not (run_dir / SPOOL_NAME).exists()
    buf.close()


def test_refused_replay_is_kept_not_raised(server: RestartableRedis, tmp_path: Path) -> None:
    """A queued write Redis refuses on replay (its run record is gone) is logged and kept, never raised."""
    run_dir, prefix, logs = tmp_path / "run", _prefix(), []
    buf = BufferedLedger(RunLedger(server.url, prefix=prefix), run_dir, log=logs.append, retry_interval_s=0)
    _start(buf, "run-real", run_dir)
    server.stop()
    buf.record_step("run-ghost", _report(0), [])  # Redis is down: queued, not checked
    buf.record_step("run-real", _report(0), [])
    server.start()
    assert buf.flush(timeout_s=10.0)
    assert buf.dropped == 1 and buf.replayed == 1 and buf.pending == 0
    rejected = [json.loads(line) for line in (run_dir / REJECTED_NAME).read_text().splitlines()]
    assert rejected[0]["run_id"] == "run-ghost" and "no run 'run-ghost'" in rejected[0]["refused"]
    assert any("refused a queued record_step" in line for line in logs)
    assert [s["report"]["step"] for s in buf.ledger.steps("run-real")] == [0]
    buf.close()


_DYING_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from cepo.ledger import BufferedLedger, RunLedger

    url, prefix, run_dir, stop_file = sys.argv[1:5]
    buf = BufferedLedger(RunLedger(url, prefix=prefix), run_dir, log=print, retry_interval_s=60)
    buf.start_run("run-dies", name="tiny", method="cepo", config={}, run_dir=run_dir)
    buf.record_step("run-dies", {"step": 0, "adapter_version": 1}, [])
    open(stop_file, "w").close()  # the parent stops Redis now
    while os.path.exists(stop_file):
        time.sleep(0.01)
    for step in (1, 2, 3):
        buf.record_step("run-dies", {"step": step, "adapter_version": step + 1}, [])
    buf.add_checkpoint("run-dies", 3, "ckpt/step_00003")
    print("pending", buf.pending, flush=True)
    os._exit(1)  # dies: no flush, no clean-up
    """
)


def test_spool_of_a_dead_process_is_replayed(server: RestartableRedis, tmp_path: Path) -> None:
    run_dir, prefix, stop_file = tmp_path / "run", _prefix(), tmp_path / "stop-redis-now"
    run_dir.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", _DYING_WRITER, server.url, prefix, str(run_dir), str(stop_file)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not stop_file.exists():
            assert child.poll() is None, child.stdout.read()
            assert time.monotonic() < deadline, "the writer never got to its first step"
            time.sleep(0.05)
        server.stop()
        stop_file.unlink()
        out, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 1 and "pending 4" in out, out
    spool = run_dir / SPOOL_NAME
    assert len(spool.read_text().splitlines()) == 4
    with spool.open("a") as fh:  # a crash in the middle of a spool write leaves half a line
        fh.write('{"op": "record_step", "run_id": "run-d')

    server.start()
    logs: list[str] = []
    buf = BufferedLedger(RunLedger(server.url, prefix=prefix), run_dir, log=logs.append)
    assert buf.pending == 0 and buf.replayed == 4 and buf.dropped == 1
    assert not spool.exists()
    assert any("replayed 4 write(s)" in line and "earlier process" in line for line in logs)
    assert '"run-d' in (run_dir / REJECTED_NAME).read_text()  # the half line, kept for a human to look at
    buf.finish("run-dies")
    record = buf.ledger.get_run("run-dies")
    assert record["status"] == "finished" and record["step"] == 4
    assert [c["step"] for c in record["checkpoints"]] == [3]
    assert [s["report"]["step"] for s in buf.ledger.steps("run-dies")] == [0, 1, 2, 3]
    buf.close()


def test_partly_replayed_spool_resumes_after_the_replayed_lines(
    server: RestartableRedis, tmp_path: Path
) -> None:
    """A process that died in the middle of a replay: the lines it already stored are not sent twice."""
    run_dir, prefix = tmp_path / "run", _prefix()
    run_dir.mkdir()
    with RunLedger(server.url, prefix=prefix) as led:
        led.start_run("run-half", name="t", method="cepo", config={}, run_dir=str(run_dir))
        led.record_step("run-half", _report(0), [])
        led.record_step("run-half", _report(1), [])  # replayed before the crash
    lines = [
        json.dumps(
            {
                "op": "record_step",
                "run_id": "run-half",
                "at": time.time(),
                "args": {"report": _report(s), "samples": []},
            }
        )
        for s in (1, 2, 3)
    ]
    (run_dir / SPOOL_NAME).write_text("".join(line + "\n" for line in lines))
    (run_dir / "ledger_spool.replayed").write_text("1\n")
    buf = BufferedLedger(RunLedger(server.url, prefix=prefix), run_dir, log=lambda _m: None)
    assert buf.replayed == 2 and buf.pending == 0 and not (run_dir / SPOOL_NAME).exists()
    assert [s["report"]["step"] for s in buf.ledger.steps("run-half")] == [0, 1, 2, 3]
    buf.close()


def test_start_of_run_still_fails_fast() -> None:
    """The controller connects with RunLedger(url) first: an unreachable Redis is a clear error at once."""
    port = free_port()
    started = time.monotonic()
    with pytest.raises(
        LedgerError, match=rf"logging\.redis_url redis://127\.0\.0\.1:{port}/0: cannot reach Redis"
    ):
        RunLedger(f"redis://127.0.0.1:{port}/0")
    assert time.monotonic() - started < 3.0
