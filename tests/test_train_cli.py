"""End to end: `cepo train --steps 3` through the real pipeline, and its outputs load elsewhere."""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_cepo_train_end_to_end(tiny_model_dir, tmp_path):
    """`cepo train --steps 3` exits 0, writes metrics and an adapter that PeftModel and vLLM both load."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "cepo.cli", "train", "--config", str(REPO / "configs" / "tiny.yaml"),
        "--steps", "3", "--run-dir", str(run_dir),
        "--set", f"model.path={tiny_model_dir}", "--set", "data.eval_size=16", "--set", "rollout.prompts_per_step=8",
        "--set", "logging.report_to=[tensorboard]",
    ]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "held-out accuracy" in done.stdout
    # quiet by default: progress and results on the console, the engines' logs in the run folder
    console = done.stdout + done.stderr
    assert re.search(r"^step 1/3 .*reward", done.stdout, re.M) and re.search(
        r"^step 3/3 · \d", done.stdout, re.M
    )
    assert re.search(r"^step 2/3 · ETA \d+s", done.stdout, re.M)
    for noise in ("INFO", "WARNING", "Triton", "EngineCore", "non-default args"):
        assert noise not in console, noise
    assert len(console.splitlines()) < 30, console
    assert f"run      {run_dir}" in done.stdout and "done: 3 steps" in done.stdout
    logs = run_dir / "logs"
    assert (logs / "train.log").is_file()
    workers = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*.log"))
    assert "Initializing a V1 LLM engine" in workers  # vLLM's own start-up lines, from the engine processes
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["policy_version"] == 3
    assert set(summary["base"]) == {
        "test",
        "more_operands",
        "larger_numbers",
        "unseen_mix",
        "word_problems",
        "average",
    }
    assert (run_dir / "config.yaml").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("critic/score/mean")] == [1, 2, 3]  # verl's names, steps done
    assert [e.step for e in events.Scalars("val-core/test/acc/mean@1")] == [0, 3]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path / "elsewhere" / "adapter"  # the run's adapter folder loads on its own
    shutil.copytree(run_dir / "adapter", adapter)
    assert "CEPO" in (adapter / "README.md").read_text()
    AutoTokenizer.from_pretrained(str(adapter))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    PeftModel.from_pretrained(base, str(adapter))

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(
        model=str(tiny_model_dir), dtype="float32", enforce_eager=True, enable_lora=True, max_lora_rank=16
    )
    try:
        out = llm.generate(
            ["Compute 1+2."],
            SamplingParams(max_tokens=4),
            lora_request=LoRARequest("trained", 1, str(adapter)),
        )
        assert len(out[0].outputs[0].token_ids) >= 1
    finally:
        del llm
        gc.collect()


def test_cepo_eval_reports_accuracy_and_standard_error(tiny_model_dir, tmp_path):
    """`cepo eval` through vLLM: per-suite sampled and greedy accuracy ± standard error, and the average."""
    cmd = [
        sys.executable, "-m", "cepo.cli", "eval", "--config", str(REPO / "configs" / "tiny.yaml"),
        "--model", str(tiny_model_dir), "--suites", "test,unseen_mix", "--size", "12", "--samples", "2",
        "--out", str(tmp_path / "eval.json"),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "eval.json").read_text())
    assert json.loads(done.stdout) == results  # stdout is the JSON alone
    assert set(results) == {"test", "unseen_mix", "average", "settings"}
    settings = results["settings"]  # what produced the numbers
    assert settings["model"] == str(Path(tiny_model_dir).resolve()) and settings["adapter"] is None
    assert settings["backend"] == "vllm" and settings["problems_per_suite"] == {"test": 12, "unseen_mix": 12}
    assert settings["sampling"]["sampled"]["n"] == 2 and settings["sampling"]["greedy"]["temperature"] == 0.0
    # stderr: the progress and one line per suite, no engine noise (that is in the log file it names)
    assert "INFO" not in done.stderr and "Triton" not in done.stderr, done.stderr
    assert len(done.stderr.splitlines()) <= 12, done.stderr
    log_file = tmp_path / re.search(r"engine logs: (\S+?)[;)]", done.stderr).group(1)
    assert log_file.parent == tmp_path / "runs" / "logs"  # --root's logs/ by default
    assert "Initializing a V1 LLM engine" in log_file.read_text()
    for suite in ("test", "unseen_mix"):
        r = results[suite]
        assert r["n"] == 12 and r["samples"] == 2
        assert 0.0 <= r["sampled"] <= 1.0 and 0.0 <= r["greedy"] <= 1.0
        assert r["sampled_se"] >= 0.0
        # a problem's score is a multiple of 1/2 with two samples, the mean a multiple of 1/24
        assert abs(r["sampled"] * 24 - round(r["sampled"] * 24)) < 1e-9
    assert results["test"]["greedy"] > 0.5  # the tiny policy is right ~90 % greedy on its own task's shape
    assert results["average"]["sampled"] == pytest.approx(
        (results["test"]["sampled"] + results["unseen_mix"]["sampled"]) / 2
    )


def test_cepo_eval_rejects_bad_arguments(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from cepo.cli import app

    runner = CliRunner()
    done = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--adapter", str(tmp_path)])
    assert done.exit_code == 2 and "no suites to evaluate" in done.output
    done = runner.invoke(
        app, ["eval", "--model", str(tiny_model_dir), "--suites", "test", "--adapter", str(tmp_path)]
    )
    assert done.exit_code == 2 and "no adapter_config.json" in done.output
    done = runner.invoke(app, ["eval", "--suites", "test", "--backend", "tgi"])
    assert done.exit_code == 2 and "allowed: vllm, transformers" in done.output
