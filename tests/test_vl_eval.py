"""`cepo eval --images`: the image-blind baselines of a vision-language policy. ``grey`` keeps the prompt token for
token with every figure replaced by a uniform grey one of its size (how the README's image-blind figures are
measured); ``none`` evaluates the text alone. On the warmed-up tiny VL model both score clearly below the model
that sees the figure."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cepo.data.vision_inputs import student_inputs, without_images
from cepo.models.tiny_vl import save_random_vl
from cepo.tasks import image_arith
from cepo_proto import Problem
from cepo_services.common import vision

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "{problem} Put the final answer in \\boxed{{}}."


def test_image_modes_of_the_student_inputs(tmp_path):
    from transformers import AutoTokenizer

    model = str(save_random_vl(tmp_path / "model", seed=0))
    tok = AutoTokenizer.from_pretrained(model)
    spec = vision.vision_spec(model)
    problems = [
        Problem(
            id=f"p{i}",
            problem=q.problem,
            answer=q.answer,
            images=[
                "data:image/png;base64," + base64.b64encode(image_arith.draw_digit(q.x, q.style)).decode()
            ],
        )
        for i, q in enumerate(image_arith.generate("test", 3, seed=0))
    ]
    ids, images = student_inputs(problems, tok, model, TEMPLATE)
    grey_ids, grey = student_inputs(problems, tok, model, TEMPLATE, images="grey")
    assert grey_ids == ids  # the same prompt, token for token
    for row, grey_row in zip(images, grey, strict=True):
        assert len(row) == len(grey_row) == 1 and grey_row[0].shape == row[0].shape
        assert (grey_row[0] == 128).all() and not (row[0] == 128).all()
    text_ids, text_images = student_inputs(problems, tok, model, TEMPLATE, images="none")
    assert text_images == [[], [], []]
    assert all(spec.image_token_id not in row and spec.start_id not in row for row in text_ids)
    stripped = without_images(problems)
    assert all("<image>" not in p.problem and not p.images for p in stripped)
    assert stripped[0].problem == problems[0].problem.replace("<image>", "").strip()
    with pytest.raises(ValueError, match="images mode 'blurry'"):
        student_inputs(problems, tok, model, TEMPLATE, images="blurry")


def cepo_eval(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cepo.cli", "eval", "-c", str(REPO / "configs" / "tiny-vl.yaml"), *args]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, check=False, cwd=REPO)


def test_unknown_images_mode_is_refused(tmp_path):
    done = cepo_eval("--images", "blurry", "--root", str(tmp_path))
    assert done.returncode == 2
    assert "--images 'blurry'; allowed: keep, grey, none" in done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_image_blind_eval_of_the_tiny_vl_model(tmp_path):
    """The warmed-up models/tiny-vl (built when missing, cached otherwise) on 60 held-out problems, greedy, with
    the transformers engine: seeing the figure beats both blind baselines by a wide margin."""
    from cepo.models.tiny_vl import build_tiny_vl_model

    model = REPO / "models" / "tiny-vl"
    manifest, _ = build_tiny_vl_model(model, minutes=60.0)
    built = manifest["accuracy"]["test"]  # the bounds: sampled 20–60 %, image-blind clearly lower
    assert 0.2 <= built["sampled_t1"] <= 0.6 and built["blind_sampled_t1"] <= built["sampled_t1"] - 0.1
    results = {}
    for mode in ("keep", "grey", "none"):
        out = tmp_path / f"{mode}.json"
        done = cepo_eval(
            "--suites", "test", "--size", "60", "--samples", "1", "--backend", "transformers",
            "--images", mode, "--out", str(out), "--root", str(tmp_path),
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        results[mode] = json.loads(out.read_text())
        assert results[mode]["settings"]["images"] == mode
    seeing = results["keep"]["test"]["greedy"]
    assert seeing >= 0.6  # the build's greedy accuracy is 0.85 on 200 problems
    for mode in ("grey", "none"):
        assert results[mode]["test"]["greedy"] <= seeing - 0.3, (mode, results[mode]["test"])
    assert np.isfinite(results["grey"]["test"]["sampled"])
