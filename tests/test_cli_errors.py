"""User-facing errors of the ``cepo`` command: one literal ``error:`` line, exit code 2, no traceback on the
terminal (it goes to the error log); bugs keep their traceback; Ctrl-C is one line and exit code 130."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from servers import free_port

REPO = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CEPO_REDIS_URL", "CEPO_ERROR_LOG")}
    env.update(
        CEPO_ERROR_LOG=str(tmp_path / "error.log"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONWARNINGS="ignore",
        COLUMNS="80",
    )
    env.update(extra)
    return env


def _cepo(tmp_path: Path, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cepo.cli", *args],
        cwd=REPO,
        env=_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _one_error(done: subprocess.CompletedProcess, rc: int = 2) -> str:
    """The single ``error:`` line of a clean failure (asserting everything else about it)."""
    both = done.stdout + done.stderr
    assert done.returncode == rc, both
    assert "Traceback" not in both and "╭" not in both, both  # neither a plain nor a rich traceback
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    return errors[0]


def _traceback_note(done: subprocess.CompletedProcess, log: Path) -> None:
    assert f"(traceback: {log})" in done.stderr.splitlines(), done.stderr
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "command: cepo " in text


# ---------------------------------------------------------------------------------------------- data


def test_bad_data_row_is_one_line(tmp_path: Path) -> None:
    data = tmp_path / "bad[rows].jsonl"  # brackets in the name must survive (no rich markup)
    data.write_text(
        json.dumps({"problem": "1+1?", "answer": "2"})
        + "\n"
        + json.dumps({"problem": 5, "answer": "x"})
        + "\n"
    )
    done = _cepo(
        tmp_path,
        "train",
        "-c",
        "configs/tiny.yaml",
        "--set",
        "data.source=jsonl",
        "--set",
        f"data.path={data}",
        "--run-dir",
        str(tmp_path / "run"),
    )
    line = _one_error(done)
    assert str(data) in line and "line 2" in line and "'problem'" in line, line
    _traceback_note(done, tmp_path / "error.log")
    assert "DataError" in (tmp_path / "error.log").read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "run") == ["bad[rows].jsonl", "error.log"]


# ---------------------------------------------------------------------------------------------- Redis


def test_unreachable_redis_runs_list(tmp_path: Path) -> None:
    port = free_port()
    done = _cepo(tmp_path, "runs", "list", "--redis", f"redis://127.0.0.1:{port}/0", timeout=60)
    line = _one_error(done)
    assert f"logging.redis_url redis://127.0.0.1:{port}/0: cannot reach Redis" in line, line


def test_unreachable_redis_train(tmp_path: Path) -> None:
    """The ledger is reached before any service starts: a LedgerError from deep inside ``train``."""
    port = free_port()
    started = time.monotonic()
    done = _cepo(
        tmp_path,
        "train",
        "-c",
        "configs/tiny.yaml",
        "--set",
        f"logging.redis_url=redis://127.0.0.1:{port}/0",
        "--run-dir",
        str(tmp_path / "run"),
    )
    line = _one_error(done)
    assert f"logging.redis_url redis://127.0.0.1:{port}/0: cannot reach Redis" in line, line
    _traceback_note(done, tmp_path / "error.log")
    assert "LedgerError" in (tmp_path / "error.log").read_text()
    assert time.monotonic() - started < 90


def test_train_with_an_unreachable_hub_model_fails_at_once(tmp_path: Path) -> None:
    """A Hub id that is not cached, offline: one line naming model.path before any service starts."""
    started = time.monotonic()
    done = _cepo(
        tmp_path,
        "train",
        "-c",
        "configs/tiny.yaml",
        "--set",
        "model.path=some-org/not-cached-model",
        "--run-dir",
        str(tmp_path / "run"),
        HF_HUB_OFFLINE="1",
    )
    line = _one_error(done)
    assert "model.path some-org/not-cached-model" in line and "HF_HUB_OFFLINE" in line, line
    assert "services up" not in done.stdout and time.monotonic() - started < 60
    assert not (tmp_path / "run" / "config.yaml").exists()  # no run was recorded


# ---------------------------------------------------------------------------------------------- markup


def test_brackets_are_printed_literally(tmp_path: Path) -> None:
    done = _cepo(tmp_path, "config", "validate", "--set", "name=[unclosed", timeout=60)
    line = _one_error(done)
    assert "value '[unclosed' is not valid YAML" in line and "line 1, column 10" in line, line
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # the YAML problem on the same line

    done = _cepo(tmp_path, "config", "validate", "--set", "data.split=[x]", "--set", "data.source=bogus")
    line = _one_error(done)
    assert "--set data.split=[x] data.source=bogus" in line, line
    assert "  data.split: Input should be a valid string (got ['x'])" in done.stderr.splitlines()

    config = tmp_path / "[cfg].yaml"
    done = _cepo(tmp_path, "config", "show", "-c", str(config), timeout=60)
    assert f"config file {config} does not exist" in _one_error(done)


def test_cli_runner_still_drives_app() -> None:
    from typer.testing import CliRunner

    from cepo.cli import app

    done = CliRunner().invoke(app, ["config", "show", "--set", "name='[a]'"])
    assert done.exit_code == 0 and "name: '[a]'" in done.output
    done = CliRunner().invoke(app, ["config", "validate", "--set", "name=[oops"])
    assert done.exit_code == 2 and "'[oops'" in done.output


# ---------------------------------------------------------------------------------------------- model path


def test_eval_missing_model_path_is_quick_and_clean(tmp_path: Path) -> None:
    started = time.monotonic()
    done = _cepo(
        tmp_path,
        "eval",
        "--model",
        "/nonexistent",
        "--backend",
        "transformers",
        "--suites",
        "test",
        "--size",
        "1",
        "-c",
        "configs/tiny.yaml",
        timeout=60,
    )
    assert time.monotonic() - started < 30
    line = _one_error(done)
    assert line == (
        "error: model.path /nonexistent: no such folder (a local Hugging Face model folder with config.json)"
    )


def test_check_model_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cepo.config import check_model_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "file.bin").write_text("x")
    check_model_path(str(tmp_path / "model"))
    check_model_path("model")
    check_model_path("Qwen/Qwen3-VL-2B-Instruct")  # a Hub id: left to the loaders
    with pytest.raises(FileNotFoundError, match=r"no config\.json in that folder"):
        check_model_path("empty")
    with pytest.raises(FileNotFoundError, match="a file, not a folder"):
        check_model_path("file.bin")
    with pytest.raises(FileNotFoundError, match=r"model\.path empty/tiny: no such folder"):
        check_model_path("empty/tiny")  # looks like a Hub id, but empty/ is a local folder
    with pytest.raises(FileNotFoundError, match="no such folder"):
        check_model_path("/nonexistent/model")
    for hub in (False, True):  # no models/ here, yet models/… is a local path: the Hub reserves "models"
        with pytest.raises(FileNotFoundError, match=r"models/tiny: no such folder .*cepo bootstrap builds"):
            check_model_path("models/tiny", hub=hub)


def test_config_validate_names_a_missing_model_path(tmp_path: Path) -> None:
    done = _cepo(tmp_path, "config", "validate", "-c", "configs/tiny.yaml", "--set", "model.path=models/nope")
    line = _one_error(done)
    assert line.startswith("error: model.path models/nope: no such folder"), line
    assert "ok:" not in done.stderr


# ---------------------------------------------------------------------------------------------- main()

_PROBE = textwrap.dedent(
    """
    import sys
    from cepo import cli

    @cli.app.command("probe")
    def probe(kind: str) -> None:
        if kind == "interrupt":
            raise KeyboardInterrupt
        if kind == "bug":
            raise RuntimeError("a bug [here]")
        if kind == "permission":
            raise PermissionError(13, "Permission denied", "/srv/[data]/x.jsonl")
        if kind == "isadir":
            open("/")
        if kind == "ray":
            from cepo.errors import DataError

            class RayTaskError(Exception):  # how ray wraps a worker's exception (as_instanceof_cause)
                pass

            class RayTaskError_DataError(RayTaskError, DataError):
                pass

            wrapped = RayTaskError_DataError("ray::Replica.load() (pid=1)\\nTraceback ...\\nDataError: x")
            wrapped.cause = DataError("bad row 3 in [file]")
            raise wrapped

    cli.main()
    """
)


def _probe(tmp_path: Path, kind: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _PROBE, "probe", kind],
        cwd=REPO,
        env=_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_main_expected_unexpected_and_interrupt(tmp_path: Path) -> None:
    done = _probe(tmp_path, "permission")
    assert _one_error(done) == "error: /srv/[data]/x.jsonl: Permission denied"
    _traceback_note(done, tmp_path / "error.log")

    done = _probe(tmp_path, "isadir")
    assert _one_error(done) == "error: /: Is a directory"

    done = _probe(tmp_path, "ray")
    assert _one_error(done) == "error: bad row 3 in [file]"

    done = _probe(tmp_path, "interrupt")
    assert done.returncode == 130 and done.stderr.strip() == "interrupted" and "Traceback" not in done.stderr

    done = _probe(tmp_path, "bug")  # a bug keeps its traceback
    assert done.returncode == 1 and "RuntimeError" in done.stderr and "a bug [here]" in done.stderr
    assert "Traceback" in done.stderr and not any(
        line.startswith("error:") for line in done.stderr.splitlines()
    )


def test_default_error_log_location(tmp_path: Path) -> None:
    env = _env(tmp_path, XDG_CACHE_HOME=str(tmp_path / "cache"))
    del env["CEPO_ERROR_LOG"]
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, "probe", "permission"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    _one_error(done)
    _traceback_note(done, tmp_path / "cache" / "cepo" / "last-error.log")


def test_a_run_is_named_by_path_or_id_in_eval_and_train(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`eval --adapter` takes an adapter folder, a run (folder or id: its adapter/) or a checkpoint folder;
    `train --resume` a run folder or id; an unknown run is one error line with the close matches."""
    import typer
    from typer.testing import CliRunner

    from cepo.cli import _adapter_folder, app

    root = tmp_path / "runs"
    run = root / "cmp" / "cepo" / "seed0"
    for adapter in (run / "adapter", run / "checkpoints" / "step_00010" / "adapter"):
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text("{}")
    (run / "config.yaml").write_text("name: x\n")
    assert _adapter_folder(str(run / "adapter"), root, None) == run / "adapter"  # an adapter folder
    assert _adapter_folder(str(run), root, None) == run / "adapter"  # a run folder: its adapter
    assert _adapter_folder("cmp/cepo/seed0", root, None) == run / "adapter"  # a run id
    assert _adapter_folder("cepo/seed0", root, None) == run / "adapter"
    checkpoint = run / "checkpoints" / "step_00010"
    assert _adapter_folder(str(checkpoint), root, None) == checkpoint / "adapter"
    with pytest.raises(typer.Exit):
        _adapter_folder("cepo/sead0", root, None)

    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(app, ["eval", "-c", str(REPO / "configs/tiny.yaml"), "--adapter", "cepo/sead0"])
    text = " ".join(done.output.split())
    assert done.exit_code == 2 and "--adapter cepo/sead0: not a PEFT adapter folder, and not a run" in text
    assert "close matches: cmp/cepo/seed0" in text
    done = CliRunner().invoke(app, ["train", "--resume", "cmp/cepo/sead0"])
    assert done.exit_code == 2 and "close matches: cmp/cepo/seed0" in " ".join(done.output.split())
