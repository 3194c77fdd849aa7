"""Student prompts with their images, for evaluators that run one engine in-process (``cepo eval``).

A text model gets the chat-templated prompt ids as before (and image problems are refused, naming the problem);
a vision-language model gets each ``<image>`` as Qwen-VL's image markup, its image tokens expanded, and the
problem's images prepared once (decoded, resized to the processor's grid), as the trainer prepares them.

The image-blind baselines (``cepo eval --images``): ``grey`` keeps the prompt token for token and replaces every
figure by a uniform grey one of the same size (only the figure's content is missing); ``none`` removes the images
and their ``<image>`` placeholders (the text alone, for any model).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cepo_proto import Problem

__all__ = ["IMAGE_MODES", "student_inputs", "without_images"]

IMAGE_MODES = ("keep", "grey", "none")


def without_images(problems: Sequence[Problem]) -> list[Problem]:
    """The problems as text alone: images dropped, each ``<image>`` placeholder removed from the text."""
    from cepo_services.common.vision import IMAGE_PLACEHOLDER

    return [
        p.model_copy(update={"problem": p.problem.replace(IMAGE_PLACEHOLDER, "").strip(), "images": []})
        if p.images or IMAGE_PLACEHOLDER in p.problem
        else p
        for p in problems
    ]


def student_inputs(
    problems: Sequence[Problem],
    tokenizer: Any,
    model_path: str,
    prompt_template: str,
    *,
    images: str = "keep",
) -> tuple[list[list[int]], list[list[Any]] | None]:
    """(prompt ids, per prompt its prepared images or None for a text model). ``images`` (:data:`IMAGE_MODES`):
    ``keep`` them; ``grey``: every image replaced by a plain grey one of the same size, the prompt ids unchanged
    (what the policy answers without seeing the figure); ``none``: the text alone (:func:`without_images`)."""
    import numpy as np

    from cepo_services.common import vision
    from cepo_services.common.templates import chat_prompt_ids, image_prompt_text

    if images not in IMAGE_MODES:
        raise ValueError(f"images mode {images!r}; allowed: {', '.join(IMAGE_MODES)}")
    if images == "none":
        problems = without_images(problems)
    texts = [prompt_template.format(problem=p.problem) for p in problems]
    if not vision.is_vision_language(model_path):
        bad = next((p for p in problems if p.images), None)
        if bad is not None:
            raise ValueError(
                f"problem {bad.id} has {len(bad.images)} image(s) but {model_path} is a text-only model "
                "(no vision_config): use a vision-language model or text problems"
            )
        return [chat_prompt_ids(tokenizer, t) for t in texts], None
    spec = vision.vision_spec(model_path)
    ids, rows = [], []
    for text, p in zip(texts, problems, strict=True):
        count = p.problem.count(vision.IMAGE_PLACEHOLDER)
        if count != len(p.images):
            raise ValueError(
                f"problem {p.id}: {count} {vision.IMAGE_PLACEHOLDER} placeholder(s) but {len(p.images)} image(s)"
            )
        prepared = [
            vision.prepare_image(src, spec, where=f"problem {p.id}, image {k}")
            for k, src in enumerate(p.images)
        ]
        if images == "grey":
            prepared = [np.full_like(a, 128) for a in prepared]
        ids.append(
            vision.expand_image_tokens(chat_prompt_ids(tokenizer, image_prompt_text(text)), prepared, spec)
        )
        rows.append(prepared)
    return ids, rows
