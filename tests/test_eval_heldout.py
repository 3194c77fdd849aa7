"""Held-out evaluation data: never the training set, overlap counted, suite names checked at validate time,
offline defaults refused at once, and the README's `cepo eval` lines run offline as written."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from cepo.cli import app
from cepo.config import ConfigError, load_config
from cepo.errors import DataError
from cepo.evaluate import TASK_SETTINGS, heldout_suites, model_task, task_overrides

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def problems(prefix: str, n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"problem": f"{prefix} {i} + {i}?", "answer": str(2 * i), **extra} for i in range(n)]


def jsonl_config(path: Path, *overrides: str) -> Any:
    return load_config(
        None, ["data.source=jsonl", f"data.path={path}", "data.eval_suites=[test]", *overrides]
    )


def _local_model() -> Path:
    """A stand-in model folder (config.json): `config validate` refuses the paper's Hub model offline unless it is
    cached, and these tests are about the data, not the model."""
    import tempfile

    folder = Path(tempfile.gettempdir()) / f"cepo-test-model-{os.getpid()}"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text("{}")
    return folder


def validate(*args: str) -> Any:
    model = (
        [] if any(a.startswith("model.path=") for a in args) else ["--set", f"model.path={_local_model()}"]
    )
    return CliRunner().invoke(app, ["config", "validate", *args, *model])


# ---------------------------------------------------------------------------------------------------------
# File sources


def test_a_single_training_file_is_never_evaluated_on(tmp_path: Path) -> None:
    """The issue's probe: a 40-problem file, suite 'test'. Before, all 40 'test' problems were training ones."""
    train = write_jsonl(tmp_path / "train.jsonl", problems("Compute", 40))
    cfg = jsonl_config(train)
    with pytest.raises(
        DataError, match=r"suite 'test' has no held-out data: data.path .* has no 'split' column"
    ):
        heldout_suites(cfg)
    done = validate(
        "--set", "data.source=jsonl", "--set", f"data.path={train}", "--set", "data.eval_suites=[test]"
    )
    assert done.exit_code == 2
    assert "error: data.eval_suites: suite 'test' has no held-out data" in " ".join(done.output.split())
    with pytest.raises(
        ConfigError, match=r"data.eval_suites: suite 'test' has no held-out data.*split_column is null"
    ):
        jsonl_config(train, "data.split_column=null")
    # a suite pointed back at the training file is not held out either
    with pytest.raises(
        DataError, match=r"suite 'test' \(.*train.jsonl\) is not held out: all 40 of its problems"
    ):
        heldout_suites(jsonl_config(train, f"data.eval_paths={{test: {train}}}"))


def test_suites_from_their_own_file_with_overlap_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", problems("Compute", 40))
    leaked = [
        {"problem": "  COMPUTE 3 +  3?", "answer": "6"},
        {"problem": "compute 7 + 7?\n", "answer": "14"},
    ]
    test = write_jsonl(tmp_path / "test.jsonl", problems("Add", 8) + leaked)
    cfg = jsonl_config(train, f"data.eval_paths={{test: {test}}}")
    assert validate("--set", "data.source=jsonl", "--set", f"data.path={train}", "--set",
                    "data.eval_suites=[test]", "--set", f"data.eval_paths={{test: {test}}}").exit_code == 0  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="cepo.evaluate"):
        suites = heldout_suites(cfg)
    assert len(suites["test"].problems) == 10 and suites["test"].train_overlap == 2
    assert suites["test"].origin == str(test)
    assert "2 of its 10 problems are also training problems" in caplog.text
    cfg.data.eval_size = 8  # the first 8 are all held out
    assert heldout_suites(cfg)["test"].train_overlap == 0


def test_suites_from_the_split_column(tmp_path: Path) -> None:
    both = write_jsonl(
        tmp_path / "all.jsonl", problems("Compute", 30, split="train") + problems("Add", 10, split="test")
    )
    cfg = jsonl_config(both)
    assert validate("--set", "data.source=jsonl", "--set", f"data.path={both}", "--set",
                    "data.eval_suites=[test]").exit_code == 0  # fmt: skip
    suite = heldout_suites(cfg)["test"]
    assert [p.problem for p in suite.problems] == [f"Add {i} + {i}?" for i in range(10)]
    assert suite.train_overlap == 0 and suite.origin == f"{both} (split 'test')"
    done = validate(
        "--set", "data.source=jsonl", "--set", f"data.path={both}", "--set", "data.eval_suites=[tset]"
    )
    assert done.exit_code == 2
    assert "suite 'tset': no row of" in done.output and "'train' (30 rows), 'test' (10 rows)" in done.output


def test_hf_suites_are_splits_and_the_training_split_is_refused(tmp_path: Path) -> None:
    # hf Hub names are accepted without the network
    assert validate("--set", "data.eval_suites=[test, validation]").exit_code == 0
    done = validate("--set", "data.eval_suites=[train]")
    assert (
        done.exit_code == 2
        and "data.eval_suites: suite 'train' is the training split (data.split)" in done.output
    )


# ---------------------------------------------------------------------------------------------------------
# Built-in tasks


def test_builtin_suite_names_are_checked() -> None:
    assert validate("-c", str(REPO / "configs" / "tiny.yaml")).exit_code == 0
    done = validate("-c", str(REPO / "configs" / "tiny.yaml"), "--set", "data.eval_suites=[test, unseen_mx]")
    assert done.exit_code == 2
    assert (
        "data.eval_suites: unknown suite 'unseen_mx' for data.source 'arithmetic'; suites: test, more_operands, "
        "larger_numbers, unseen_mix, word_problems (did you mean 'unseen_mix'?)"
    ) in " ".join(done.output.split())
    done = validate("-c", str(REPO / "configs" / "tiny.yaml"), "--set", "data.eval_suites=[train]")
    assert done.exit_code == 2 and "'train' is the training split, not a held-out suite" in done.output
    with pytest.raises(ConfigError, match=r"unknown reasoning_gym task 'gdc'.*\(did you mean 'gcd'\?\)"):
        load_config(
            None,
            ["data.source=reasoning_gym", "data.path=null", "data.tasks=[gcd]", "data.eval_suites=[gdc]"],
        )
    with pytest.raises(
        ConfigError, match=r"data.eval_paths: data.source 'arithmetic' generates its held-out suites"
    ):
        load_config(REPO / "configs" / "tiny.yaml", ["data.eval_paths={test: x.jsonl}"])
    with pytest.raises(ConfigError, match=r"data.eval_suites: suite 'test' is listed twice"):
        load_config(REPO / "configs" / "tiny.yaml", ["data.eval_suites=[test, test]"])


def test_builtin_suites_do_not_overlap_training() -> None:
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["data.eval_size=100"])
    suites = heldout_suites(cfg)
    assert list(suites) == cfg.data.eval_suites
    assert all(len(s.problems) == 100 and s.train_overlap == 0 for s in suites.values())
    cfg = load_config(
        None, ["data.source=reasoning_gym", "data.path=null", "data.tasks=[gcd, lcm]", "data.size=40",
               "data.eval_suites=[gcd]", "data.eval_size=20"]
    )  # fmt: skip
    suite = heldout_suites(cfg)["gcd"]
    assert len(suite.problems) == 20 and 0 <= suite.train_overlap < 20


# ---------------------------------------------------------------------------------------------------------
# `cepo eval` without --config, offline


def test_task_settings_are_the_shipped_configs() -> None:
    tiny = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    for override in TASK_SETTINGS["arithmetic"]:
        key, value = override.split("=", 1)
        section, name = key.split(".")
        assert tiny[section].get(name, "absent") == yaml.safe_load(value), override


def test_model_task_from_the_manifest(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    assert model_task(folder) is None and model_task(tmp_path / "nothing") is None
    (folder / "manifest.json").write_text(json.dumps({"kind": "tiny-arith", "task_version": "arithmetic-v1"}))
    assert model_task(folder) == "arithmetic"
    assert task_overrides(folder) == ("arithmetic", list(TASK_SETTINGS["arithmetic"]))
    (folder / "manifest.json").write_text(json.dumps({"kind": "smollm2-135m-instruct"}))
    assert model_task(folder) is None
    (folder / "manifest.json").write_text("not json")
    assert model_task(folder) is None


def test_eval_without_config_takes_the_task_of_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cepo.evaluate

    seen: list[Any] = []
    monkeypatch.setattr(cepo.evaluate, "evaluate_model", lambda cfg, **kw: seen.append(cfg) or {})
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"task_version": "arithmetic-v1"}))
    done = CliRunner().invoke(
        app, ["eval", "--model", str(folder), "--suites", "test", "--set", "eval.top_k=5"]
    )
    assert done.exit_code == 0, done.output
    cfg = seen[-1]
    assert (cfg.data.source, cfg.data.path, cfg.model.dtype, cfg.eval.presence_penalty) == (
        "arithmetic",
        None,
        "float32",
        0.0,
    )
    assert cfg.eval.top_k == 5 and cfg.model.path == str(folder)
    assert "was built for the arithmetic task" in done.output
    done = CliRunner().invoke(app, ["eval", "--model", str(folder), "--suites", "test", "--set",
                                    "eval.presence_penalty=1.5"])  # fmt: skip
    assert seen[-1].eval.presence_penalty == 1.5  # the command's own --set wins
    done = CliRunner().invoke(
        app, ["eval", "-c", str(REPO / "configs" / "paper.yaml"), "--model", str(folder), "--suites", "test"]
    )
    assert seen[-1].data.source == "hf" and "was built for" not in done.output  # a config is taken as it is


HUB_VARIABLES = (*OFFLINE, "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> tuple[Any, float]:
    """``cepo ARGS`` in a subprocess with the Hub settings of ``env`` alone; (result, seconds)."""
    base = {k: v for k, v in os.environ.items() if k not in HUB_VARIABLES}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "cepo.cli", *args],
        cwd=cwd, env={**base, **env}, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    return done, time.monotonic() - started


@pytest.mark.parametrize(
    ("with_model", "env", "expected"),
    [
        (  # a local model with no task: the paper's data defaults, Geo3k on the Hub
            True,
            OFFLINE,
            "error: data.path 'hiyouga/geometry3k' is a dataset on the Hugging Face Hub, and HF_HUB_OFFLINE is set "
            "but it is not in the Hugging Face cache: set data.path to a local file or folder, or data.source",
        ),
        (  # no --model: the paper's model on the Hub; nothing listens on port 9
            False,
            {"HF_ENDPOINT": "http://127.0.0.1:9"},
            "error: model.path Qwen/Qwen3-VL-2B-Instruct: a model on the Hugging Face Hub, not in the local "
            "cache, and 127.0.0.1:9 cannot be reached",
        ),
    ],
)
def test_network_defaults_fail_at_once_offline(
    tmp_path: Path, with_model: bool, env: dict[str, str], expected: str
) -> None:
    args = ["eval", "--suites", "test"]
    if with_model:
        (tmp_path / "some-model").mkdir()
        (tmp_path / "some-model" / "config.json").write_text("{}")
        args += ["--model", str(tmp_path / "some-model")]
    done, seconds = run_cli(args, env, tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert expected in " ".join(done.stderr.split())
    assert "Retrying" not in done.stderr and seconds < 30  # was 32 s of Hub retries before the error


# ---------------------------------------------------------------------------------------------------------
# The README's `cepo eval` lines


def readme_eval_lines() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            # the tiny VL model's lines need models/tiny-vl (a 3-min build) and a run of it: tests/test_vl_eval.py
            # runs their --images modes, tests/test_vl_pipeline.py image suites in a run; every other line runs here
            if line.startswith("cepo eval") and "tiny-vl" not in line:
                lines.append(shlex.split(line, comments=True))
    return lines


def small(args: list[str], size: int = 4) -> list[str]:
    args = list(args)
    if "--size" in args:
        args[args.index("--size") + 1] = str(size)
    else:
        args += ["--size", str(size)]
    return args


def test_readme_has_eval_examples() -> None:
    lines = readme_eval_lines()
    assert len(lines) >= 3  # the example first: no --config, the tiny model, offline
    assert lines[0] == shlex.split("cepo eval --model models/tiny-arith --suites test --samples 1 --size 20")


@pytest.mark.slow
def test_readme_eval_examples_run_offline(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Each `cepo eval` line of the README, as written but with 4 problems per suite, from a folder that holds
    what they name (models/tiny-arith, configs/, the adapter a `cepo train --run-dir runs/demo` leaves), with the
    Hugging Face libraries offline."""
    from _tiny import save_random_adapter

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-arith").symlink_to(tiny_model_dir)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    save_random_adapter(tiny_model_dir, tmp_path / "runs" / "demo" / "adapter", seed=0, scale=1.0)
    lines = readme_eval_lines()
    for args in lines:
        args = [*small(args), "--out", str(tmp_path / "out.json")]
        done, seconds = run_cli(
            args[1:], {**OFFLINE, "HF_ENDPOINT": "http://127.0.0.1:9"}, tmp_path, timeout=400
        )
        assert done.returncode == 0, f"{shlex.join(args)}\n{done.stderr[-3000:]}"
        results = json.loads((tmp_path / "out.json").read_text())
        suites = args[args.index("--suites") + 1].split(",")
        assert set(results) == {*suites, "average", "settings"}
        assert all(results[s]["n"] == 4 and results[s]["train_overlap"] == 0 for s in suites)
        print(f"{shlex.join(args[:-2])}: {seconds:.0f} s")
