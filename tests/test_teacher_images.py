"""The teacher with images: token layout of both templates with ``sees_image`` on and off, the student context
P_S always with its image, and scores that depend on the image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cepo.models.tiny_vl import save_random_vl
from cepo_proto.pipeline import ImageBatch, ImageRefs, TeacherItem, TeacherRequest
from cepo_services.common import vision
from cepo_services.common.templates import (
    IMAGE_MARKUP,
    chat_prompt_ids,
    image_prompt_text,
    image_teacher_context,
    teacher_context_ids,
)
from cepo_services.teacher.replica import TeacherReplica


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir = str(save_random_vl(tmp_path_factory.mktemp("vl") / "model", arch="qwen2_vl", seed=3))
    teacher = TeacherReplica("teacher-0", "transformers", model_dir)
    spec = teacher.vision
    rng = np.random.RandomState(0)
    images = [
        vision.prepare_image(Image.fromarray(rng.randint(0, 255, (90, 100, 3), dtype=np.uint8)), spec)
        for _ in range(2)
    ]
    text = image_prompt_text("<image>Find x. Put the final answer in \\boxed{}.")
    prompt_ids = vision.expand_image_tokens(chat_prompt_ids(teacher.tokenizer, text), images[:1], spec)
    yield teacher, spec, images, text, prompt_ids
    teacher.shutdown()


def request(setup, *, template="paper", sees_image=True, image=0, negative="7"):
    teacher, _spec, images, text, prompt_ids = setup
    response = teacher.tokenizer.encode("x = \\boxed{12}", add_special_tokens=False)
    item = TeacherItem(
        student_prompt=text,
        student_prompt_ids=prompt_ids,
        response_ids=response,
        positive="12",
        negative=negative,
    )
    refs = ImageRefs(batch=ImageBatch(arrays=images), rows=[[image]])
    return TeacherRequest(
        items=[item],
        temperature=1.0,
        template=template,
        expected_version=None,
        images=refs,
        sees_image=sees_image,
    )


@pytest.mark.parametrize("template", ["paper", "official"])
def test_layout_with_the_image(setup, template):
    teacher, spec, images, text, prompt_ids = setup
    req = request(setup, template=template)
    pairs, where, seq_images = teacher.sequences(req, req.images.resolve())
    (pos, neg), response = where[0], req.items[0].response_ids
    for index, answer in ((pos, "12"), (neg, "7")):
        ids, start = pairs[index]
        context = vision.expand_image_tokens(
            teacher_context_ids(teacher.tokenizer, text, answer, template), images[:1], spec
        )
        assert ids[:start] == context and ids[start:] == response  # the response appended unchanged
        assert ids.count(spec.image_token_id) == spec.tokens_for(images[0])
        assert len(seq_images[index]) == 1
        # the learner-side teacher's context (OPSD / SDPO) is the same
        ours = image_teacher_context(teacher.tokenizer, text, answer, template, images[:1], spec)
        assert ours[0] == context and len(ours[1]) == 1
    if template == "official":  # the student's own prompt, then the answer tokens
        assert pairs[pos][0][: len(prompt_ids)] == prompt_ids


@pytest.mark.parametrize("template", ["paper", "official"])
def test_blind_teacher_drops_the_image_but_not_from_p_s(setup, template):
    teacher, spec, _images, text, prompt_ids = setup
    req = request(setup, template=template, sees_image=False)
    pairs, where, seq_images = teacher.sequences(req, req.images.resolve())
    pos, _ = where[0]
    ids, start = pairs[pos]
    blind_text = text.replace(IMAGE_MARKUP, "")
    assert ids[:start] == teacher_context_ids(teacher.tokenizer, blind_text, "12", template)
    assert spec.image_token_id not in ids and spec.start_id not in ids and seq_images[pos] == []
    blind = image_teacher_context(
        teacher.tokenizer, text, "12", template, _images[:1], spec, sees_image=False
    )
    assert blind == (ids[:start], [])  # the learner-side teacher's (OPSD / SDPO) too
    # no r⁻: P_T⁻ := P_S, the student's own context with its image, whatever the teacher sees
    req = request(setup, template=template, sees_image=False, negative=None)
    pairs, where, seq_images = teacher.sequences(req, req.images.resolve())
    ids, start = pairs[where[0][1]]
    assert ids[:start] == prompt_ids and len(seq_images[where[0][1]]) == 1


def test_scores_depend_on_the_image(setup):
    teacher = setup[0]
    first = teacher.score(request(setup, image=0))
    second = teacher.score(request(setup, image=1))
    blind = [teacher.score(request(setup, image=k, sees_image=False)) for k in (0, 1)]
    assert np.abs(first.logp_pos[0] - second.logp_pos[0]).max() > 1e-3
    # the blind teacher's r⁺ context has no image: the same scores whichever image the problem has
    np.testing.assert_allclose(blind[0].logp_pos[0], blind[1].logp_pos[0], atol=1e-6)
    assert np.abs(blind[0].logp_pos[0] - first.logp_pos[0]).max() > 1e-3


def test_text_only_teacher_refuses_images(tiny_model_dir):
    teacher = TeacherReplica("teacher-t", "transformers", str(tiny_model_dir))
    try:
        item = TeacherItem(
            student_prompt="Compute 1+2.",
            student_prompt_ids=[1, 2],
            response_ids=[3],
            positive="3",
            negative=None,
        )
        refs = ImageRefs(batch=ImageBatch(arrays=[np.zeros((28, 28, 3), np.uint8)]), rows=[[0]])
        req = TeacherRequest(items=[item], temperature=1.0, expected_version=None, images=refs)
        with pytest.raises(ValueError, match="text-only"):
            teacher.score(req)
    finally:
        teacher.shutdown()
