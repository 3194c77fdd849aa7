"""The run ledger against a real redis-server, and the run-folder readers / CLI views."""

from __future__ import annotations

import io
import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from servers import free_port

from cepo.ledger import (
    LedgerError,
    RunLedger,
    cli_list,
    cli_show,
    list_run_folders,
    mask_url,
    read_run_folder,
    resolve_run,
    run_details,
    runs_table,
)


def _report(step: int, **extra) -> dict:
    report = {
        "step": step,
        "policy_version": step + 1,
        "method": "cepo",
        "lam": 0.5 - 0.01 * step,
        "reward_mean": 0.25 + 0.1 * step,
        "accuracy": 0.3 + 0.1 * step,
        "zero_variance_groups": 1,
        "groups": 4,
        "tokens": 512,
        "stage_seconds": {"rollout": 1.5, "learner": 2.0},
        "step_seconds": 4.25,
        "tokens_per_s": 120.5,
        "delta_pos_frac": 0.6,
        "delta_neg_frac": 0.4,
    }
    report.update(extra)
    return report


SAMPLE = {
    "prompt": "What is 2+3?",
    "response": "2+3=5. #### 5",
    "answer": "5",
    "reward": 1.0,
    "correct": True,
}


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200, color_system=None), buf


@pytest.fixture
def ledger(redis_url: str) -> Iterator[RunLedger]:
    """A ledger under a key prefix of its own, so tests do not see each other's runs."""
    led = RunLedger(redis_url, prefix=f"test-{uuid.uuid4().hex[:8]}:")
    try:
        yield led
    finally:
        keys = list(led._r.scan_iter(match=f"{led.prefix}*"))
        if keys:
            led._r.delete(*keys)
        led.close()


def _start(ledger: RunLedger, run_id: str, **kw) -> None:
    ledger.start_run(
        run_id,
        name=kw.get("name", "tiny"),
        method=kw.get("method", "cepo"),
        config=kw.get("config", {"name": "tiny", "algorithm": {"method": "cepo", "steps": 3}}),
        run_dir=kw.get("run_dir", f"runs/{run_id}"),
    )


# ---------------------------------------------------------------------------------------------- Redis
def test_round_trip(ledger: RunLedger) -> None:
    config = {"name": "tiny", "algorithm": {"method": "cepo", "lambda0": 0.5}, "logging": {"redis_url": None}}
    ledger.start_run("run-a", name="tiny", method="cepo", config=config, run_dir="runs/run-a")
    rec = ledger.get_run("run-a")
    assert rec["status"] == "running" and rec["step"] == 0 and rec["policy_version"] == -1
    assert rec["config"] == config and rec["checkpoints"] == [] and rec["last_metrics"] is None

    for step in range(3):
        ledger.record_step("run-a", _report(step), [SAMPLE] if step != 1 else [])
    ledger.add_checkpoint("run-a", 2, "runs/run-a/checkpoints/step_00002")
    ledger.add_checkpoint("run-a", 3, "runs/run-a/checkpoints/step_00003")
    ledger.finish("run-a")

    rec = ledger.get_run("run-a")
    assert rec["id"] == "run-a" and rec["name"] == "tiny" and rec["method"] == "cepo"
    assert rec["status"] == "finished" and rec["error"] is None
    assert rec["step"] == 3 and rec["policy_version"] == 3
    assert rec["last_metrics"] == _report(2)
    assert rec["run_dir"] == "runs/run-a"
    assert rec["started_at"] <= rec["updated_at"] <= rec["finished_at"]
    assert [(c["step"], c["path"]) for c in rec["checkpoints"]] == [
        (2, "runs/run-a/checkpoints/step_00002"),
        (3, "runs/run-a/checkpoints/step_00003"),
    ]

    entries = ledger.steps("run-a")
    assert [e["report"]["step"] for e in entries] == [0, 1, 2]
    assert entries[0]["samples"] == [SAMPLE] and entries[1]["samples"] == []
    assert entries[2]["report"]["stage_seconds"] == {"rollout": 1.5, "learner": 2.0}
    assert [e["report"]["step"] for e in ledger.steps("run-a", 2)] == [1, 2]
    assert ledger.steps("run-a", 0) == []

    (row,) = ledger.list_runs()
    assert row["id"] == "run-a" and row["step"] == 3 and row["status"] == "finished" and "config" not in row

    # Rendering works on real records.
    console, buf = _console()
    console.print(runs_table(ledger.list_runs()))
    console.print(run_details(rec, entries))
    out = buf.getvalue()
    assert "run-a" in out and "step_00003" in out and "What is 2+3?" in out and "0.600" in out


def test_stream_is_capped(redis_url: str) -> None:
    led = RunLedger(redis_url, prefix=f"test-{uuid.uuid4().hex[:8]}:", stream_maxlen=5)
    try:
        _start(led, "capped")
        for step in range(300):
            led.record_step("capped", _report(step), [])
        assert led._r.xlen(led.steps_key("capped")) < 300  # MAXLEN ~ trims by whole macro nodes
        assert led.steps("capped", 1)[0]["report"]["step"] == 299
    finally:
        led._r.delete(*led._r.scan_iter(match=f"{led.prefix}*"))
        led.close()


def test_newest_first(ledger: RunLedger) -> None:
    for run_id in ("first", "second", "third"):
        _start(ledger, run_id)
        time.sleep(0.01)
    assert [r["id"] for r in ledger.list_runs()] == ["third", "second", "first"]
    assert [r["id"] for r in ledger.list_runs(limit=2)] == ["third", "second"]
    assert ledger.list_runs(limit=0) == []


def test_record_step_is_atomic(ledger: RunLedger) -> None:
    _start(ledger, "atomic")
    ledger.record_step("atomic", _report(0), [SAMPLE])
    before_hash = ledger._r.hgetall(ledger.run_key("atomic"))
    before_len = ledger._r.xlen(ledger.steps_key("atomic"))

    with pytest.raises(LedgerError, match="atomic"):
        ledger.record_step("atomic", _report(1, bad=object()), [SAMPLE])
    with pytest.raises(LedgerError):
        ledger.record_step("atomic", _report(1), [{"prompt": "p", "response": b"bytes"}])

    assert ledger._r.hgetall(ledger.run_key("atomic")) == before_hash
    assert ledger._r.xlen(ledger.steps_key("atomic")) == before_len == 1

    # A step for a run that was never started creates nothing.
    with pytest.raises(LedgerError, match="ghost"):
        ledger.record_step("ghost", _report(0), [])
    assert not ledger._r.exists(ledger.run_key("ghost"), ledger.steps_key("ghost"))


def test_unknown_and_ambiguous_prefix(ledger: RunLedger) -> None:
    for run_id in ("cepo-20250101-120000", "cepo-20250101-130000", "grpo-20250102-090000"):
        _start(ledger, run_id)
    assert ledger.get_run("grpo")["id"] == "grpo-20250102-090000"
    assert ledger.get_run("cepo-20250101-12")["id"] == "cepo-20250101-120000"

    with pytest.raises(LedgerError) as info:
        ledger.get_run("cepo-2025")
    msg = str(info.value)
    assert "cepo-2025" in msg and "ambiguous" in msg
    assert "cepo-20250101-120000" in msg and "cepo-20250101-130000" in msg

    with pytest.raises(LedgerError) as info:
        ledger.get_run("cepo-20250101-140000")
    msg = str(info.value)
    assert "cepo-20250101-140000" in msg and "close matches" in msg and "cepo-20250101-120000" in msg

    with pytest.raises(LedgerError, match="nothing-like-it"):
        ledger.get_run("nothing-like-it")


def test_unreachable_url_fails_fast() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(LedgerError) as info:
        RunLedger(f"redis://:s3cret@127.0.0.1:{port}/0")
    assert time.monotonic() - started < 5.0
    msg = str(info.value)
    assert "logging.redis_url" in msg and f"127.0.0.1:{port}" in msg and "cannot reach Redis" in msg
    assert "s3cret" not in msg and "***" in msg

    with pytest.raises(LedgerError, match=r"logging\.redis_url http://localhost:6379"):
        RunLedger("http://localhost:6379/0")


def test_mask_url() -> None:
    assert mask_url("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"
    assert mask_url("redis://localhost:6379/0") == "redis://localhost:6379/0"


def test_running_restart_refused(ledger: RunLedger) -> None:
    _start(ledger, "busy")
    ledger.record_step("busy", _report(0), [SAMPLE])
    with pytest.raises(LedgerError, match=r"'busy' is already running"):
        _start(ledger, "busy", name="other")
    assert ledger.get_run("busy")["name"] == "tiny"
    assert len(ledger.steps("busy")) == 1

    ledger.finish("busy", "interrupted")
    _start(ledger, "busy", name="again")  # a finished id may be reused: the old record is replaced
    rec = ledger.get_run("busy")
    assert rec["name"] == "again" and rec["status"] == "running" and rec["step"] == 0
    assert ledger.steps("busy") == [] and rec["checkpoints"] == []
    assert [r["id"] for r in ledger.list_runs()] == ["busy"]


def test_finish_failed_with_error(ledger: RunLedger) -> None:
    _start(ledger, "boom")
    ledger.finish("boom", "failed", error="RuntimeError: rollout replica 1 died")
    rec = ledger.get_run("boom")
    assert rec["status"] == "failed" and rec["error"] == "RuntimeError: rollout replica 1 died"
    assert rec["finished_at"] is not None
    with pytest.raises(LedgerError, match="status"):
        ledger.finish("boom", "exploded")
    with pytest.raises(LedgerError, match="nope"):
        ledger.finish("nope")

    console, buf = _console()
    console.print(run_details(rec))
    assert "rollout replica 1 died" in buf.getvalue()


# ---------------------------------------------------------------------------------------------- folders
def _write_run_folder(folder: Path, *, finished: bool = True) -> Path:
    folder.mkdir(parents=True)
    config = {"name": "tiny", "seed": 1, "algorithm": {"method": "cepo", "steps": 2}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    lines = [json.dumps(_report(0)), json.dumps(_report(1))]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "checkpoints" / "step_00002" / "adapter").mkdir(parents=True)
    (folder / "checkpoints" / "step_00003.tmp").mkdir()  # half-written: not a checkpoint
    if finished:
        (folder / "summary.json").write_text(json.dumps({"run_dir": str(folder), "steps": 2}))
    return folder


def test_folder_readers(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    done = _write_run_folder(root / "tiny-20250101-120000")
    _write_run_folder(root / "tiny-20250101-130000", finished=False)
    (root / "not-a-run").mkdir()

    rows = list_run_folders(root)
    assert {r["id"] for r in rows} == {"tiny-20250101-120000", "tiny-20250101-130000"}
    by_id = {r["id"]: r for r in rows}
    row = by_id["tiny-20250101-120000"]
    assert row["name"] == "tiny" and row["method"] == "cepo" and row["status"] == "finished"
    assert row["step"] == 2 and row["policy_version"] == 2 and row["run_dir"] == str(done)
    assert row["last_metrics"]["accuracy"] == pytest.approx(0.4)
    assert by_id["tiny-20250101-130000"]["status"] == "incomplete"

    rec = read_run_folder(done)
    assert rec["config"]["algorithm"] == {"method": "cepo", "steps": 2}
    assert [c["step"] for c in rec["checkpoints"]] == [2]
    assert rec["checkpoints"][0]["path"].endswith("step_00002")
    assert rec["summary"] == {"run_dir": str(done), "steps": 2}

    assert list_run_folders(tmp_path / "missing") == []


def test_folder_missing_errors(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match=re.escape(str(tmp_path / "nope"))):
        read_run_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LedgerError, match=r"config\.yaml"):
        read_run_folder(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_folders(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    folder = _write_run_folder(root / "tiny-20250101-120000")

    console, buf = _console()
    cli_list(None, root, 10, console)
    assert "tiny-20250101-120000" in buf.getvalue() and "finished" in buf.getvalue()

    console, buf = _console()
    cli_show("tiny-2025", None, root, 5, console)  # unique prefix among the folders
    out = buf.getvalue()
    assert "tiny-20250101-120000" in out and "step_00002" in out and "last 2 steps" in out

    console, buf = _console()
    cli_show(str(folder), None, tmp_path / "elsewhere", 5, console)  # a folder path
    assert "tiny-20250101-120000" in buf.getvalue()

    with pytest.raises(LedgerError, match="tiny-2024"):
        cli_show("tiny-2024", None, root, 5, console)
    with pytest.raises(LedgerError, match="missing"):
        cli_show(str(tmp_path / "missing"), None, root, 5, console)

    console, buf = _console()
    cli_list(None, tmp_path / "none", 10, console)
    assert "no runs" in buf.getvalue()


def _write_eval(folder: Path, rows: dict[int, dict[str, float]]) -> None:
    lines = [
        json.dumps(
            {"step": step, "policy_version": step, "suite": suite, "n": 16, "samples": 1, "sampled": acc}
        )
        for step, suites in rows.items()
        for suite, acc in suites.items()
    ]
    (folder / "eval.jsonl").write_text("\n".join(lines) + "\n")


def test_nested_run_folders_and_held_out_accuracy(tmp_path: Path) -> None:
    """`cepo compare` nests runs (OUT/<method>/seed<k>/); finished runs show summary.json's held-out average,
    unfinished ones the latest evaluation in eval.jsonl."""
    root = tmp_path / "runs"
    top = _write_run_folder(root / "tiny-20250101-120000")
    (top / "summary.json").write_text(
        json.dumps(
            {
                "steps": 2,
                "base": {"test": 0.4, "unseen_mix": 0.2, "average": 0.3},
                "trained": {"test": 0.6, "unseen_mix": 0.4, "average": 0.5},
                "base_greedy": {"test": 0.9, "average": 0.9},
                "trained_greedy": {"test": 0.8, "average": 0.8},
            }
        )
    )
    nested = _write_run_folder(root / "cmp" / "cepo" / "seed0", finished=False)
    _write_eval(nested, {0: {"test": 0.5, "unseen_mix": 0.25}, 1: {"test": 0.75, "unseen_mix": 0.25}})
    (root / "cmp" / "table.md").write_text("| method |\n")  # the comparison's own files: not a run
    _write_run_folder(root / ".hidden" / "x")  # hidden folders are not searched
    (nested / "steps").mkdir()  # a run's own sub-folders are not searched either
    (nested / "steps" / "config.yaml").write_text("name: not-a-run\n")

    rows = {r["id"]: r for r in list_run_folders(root)}
    assert set(rows) == {"tiny-20250101-120000", "cmp/cepo/seed0"}
    assert rows["cmp/cepo/seed0"]["run_dir"] == str(nested)
    assert rows["tiny-20250101-120000"]["heldout"] == {
        "accuracy": 0.5,
        "base": 0.3,
        "greedy": 0.8,
        "base_greedy": 0.9,
        "step": 2,
    }
    held = rows["cmp/cepo/seed0"]["heldout"]
    assert held["accuracy"] == 0.5 and held["base"] == 0.375 and held["step"] == 1 and held["greedy"] is None

    console, buf = _console()
    cli_list(None, root, 10, console)
    out = buf.getvalue()
    assert "held-out" in out and "cmp/cepo/seed0" in out
    assert "0.300 → 0.500 @2" in out and "0.375 → 0.500 @1" in out

    console, buf = _console()
    cli_show("cmp/cepo/seed0", None, root, 5, console)  # a nested run's id, relative to the root
    out = buf.getvalue()
    assert "cmp/cepo/seed0" in out and "0.375 → 0.500 @1" in out
    console, buf = _console()
    cli_show("tiny-2025", None, root, 5, console)
    assert "held-out (greedy)" in buf.getvalue() and "0.900 → 0.800 @2" in buf.getvalue()


def test_resolve_run_by_path_or_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One resolver for every command: a folder path, or an id under the root (nested, a unique prefix, the
    id after a leading ROOT/, a unique tail), else one error naming close matches."""
    root = tmp_path / "runs"
    top = _write_run_folder(root / "tiny-20250101-120000")
    seeds = [_write_run_folder(root / "cmp" / m / "seed0") for m in ("cepo", "grpo")]
    seed10 = _write_run_folder(root / "cmp" / "cepo" / "seed10")
    assert resolve_run(top, root) == top  # a path
    assert resolve_run(str(seeds[0]), tmp_path / "elsewhere") == seeds[0]
    assert resolve_run("tiny-20250101-120000", root) == top  # an id
    assert resolve_run("tiny-2025", root) == top  # a unique prefix
    assert resolve_run("cmp/cepo/seed0", root) == seeds[0]  # exact, though seed10 shares the prefix
    assert resolve_run("cmp/grpo", root) == seeds[1]
    assert resolve_run("grpo/seed0", root) == seeds[1]  # a unique tail
    assert resolve_run("seed10", root) == seed10
    # an existing folder is taken as it is: the command says what it lacks
    assert resolve_run(root / "cmp", root) == root / "cmp"
    with pytest.raises(LedgerError, match=r"ambiguous .*: cmp/cepo/seed0, cmp/grpo/seed0$"):
        resolve_run("seed0", root)
    with pytest.raises(LedgerError) as err:
        resolve_run("cmp/cepo/sead0", root)
    assert str(err.value) == (
        f"no run 'cmp/cepo/sead0': no such folder, and no run id under {root} matches it; "
        "close matches: cmp/cepo/seed0, cmp/cepo/seed10, cmp/grpo/seed0"
    )
    with pytest.raises(
        LedgerError, match=rf"no run folder {re.escape(str(tmp_path / 'gone'))}: no such folder$"
    ):
        resolve_run(tmp_path / "gone", root)  # an absolute path is not looked up as an id
    with pytest.raises(LedgerError, match="holds no run folders"):
        resolve_run("x", tmp_path / "empty-root")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(LedgerError, match="a file, not a run folder"):
        resolve_run(tmp_path / "file.txt", root)
    monkeypatch.chdir(tmp_path)  # the default root: runs/ of the working directory
    assert resolve_run("runs/tiny-2025", "runs") == Path("runs") / "tiny-20250101-120000"
    assert resolve_run("cepo/seed10") == Path("runs") / "cmp" / "cepo" / "seed10"
    with pytest.raises(LedgerError, match=r"run folders below it: cmp/cepo/seed0, .*tiny-20250101-120000"):
        read_run_folder("runs")


def test_runs_show_numbers_steps_as_the_console_does(tmp_path: Path) -> None:
    """Step reports count from 0 in metrics.jsonl; `runs show` names the k-th step k, as the console does,
    and checkpoints / held-out by the steps done before them."""
    root = tmp_path / "runs"
    folder = _write_run_folder(root / "cmp" / "cepo" / "seed0")
    lines = [json.dumps(_report(0)), json.dumps(_report(1, samples=[SAMPLE]))]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    _write_eval(folder, {0: {"test": 0.5}, 2: {"test": 0.75}})
    for name in ("cmp/cepo/seed0", "cepo/seed0", str(folder)):
        console, buf = _console()
        cli_show(name, None, root, 5, console)
        out = buf.getvalue()
        assert "run cmp/cepo/seed0" in out, name  # the id `runs list` shows, however it was named
        assert re.search(r"steps done\s+2\b", out) and "after step" in out
        steps = re.search(r"last 2 steps(.*?)sample rollout", out, re.S).group(1)
        assert [int(n) for n in re.findall(r"^│\s+(\d+) │", steps, re.M)] == [1, 2]
        assert "sample rollout (step 2)" in out
        assert re.search(r"│ step\s+│\s+2 │", out)  # last metrics: the 2nd step, not its stored 1
        assert "0.500 → 0.750 @2" in out  # held-out after 2 steps


def test_cli_redis(redis_url: str) -> None:
    run_id = f"cli-{uuid.uuid4().hex[:10]}"
    with RunLedger(redis_url) as led:
        _start(led, run_id)
        led.record_step(run_id, _report(0), [SAMPLE])
        led.add_checkpoint(run_id, 1, f"runs/{run_id}/checkpoints/step_00001")
    try:
        console, buf = _console()
        cli_list(redis_url, Path("runs"), 50, console)
        assert run_id in buf.getvalue()

        console, buf = _console()
        cli_show(run_id[:-2], redis_url, Path("runs"), 3, console)
        out = buf.getvalue()
        assert run_id in out and "step_00001" in out and "What is 2+3?" in out
    finally:
        with RunLedger(redis_url) as led:
            led._r.delete(led.run_key(run_id), led.checkpoints_key(run_id), led.steps_key(run_id))
            led._r.zrem(led.runs_key, run_id)

    with pytest.raises(LedgerError, match=r"logging\.redis_url"):
        cli_list(f"redis://127.0.0.1:{free_port()}/0", Path("runs"), 5, console)


def test_resolve_run_by_redis_id(redis_url: str, tmp_path: Path) -> None:
    """The id `runs list --redis` shows (name-time-pid) names the run too, when its folder is on this machine."""
    tag = uuid.uuid4().hex[:8]
    folder = _write_run_folder(tmp_path / "runs" / "tiny-20250101-120000")
    here, gone = f"here-{tag}-4242", f"gone-{tag}-1111"
    with RunLedger(redis_url) as led:
        _start(led, here, run_dir=str(folder))
        _start(led, gone, run_dir=str(tmp_path / "elsewhere"))
    root = tmp_path / "no-runs"
    try:
        assert resolve_run(here, root, redis_url) == folder
        assert resolve_run(f"here-{tag}", root, redis_url) == folder  # a unique prefix
        with pytest.raises(LedgerError, match=r"its run folder .*elsewhere is not on this machine"):
            resolve_run(gone, root, redis_url)
        with pytest.raises(
            LedgerError, match=rf"no run 'nope-{tag}'.*no run 'nope-{tag}' in the Redis ledger"
        ):
            resolve_run(f"nope-{tag}", root, redis_url)
    finally:
        with RunLedger(redis_url) as led:
            for run_id in (here, gone):
                led._r.delete(led.run_key(run_id), led.checkpoints_key(run_id), led.steps_key(run_id))
                led._r.zrem(led.runs_key, run_id)
