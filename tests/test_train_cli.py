"""End to end: `cepo train --steps 3` through the real pipeline, and its outputs load elsewhere."""

from __future__ import annotations

import gc
import json
import os
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

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = run_dir / "adapter"
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
