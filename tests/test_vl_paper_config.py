"""configs/paper.yaml loads the paper's architecture: a randomly initialised, tiny Qwen3-VL (the class of
Qwen3-VL-2B-Instruct, whose weights cannot be downloaded here) through the learner's and the engines' loaders,
with Geo3k's on-disk layout read from a path."""

from __future__ import annotations

import pytest
import torch

from cepo.config import load_config
from cepo.controller.cluster import policy_options
from cepo.data import from_config
from cepo.data.vision_inputs import student_inputs
from cepo.models.tiny_vl import save_random_vl
from cepo.tasks import image_arith
from cepo_services.common import vision
from cepo_services.common.engines import SamplingSpec, TransformersEngine
from cepo_services.learner.policy import LoraPolicy, PolicyBatch


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    model = save_random_vl(root / "qwen3-vl", arch="qwen3_vl", seed=0)
    data = image_arith.write_dataset(root / "geo3k", {"train": 8, "test": 4})
    overrides = [f"model.path={model}", f"data.path={data}", "model.dtype=float32"]
    return load_config("configs/paper.yaml", overrides), str(model)


def test_paper_config_loads_qwen3_vl_and_geo3k_layout(paper):
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    cfg, model = paper
    assert cfg.teacher.sees_image is True  # the paper's reading: the teacher sees the figure
    policy = LoraPolicy(model, **{**policy_options(cfg), "lr": 1e-5})
    assert isinstance(policy.model.get_base_model(), Qwen3VLForConditionalGeneration)
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("language_model" in n for n in trainable)

    problems = from_config(cfg.data).problems
    assert len(problems) == 8 and all(len(p.images) == 1 and "<image>" in p.problem for p in problems)
    tok = AutoTokenizer.from_pretrained(model)
    ids, images = student_inputs(problems[:2], tok, model, cfg.data.prompt_template)
    spec = vision.vision_spec(model)
    assert ids[0].count(spec.image_token_id) == spec.tokens_for(images[0][0])

    engine = TransformersEngine(model)
    try:
        assert isinstance(engine.base, Qwen3VLForConditionalGeneration)
        out = engine.generate(ids, SamplingSpec(n=1, temperature=1.0, max_tokens=6), images=images)
        response = out[0][0].token_ids
        want = policy.old_logprobs(PolicyBatch.build([(ids[0], response)], images=[images[0]]))[0]
        got = engine.score([(ids[0] + response, len(ids[0]))], 1.0, images=[images[0]])[0]
        assert torch.allclose(torch.tensor(got), want[: len(response)], atol=1e-4)
    finally:
        engine.close()
