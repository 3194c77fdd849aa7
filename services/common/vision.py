"""Vision-language models: which class loads a model, LoRA targets on its language model, and image inputs.

A model is vision-language when its config has a ``vision_config`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): it loads with
``AutoModelForImageTextToText`` and its ``AutoProcessor``; every other model loads with ``AutoModelForCausalLM``
exactly as before.

Images are decoded and resized once per problem on the controller (:func:`prepare_image`): RGB, each side a
multiple of the model's ``patch_size × spatial_merge_size`` and the area within its processor's pixel bounds, so
the processor's own resize is the identity and every engine (vLLM, transformers, the learner) computes the same
grid. Prompts carry the image tokens already expanded (:func:`expand_image_tokens`): ``<|vision_start|>``, one
``<|image_pad|>`` per merged patch, ``<|vision_end|>`` — the ids the learner and the teacher see are the ids vLLM
generated from, so the response ids are appended to an identical context everywhere.
"""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "IMAGE_PLACEHOLDER",
    "VisionSpec",
    "decode_image",
    "expand_image_tokens",
    "image_features",
    "is_vision_language",
    "language_lora_targets",
    "load_model",
    "model_config",
    "prepare_image",
    "vision_spec",
]

IMAGE_PLACEHOLDER = "<image>"  # Geo3k's placeholder in the problem text
MAX_IMAGE_BYTES = 32 * 2**20  # an encoded image larger than this is refused (a decompression-bomb guard too)
MAX_DECODED_PIXELS = 64 * 2**20


@lru_cache(maxsize=8)
def model_config(model_path: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path)


def is_vision_language(model_path: str) -> bool:
    """Does the model at ``model_path`` take images (its config has a vision tower)?"""
    return getattr(model_config(model_path), "vision_config", None) is not None


def load_model(model_path: str, dtype: str = "float32") -> Any:
    """The model with the class its config calls for: image-text-to-text for VL models, else causal LM."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cls = AutoModelForImageTextToText if is_vision_language(model_path) else AutoModelForCausalLM
    return cls.from_pretrained(model_path, dtype=getattr(torch, dtype))


def language_lora_targets(model_path: str, names: Sequence[str]) -> list[str] | str:
    """peft ``target_modules``: the names as given for a text model; for a VL model a regex matching those
    projections inside the language model only, so the vision tower (which has ``qkv``, ``fc1`` or, in Qwen2.5-VL,
    its own ``gate_proj``) stays frozen and ``lm_head`` is never a target. vLLM's LoRA loader accepts the regex."""
    if "lm_head" in names:
        raise ValueError("lm_head may not be a LoRA target (vLLM ignores LoRA on lm_head when scoring)")
    if not is_vision_language(model_path):
        return list(names)
    alternatives = "|".join(re.escape(n) for n in names)
    return rf".*language_model.*\.({alternatives})"


class VisionSpec:
    """What the controller needs of a VL model to prepare images and expand their tokens."""

    def __init__(self, model_path: str) -> None:
        from transformers import AutoProcessor

        config = model_config(model_path)
        self.processor = AutoProcessor.from_pretrained(model_path)
        images = self.processor.image_processor
        self.patch = int(images.patch_size)
        self.merge = int(images.merge_size)
        self.unit = self.patch * self.merge
        size = getattr(images, "size", None) or {}
        self.min_pixels = int(size.get("shortest_edge") or getattr(images, "min_pixels", self.unit**2))
        self.max_pixels = int(size.get("longest_edge") or getattr(images, "max_pixels", 1024 * 1024))
        self.image_token_id = int(config.image_token_id)
        self.start_id = int(config.vision_start_token_id)
        self.end_id = int(config.vision_end_token_id)

    def tokens_for(self, image: np.ndarray) -> int:
        """Image tokens of an image already prepared by :func:`prepare_image` (merged patches)."""
        h, w = image.shape[:2]
        return (h // self.patch) * (w // self.patch) // (self.merge * self.merge)


@lru_cache(maxsize=4)
def vision_spec(model_path: str) -> VisionSpec:
    return VisionSpec(model_path)


def decode_image(source: str | bytes, *, where: str = "image") -> Any:
    """A PIL RGB image from a path, a ``data:`` URI or raw bytes; a clear error naming ``where`` otherwise."""
    from PIL import Image

    try:
        if isinstance(source, bytes):
            raw = source
        elif source.startswith("data:"):
            raw = base64.b64decode(source.split(",", 1)[1])
        else:
            path = Path(source)
            size = path.stat().st_size
            if size > MAX_IMAGE_BYTES:
                raise ValueError(f"{size} bytes, more than {MAX_IMAGE_BYTES}")
            raw = path.read_bytes()
        if len(raw) > MAX_IMAGE_BYTES:
            raise ValueError(f"{len(raw)} bytes, more than {MAX_IMAGE_BYTES}")
        image = Image.open(io.BytesIO(raw))
        if image.width * image.height > MAX_DECODED_PIXELS:
            raise ValueError(f"{image.width}×{image.height} pixels, more than {MAX_DECODED_PIXELS}")
        image.load()
        return image.convert("RGB")
    except Exception as exc:  # any decoder failure is the same user error
        if isinstance(source, bytes):
            label = f"<{len(source)} bytes>"
        elif source.startswith("data:"):
            label = source[:40] + "…"
        else:
            label = source  # a path, whole
        raise ValueError(f"{where}: unreadable image {label!r}: {exc}") from None


def prepare_image(source: Any, spec: VisionSpec, *, where: str = "image") -> np.ndarray:
    """Decode once and resize so the processor's resize is the identity: [H, W, 3] uint8, H and W multiples of
    ``spec.unit``, H·W within the processor's pixel bounds (aspect ratio kept as closely as the grid allows)."""
    from PIL import Image

    image = source if isinstance(source, Image.Image) else decode_image(source, where=where)
    image = image.convert("RGB")
    unit, w, h = spec.unit, image.width, image.height
    scale = 1.0
    if w * h > spec.max_pixels:
        scale = math.sqrt(spec.max_pixels / (w * h))
    elif w * h < spec.min_pixels:
        scale = math.sqrt(spec.min_pixels / (w * h))
    nw = max(unit, round(w * scale / unit) * unit)
    nh = max(unit, round(h * scale / unit) * unit)
    while nw * nh > spec.max_pixels and max(nw, nh) > unit:
        if nw >= nh:
            nw -= unit
        else:
            nh -= unit
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def expand_image_tokens(ids: Sequence[int], images: Sequence[np.ndarray], spec: VisionSpec) -> list[int]:
    """Prompt ids with each ``<|image_pad|>`` (one per image, inside ``<|vision_start|> … <|vision_end|>``)
    expanded to the image's token count, as the processor and vLLM expand it."""
    out: list[int] = []
    k = 0
    for token in ids:
        if token == spec.image_token_id:
            if k >= len(images):
                raise ValueError(f"{k + 1} image placeholders but {len(images)} images")
            out.extend([spec.image_token_id] * spec.tokens_for(images[k]))
            k += 1
        else:
            out.append(int(token))
    if k != len(images):
        raise ValueError(f"{k} image placeholders but {len(images)} images")
    return out


def image_features(image_processor: Any, images: Sequence[np.ndarray]) -> tuple[Any, Any]:
    """(pixel_values [patches, D], image_grid_thw [n, 3]) of ``images`` in order, as the model's forward takes them."""
    import torch

    if not images:
        return None, None
    out = image_processor(images=[np.array(a) for a in images], return_tensors="pt")  # writable copies
    return out["pixel_values"].to(torch.float32), out["image_grid_thw"]


def to_pil(images: Sequence[np.ndarray]) -> list[Any]:
    from PIL import Image

    return [Image.fromarray(np.asarray(a, dtype=np.uint8)) for a in images]


def vision_kwargs(
    input_ids: Any, images: Sequence[Sequence[np.ndarray]] | None, image_processor: Any, image_token_id: int
) -> dict[str, Any]:
    """The forward's image arguments for a batch whose row i carries ``images[i]`` (in placeholder order):
    pixel values and grid sizes concatenated row by row, and ``mm_token_type_ids`` (1 at image tokens), from
    which the model computes its own M-RoPE positions. Empty when no row has an image."""
    flat = [a for row in images or () for a in row]
    if not flat:
        return {}
    pixel_values, grid = image_features(image_processor, flat)
    device = input_ids.device
    return {
        "pixel_values": pixel_values.to(device),
        "image_grid_thw": grid.to(device),
        "mm_token_type_ids": (input_ids == image_token_id).int(),
    }


def collapse_image_tokens(ids: Sequence[int], image_token_id: int) -> list[int]:
    """Each run of ``<|image_pad|>`` as one token: the prompt as vLLM takes it with multi-modal data (vLLM expands
    it again from the image; the engine checks the expansion equals ``ids``)."""
    out: list[int] = []
    for token in ids:
        if token == image_token_id and out and out[-1] == image_token_id:
            continue
        out.append(int(token))
    return out
