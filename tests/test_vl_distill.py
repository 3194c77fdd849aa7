"""OPSD / SDPO on image problems: the learner-side teacher's r⁺ context holds the problem's image, its tokens expanded
as in the student prompt (``teacher.sees_image``; off: the official code's blind teacher), and the learner's teacher
forward gets the pixel values — in one process and on two FSDP ranks through Ray, with a tiny random Qwen2-VL.
(That the context equals the teacher service's, token for token: tests/test_teacher_images.py.)"""

from __future__ import annotations

import os

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from cepo.models.tiny_vl import save_random_vl
from cepo_proto.learner import DistillSpec, UpdateRequest, UpdateSettings
from cepo_proto.pipeline import ImageBatch, ImageRefs
from cepo_services.common import vision
from cepo_services.common.templates import chat_prompt_ids, image_prompt_text, image_teacher_context
from cepo_services.learner.distributed import LearnerGroup
from cepo_services.learner.policy import LoraPolicy, PolicyBatch, teacher_image_rows

POLICY = {"rank": 8, "alpha": 16, "lr": 1e-3, "warmup_steps": 0, "lr_schedule": "constant", "seed": 3}
TEXT = image_prompt_text("<image>Find x. Put the final answer in \\boxed{}.")


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    """A random tiny Qwen2-VL, its tokenizer and vision spec, two different prepared images, the student prompt
    of each and a response."""
    from transformers import AutoTokenizer

    model_dir = str(save_random_vl(tmp_path_factory.mktemp("vl-distill") / "model", seed=0))
    tok = AutoTokenizer.from_pretrained(model_dir)
    spec = vision.vision_spec(model_dir)
    rng = np.random.RandomState(0)
    images = [
        vision.prepare_image(Image.fromarray(rng.randint(0, 255, (90, 100, 3), dtype=np.uint8)), spec)
        for _ in range(2)
    ]
    prompts = [vision.expand_image_tokens(chat_prompt_ids(tok, TEXT), [a], spec) for a in images]
    response = tok.encode("x = 3+4 = \\boxed{7}", add_special_tokens=False)
    return model_dir, tok, spec, images, prompts, response


def context(vl, image: int, *, sees_image: bool, template: str = "paper") -> list[int]:
    _model_dir, tok, spec, images, _prompts, _response = vl
    ids, held = image_teacher_context(tok, TEXT, "7", template, [images[image]], spec, sees_image=sees_image)
    assert len(held) == (1 if sees_image else 0)
    return ids


def distill_loss(vl, teacher: list[list[int]], images: list[int], *, teacher_images: bool = True) -> float:
    """One OPSD update of a fresh policy (LoRA B = 0: the base model) on rows whose student prompt has image
    ``images[i]``, the teacher's row i being ``teacher[i]`` + the same response; the distillation loss."""
    model_dir, _tok, _spec, arrays, prompts, response = vl
    policy = LoraPolicy(model_dir, **POLICY)
    samples = [(prompts[k], response) for k in images]
    rows = [[arrays[k]] for k in images]
    teacher_samples = [(c, response) for c in teacher]
    batch = PolicyBatch.build(samples, images=rows)
    teacher_rows = teacher_image_rows(samples, teacher_samples, rows, policy.image_token_id)
    teacher_batch = PolicyBatch.build(teacher_samples, images=teacher_rows if teacher_images else None)
    adv = torch.tensor([1.0, -1.0])[: len(samples)].unsqueeze(1) * batch.response_mask
    stats = policy.update(
        batch, adv, policy.old_logprobs(batch), teacher_batch=teacher_batch, distill=DistillSpec("opsd")
    )
    assert np.isfinite(stats.distill_loss)
    return stats.distill_loss


def test_opsd_teacher_forward_gets_the_pixels(vl):
    *_, prompts, _response = vl
    # the student's own context as the teacher's: KL 0 exactly when the teacher forward got the same pixels
    assert distill_loss(vl, [prompts[0], prompts[1]], [0, 1]) == pytest.approx(0.0, abs=1e-6)
    assert distill_loss(vl, [prompts[0], prompts[1]], [0, 1], teacher_images=False) > 1e-4
    # r⁺ contexts with each row's image (teacher.sees_image), and without it
    seeing = distill_loss(vl, [context(vl, 0, sees_image=True), context(vl, 1, sees_image=True)], [0, 1])
    assert seeing > 1e-4
    blind = distill_loss(vl, [context(vl, 0, sees_image=False), context(vl, 1, sees_image=False)], [0, 1])
    assert abs(seeing - blind) > 1e-4  # the blind teacher (no image in its context) scores otherwise


def test_teacher_context_with_other_image_tokens_is_refused(vl):
    *_, prompts, response = vl
    bad = [*context(vl, 0, sees_image=True), 0]  # fine: the same image tokens, one more text token
    samples = [(prompts[0], response)]
    assert teacher_image_rows(samples, [(bad, response)], [["img"]], vl[2].image_token_id) == [["img"]]
    extra = [vl[2].image_token_id, *bad]
    with pytest.raises(ValueError, match=r"teacher sample 5: \d+ image tokens, its sample's prompt has"):
        teacher_image_rows(samples, [(extra, response)], [["img"]], vl[2].image_token_id, index=[5])


@pytest.fixture(scope="module")
def ray_session():
    previous = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # Ray 2.60 enables token auth by default
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = previous


@pytest.mark.parametrize("kind", ["opsd", "sdpo"])
def test_two_ranks_distill_with_images_equal_one_process(ray_session, vl, kind):
    """The learner service: an UpdateRequest with one ImageRefs for the step, teacher contexts with (rows 0, 1)
    and without (rows 2, 3: blind) the image; two FSDP ranks give the one-process step."""
    model_dir, _tok, _spec, arrays, prompts, response = vl
    spec = DistillSpec(kind, top_k=5, ema_decay=0.9)
    which = [0, 1, 1, 0]
    samples = [(prompts[k], response) for k in which]
    teacher = [(context(vl, k, sees_image=i < 2), response) for i, k in enumerate(which)]
    refs = ImageRefs(batch=ray.put(ImageBatch(arrays=arrays)), rows=[[k] for k in which])
    group = LearnerGroup(model_dir, 2, policy_kwargs=POLICY, timeout_s=300, grace_s=20, cpus_per_rank=0.5)
    try:
        single = LoraPolicy(model_dir, **POLICY)
        rows = [[arrays[k]] for k in which]
        batch = PolicyBatch.build(samples, images=rows)
        teacher_batch = PolicyBatch.build(
            teacher, images=teacher_image_rows(samples, teacher, rows, single.image_token_id)
        )
        assert [len(r) for r in teacher_batch.images] == [1, 1, 0, 0]
        adv = torch.tensor([1.0, -1.0, 0.5, -0.5]).unsqueeze(1) * batch.response_mask
        old = group.old_logprobs(samples, micro_batch_size=1, images=refs)
        request = UpdateRequest(
            samples=samples,
            advantages=adv,
            old_logp=old,
            settings=UpdateSettings(micro_batch_size=1),
            distill=spec,
            teacher_samples=teacher,
            images=refs,
        )
        stats = group.update(request).stats
        expected = single.update(
            batch,
            adv,
            single.old_logprobs(batch),
            UpdateSettings(micro_batch_size=1),
            teacher_batch=teacher_batch,
            distill=spec,
        )
        assert stats.distill_loss > 0
        assert stats.distill_loss == pytest.approx(expected.distill_loss, rel=1e-4)
        assert stats.grad_norm == pytest.approx(expected.grad_norm, rel=1e-4)
        state, want = group.lora_state(), single.lora_state()
        for name, tensor in want.items():
            assert torch.allclose(state[name], tensor, atol=1e-5, rtol=0), name
    finally:
        group.shutdown()
