"""Teacher token sequences: an answer-conditioned context followed by the student's response ids, unchanged.

The teacher scores the student's sampled tokens under a context that contains a reference answer (r⁺ or r⁻).
The response is never re-tokenized: its ids are appended to the context ids exactly as sampled, so the scored
positions are exactly the student's tokens (DESIGN.md, "token alignment").

Templates (``teacher.template``):
- ``paper`` (App. B): the user turn is the student prompt ending in ``\\boxed{}.``, then
  ``"\\nHere is a sample answer: {answer}"``; the assistant turn is the student's response.
- ``official``: the student's own chat-templated prompt, then the tokens of ``" {answer}"`` (a leading space,
  as the published code encodes it) right before the response (the published code's variant).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "IMAGE_MARKUP",
    "TeacherSequence",
    "build_teacher_sequence",
    "chat_prompt_ids",
    "image_prompt_text",
    "image_teacher_context",
    "strip_image_markup",
    "teacher_context_ids",
]

# What a problem's ``<image>`` placeholder becomes in a vision-language prompt (Qwen-VL's layout); the single
# ``<|image_pad|>`` is expanded to the image's token count afterwards (cepo_services.common.vision).
IMAGE_MARKUP = "<|vision_start|><|image_pad|><|vision_end|>"


def image_prompt_text(text: str, placeholder: str = "<image>") -> str:
    """``text`` with every ``placeholder`` replaced by :data:`IMAGE_MARKUP`."""
    return text.replace(placeholder, IMAGE_MARKUP)


def strip_image_markup(text: str) -> str:
    """``text`` without its images (the official code's blind teacher): each :data:`IMAGE_MARKUP` removed."""
    return text.replace(IMAGE_MARKUP, "")


TEACHER_HINT = "\nHere is a sample answer: {answer}"
OFFICIAL_HINT = " {answer}"  # the published code: f" {answer}" tokenized right after the generation prompt


@dataclass(frozen=True)
class TeacherSequence:
    """``input_ids[response_start:]`` are the student's response ids; those positions are scored."""

    input_ids: list[int]
    response_start: int

    @property
    def response_ids(self) -> list[int]:
        return self.input_ids[self.response_start :]


def _ids(result: Any) -> list[int]:
    """apply_chat_template returns a list, or a mapping with ``input_ids`` (transformers 5 ``return_dict``)."""
    if hasattr(result, "keys") and "input_ids" in result:
        result = result["input_ids"]
    return [int(i) for i in result]


def chat_prompt_ids(tokenizer: Any, user_text: str) -> list[int]:
    """Token ids of a single user turn followed by the assistant generation prompt."""
    messages = [{"role": "user", "content": user_text}]
    return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def teacher_context_ids(
    tokenizer: Any,
    student_prompt: str,
    answer: str,
    template: Literal["paper", "official"] = "paper",
) -> list[int]:
    """The context that precedes the response in a teacher sequence.

    ``student_prompt`` is the full student prompt text (the problem formatted with the student template);
    ``answer`` is the reference (r⁺ or r⁻) and must be non-empty: a missing r⁻ means "score under P_S", which
    is the student context, not a teacher context with an empty or "None" answer.
    """
    if not answer or not answer.strip():
        raise ValueError(
            "answer must be a non-empty reference; for a group without r⁻ score under P_S instead"
        )
    if template == "paper":
        # App. B writes the instruction as "...inside \boxed{}." for the teacher.
        prompt = student_prompt if student_prompt.endswith(".") else student_prompt + "."
        return chat_prompt_ids(tokenizer, prompt + TEACHER_HINT.format(answer=answer))
    if template == "official":
        return chat_prompt_ids(tokenizer, student_prompt) + [
            int(i) for i in tokenizer.encode(OFFICIAL_HINT.format(answer=answer), add_special_tokens=False)
        ]
    raise ValueError(f"unknown teacher template {template!r}; allowed: paper, official")


def image_teacher_context(
    tokenizer: Any,
    student_prompt: str,
    answer: str,
    template: Literal["paper", "official"],
    images: Sequence[Any],
    spec: Any,
    *,
    sees_image: bool = True,
) -> tuple[list[int], list[Any]]:
    """A teacher context of a problem with ``images`` (prepared, in placeholder order) and the images it holds.

    ``student_prompt`` carries :data:`IMAGE_MARKUP` per image. With ``sees_image`` the context keeps the markup and
    its ``<|image_pad|>`` is expanded exactly as in the student prompt (``spec``: the model's
    ``cepo_services.common.vision.VisionSpec``), and it holds the same images; without, the markup is removed
    from the text (the official code's blind teacher) and it holds none. Without images it is
    :func:`teacher_context_ids`' context and ``[]``.
    """
    if not images:
        return teacher_context_ids(tokenizer, student_prompt, answer, template), []
    if not sees_image:
        return teacher_context_ids(tokenizer, strip_image_markup(student_prompt), answer, template), []
    from cepo_services.common.vision import expand_image_tokens

    ids = teacher_context_ids(tokenizer, student_prompt, answer, template)
    return expand_image_tokens(ids, images, spec), list(images)


def build_teacher_sequence(context_ids: Sequence[int], response_ids: Sequence[int]) -> TeacherSequence:
    """Concatenate ids; the response is appended unchanged."""
    if not response_ids:
        raise ValueError("response_ids is empty: there is nothing to score")
    return TeacherSequence(
        input_ids=[*map(int, context_ids), *map(int, response_ids)], response_start=len(context_ids)
    )
