"""End to end: `cepo train --steps 3` through the real pipeline, and its outputs load elsewhere."""

from __future__ import annotations

import gc
import json
import os
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
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "eval.json").read_text())
    assert json.loads(done.stdout) == results  # vLLM logs to stderr: stdout is the JSON alone
    assert set(results) == {"test", "unseen_mix", "average"}
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
