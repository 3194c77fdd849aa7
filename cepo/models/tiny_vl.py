"""Tiny vision-language policies built offline: a Qwen2-VL (or Qwen2.5-VL / Qwen3-VL) of a few hundred thousand
parameters with its tokenizer and image processor saved beside it, as a Hub checkpoint would be.

:func:`save_random_vl` writes a randomly initialised model (tests: the paper's architecture class without its
weights); :mod:`cepo.models.tiny_vl_bootstrap` trains one on the offline image task.

Images are kept small: the processor's ``min_pixels`` / ``max_pixels`` bound each image to a few patches, and
images are resized beforehand to a multiple of ``patch_size × merge_size`` (see :mod:`cepo_services.common.vision`)
so every engine sees the same grid.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_VL_OUT",
    "VISION_TOKENS",
    "TinyVLSettings",
    "build_tiny_vl_model",
    "ensure_tiny_vl",
    "evaluate_vl",
    "save_random_vl",
    "vl_config",
    "vl_tokenizer",
]

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
VISION_TOKENS = [VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]


def vl_tokenizer(corpus: Iterable[str], vocab_size: int = 384):
    """The tiny byte-level BPE (digits single tokens) with Qwen's vision special tokens added."""
    from cepo.models.tokenizer import train_tokenizer

    return train_tokenizer(corpus, vocab_size, extra_special=VISION_TOKENS)


def vl_config(
    tokenizer: Any,
    *,
    arch: str = "qwen2_vl",
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 512,
    vision_depth: int = 1,
    vision_embed: int = 128,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = True,
):
    """A tiny config of the family ``arch`` (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``), head_dim 64."""
    from transformers import AutoConfig

    ids = {
        name: tokenizer.convert_tokens_to_ids(t)
        for name, t in zip(("start", "end", "image", "video"), VISION_TOKENS, strict=True)
    }
    head_dim = hidden_size // num_heads
    unit = head_dim // 16  # M-RoPE sections (t, h, w) = 2:3:3 units, summing to head_dim / 2
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "max_position_embeddings": max_position_embeddings,
        "bos_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": tie_word_embeddings,
    }
    if arch == "qwen3_vl":
        text |= {
            "head_dim": head_dim,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2 * unit, 3 * unit, 3 * unit],
                "mrope_interleaved": True,
            },
        }
        vision = {
            "depth": vision_depth,
            "hidden_size": vision_embed,
            "intermediate_size": 2 * vision_embed,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": hidden_size,
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": [0],
        }
    else:
        text |= {
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2 * unit, 3 * unit, 3 * unit],
            }
        }
        vision = {
            "depth": vision_depth,
            "hidden_size": hidden_size,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        }
        if arch == "qwen2_5_vl":
            vision |= {
                "out_hidden_size": hidden_size,
                "hidden_size": vision_embed,
                "intermediate_size": 2 * vision_embed,
                "fullatt_block_indexes": [0],
                "window_size": 56,
            }
        else:
            vision |= {"embed_dim": vision_embed}
    return AutoConfig.for_model(
        arch,
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["start"],
        vision_end_token_id=ids["end"],
        tie_word_embeddings=tie_word_embeddings,
    )


def image_processor(config: Any, *, max_side: int = 112):
    """The family's image processor bounded to at most ``max_side``² pixels (a handful of patches)."""
    patch = config.vision_config.patch_size
    unit = patch * config.vision_config.spatial_merge_size
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(
        patch_size=patch,
        merge_size=config.vision_config.spatial_merge_size,
        temporal_patch_size=config.vision_config.temporal_patch_size,
        min_pixels=unit * unit,
        max_pixels=max_side * max_side,
        # transformers 5 names them size={"shortest_edge", "longest_edge"} as pixel counts
        size={"shortest_edge": unit * unit, "longest_edge": max_side * max_side},
    )


def save_processor(folder: Path, config: Any, tokenizer: Any, *, max_side: int = 112) -> Any:
    """Save the family's processor (image + video processor, tokenizer, chat template) into ``folder``."""
    from transformers import Qwen2VLVideoProcessor

    images = image_processor(config, max_side=max_side)
    video = Qwen2VLVideoProcessor(
        patch_size=images.patch_size,
        merge_size=images.merge_size,
        temporal_patch_size=images.temporal_patch_size,
    )
    if config.model_type == "qwen3_vl":
        from transformers import Qwen3VLProcessor as Processor
    elif config.model_type == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor as Processor
    else:
        from transformers import Qwen2VLProcessor as Processor
    processor = Processor(
        image_processor=images,
        tokenizer=tokenizer,
        video_processor=video,
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(folder)
    return processor


def save_random_vl(
    folder: str | Path, *, arch: str = "qwen2_vl", seed: int = 0, corpus: Iterable[str] = (), **sizes
) -> Path:
    """A randomly initialised tiny VL model of family ``arch`` with tokenizer and processor, saved to ``folder``."""
    import torch
    from transformers import AutoModelForImageTextToText

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = list(corpus) or [
        f"Compute {a}+{b}. Find x in the figure. \\boxed{{{a + b}}}" for a in range(10) for b in range(10)
    ]
    tokenizer = vl_tokenizer(text, vocab_size=384)
    config = vl_config(tokenizer, arch=arch, **sizes)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    save_processor(folder, config, tokenizer)
    return folder


# ---------------------------------------------------------------------------------------------------------
# `cepo bootstrap --vl`: the tiny VL policy warmed up on the offline image task (cepo.tasks.image_arith)

# v2: one intra-op thread (v1 used up to two; the float sums, hence the weights, differ)
VL_BUILD_VERSION = "tiny-vl-v2"
# The warm-up's matrices are small (hidden 128, batch 32 × ~90 tokens): a second intra-op thread gains little on
# an idle machine, and on a shared, oversubscribed one its threads wait for each other at every op — measured
# here under a load average of 10–35 on 2 cores: 9–16 s a step with two threads, 1.3–1.7 s with one. One thread
# also makes the build the same on any machine, whatever its core count.
BUILD_THREADS = 1
DEFAULT_VL_OUT = Path("models/tiny-vl")


@dataclass(frozen=True)
class TinyVLSettings:
    """Everything that determines the built VL model and its dataset (hashed into the manifest)."""

    seed: int = 1
    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 256
    vision_depth: int = 1
    vision_embed: int = 128
    # dataset (Geo3k layout, in <out>/data)
    train_size: int = 4000
    test_size: int = 200
    more_operands_size: int = 100
    # supervised warm-up
    wrong_step_fraction: float = 0.55  # student demonstrations with one wrong addition (x always read right)
    teacher_fraction: float = 0.15  # the paper's teacher form, correct chain
    teacher_wrong_fraction: float = 0.10  # … with a wrong sample answer, followed to it
    batch_size: int = 32
    steps: int = 500
    lr: float = 4e-3
    warmup_steps: int = 40
    grad_clip: float = 1.0
    eval_size: int = 200
    max_new_tokens: int = 40

    def digest(self) -> str:
        from cepo.models._cache import settings_hash
        from cepo.tasks import image_arith

        return settings_hash(
            {
                "build": VL_BUILD_VERSION,
                "task": image_arith.TASK_VERSION,
                "settings": dataclasses.asdict(self),
            }
        )


class _VLData:
    """Prompt ids (image tokens expanded) and prepared images of the task's problems, made once."""

    def __init__(self, tok, spec, problems) -> None:
        from cepo.config import STUDENT_PROMPT
        from cepo.tasks import image_arith
        from cepo_services.common.templates import chat_prompt_ids, image_prompt_text, teacher_context_ids
        from cepo_services.common.vision import decode_image, expand_image_tokens, prepare_image

        self.tok, self.spec, self.problems = tok, spec, problems
        self.images = [
            prepare_image(decode_image(image_arith.draw_digit(p.x, p.style)), spec) for p in problems
        ]
        self.texts = [STUDENT_PROMPT.format(problem=image_prompt_text(p.problem)) for p in problems]
        self._expand = lambda ids, i: expand_image_tokens(ids, [self.images[i]], spec)
        self.prompts = [self._expand(chat_prompt_ids(tok, t), i) for i, t in enumerate(self.texts)]
        self._teacher = lambda i, answer: self._expand(teacher_context_ids(tok, self.texts[i], answer), i)

    def teacher_prompt(self, i: int, answer: str) -> list[int]:
        return self._teacher(i, answer)


def _vl_demonstration(data: _VLData, i: int, rng, settings: TinyVLSettings) -> tuple[list[int], str]:
    from cepo.tasks import image_arith

    p = data.problems[i]
    roll = rng.random()
    if roll < settings.teacher_fraction:
        return data.teacher_prompt(i, p.answer), image_arith.solution(p)
    roll -= settings.teacher_fraction
    if roll < settings.teacher_wrong_fraction:
        wrong = image_arith.inject_error(p, rng)
        hint = wrong[wrong.rindex("\\boxed{") + len("\\boxed{") : -1]
        return data.teacher_prompt(i, hint), wrong
    if rng.random() < settings.wrong_step_fraction:
        return data.prompts[i], image_arith.inject_error(p, rng)
    return data.prompts[i], image_arith.solution(p)


def evaluate_vl(
    model, data: _VLData, *, temperature: float, seed: int, blind: bool = False, max_new_tokens: int = 40
) -> float:
    """Accuracy on ``data`` (transformers generate, graded by the verifier); ``blind``: every image replaced
    by a plain grey one of the same size (what the model answers without seeing the figure)."""
    import numpy as np
    import torch

    from cepo_services.common.vision import vision_kwargs
    from cepo_services.verifier import grade

    tok = data.tok
    pad, eos = tok.pad_token_id, tok.eos_token_id
    images = [np.full_like(a, 128) if blind else a for a in data.images]
    correct, batch = 0, 100
    processor = data.spec.processor.image_processor
    for start in range(0, len(data.prompts), batch):
        prompts = data.prompts[start : start + batch]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        extra = vision_kwargs(
            ids, [[a] for a in images[start : start + batch]], processor, data.spec.image_token_id
        )
        torch.manual_seed(seed + start)
        sampling = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                **extra,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
                **sampling,
            )
        texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
        problems = data.problems[start : start + batch]
        correct += sum(bool(grade(t, p.answer).correct) for t, p in zip(texts, problems, strict=True))
    return correct / len(data.prompts)


def build_tiny_vl_model(
    out: str | Path = DEFAULT_VL_OUT,
    *,
    seed: int = 1,
    force: bool = False,
    minutes: float = 10.0,
    settings: TinyVLSettings | None = None,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], bool]:
    """Build (or reuse) the tiny VL policy and its dataset at ``out`` (``out/data``: Geo3k's layout). Returns
    (manifest, built); cached by a settings hash like ``cepo bootstrap``'s text model."""
    from cepo.models._cache import build_lock, read_manifest

    settings = settings or TinyVLSettings(seed=seed)
    if settings.seed != seed:
        settings = dataclasses.replace(settings, seed=seed)
    out, digest = Path(out), settings.digest()

    def cached() -> dict[str, Any] | None:
        manifest = read_manifest(out)
        if not manifest or manifest.get("settings_hash") != digest or not (out / "config.json").is_file():
            return None
        return manifest if manifest.get("training", {}).get("stopped_by") == "steps" else None

    if not force and (manifest := cached()) is not None:
        return manifest, False
    with build_lock(out):
        if not force and (manifest := cached()) is not None:
            return manifest, False
        return _build_vl(out, settings, digest, minutes, log), True


def ensure_tiny_vl(model_path: str, log: Callable[[str], None] = print) -> bool:
    """Build the tiny VL model on first use — when ``model_path`` is the default tiny-VL folder and holds no
    model, or a build of another recipe version (its manifest's settings hash differs). Returns True if it
    built one. Any other path is the user's model, used as it is."""
    from cepo.models._cache import read_manifest

    path = Path(model_path)
    if path.resolve() != DEFAULT_VL_OUT.resolve():
        return False
    manifest = read_manifest(path) or {}
    if (path / "config.json").is_file() and manifest.get("settings_hash") == TinyVLSettings().digest():
        return False
    why = "is missing" if not (path / "config.json").is_file() else "is a build of another recipe"
    log(f"{path} {why}: building the tiny vision-language model (cepo bootstrap --vl, a few minutes)")
    return build_tiny_vl_model(path, minutes=60.0, log=log)[1]


def _build_vl(out: Path, settings: TinyVLSettings, digest: str, minutes: float, log_line) -> dict[str, Any]:
    import json
    import platform
    import random
    import time

    import torch
    import transformers
    from transformers import AutoModelForImageTextToText, GenerationConfig

    from cepo.config import STUDENT_PROMPT
    from cepo.models._cache import MANIFEST, staged_folder
    from cepo.models.bootstrap import sft_tensors
    from cepo.tasks import image_arith
    from cepo_services.common.vision import vision_kwargs

    t0 = time.monotonic()
    deadline = t0 + minutes * 60 - 60
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)

    def log(message: str) -> None:
        log_line(f"{time.monotonic() - t0:6.1f}s {message}")

    try:
        with staged_folder(out) as tmp:
            log(f"building tiny VL policy → {out} (seed {settings.seed}, settings {digest[:12]})")
            sizes = {
                "train": settings.train_size,
                "test": settings.test_size,
                "more_operands": settings.more_operands_size,
            }
            image_arith.write_dataset(tmp, sizes, seed=settings.seed)
            pool = image_arith.generate("train", settings.train_size, seed=settings.seed)
            from cepo_services.common.templates import image_prompt_text

            prompts = [STUDENT_PROMPT.format(problem=image_prompt_text(p.problem)) for p in pool[:500]]
            corpus = [
                f"<|im_start|>user\n{t}.\nHere is a sample answer: {p.answer}<|im_end|>\n"
                for t, p in zip(prompts, pool, strict=False)
            ]
            corpus += ["<|im_start|>assistant\n"] * 200 + [image_arith.solution(p) for p in pool[:2000]]
            tok = vl_tokenizer(corpus, vocab_size=settings.vocab_size)
            config = vl_config(
                tok,
                hidden_size=settings.hidden_size,
                num_layers=settings.num_layers,
                num_heads=settings.num_heads,
                intermediate_size=settings.intermediate_size,
                vision_depth=settings.vision_depth,
                vision_embed=settings.vision_embed,
                max_position_embeddings=512,
            )
            torch.manual_seed(settings.seed)
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
            model.generation_config = GenerationConfig(
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                max_new_tokens=settings.max_new_tokens,
            )
            tok.save_pretrained(tmp)
            save_processor(tmp, config, tok)
            from cepo_services.common.vision import VisionSpec

            model.save_pretrained(tmp)  # a first save so the processor and spec load from the folder
            spec = VisionSpec(str(tmp))
            data = _VLData(tok, spec, pool)
            n_params = sum(p.numel() for p in model.parameters())
            log(f"tokenizer: {len(tok)} tokens; model: Qwen2-VL, {n_params:,} parameters; data: {sizes}")
            rng = random.Random(f"sft/{settings.seed}")
            optimizer = torch.optim.AdamW(
                model.parameters(), lr=settings.lr, betas=(0.9, 0.98), weight_decay=0.01
            )
            processor = spec.processor.image_processor
            model.train()
            step, losses, stopped_by = 0, [], "steps"
            while step < settings.steps:
                if time.monotonic() > deadline:
                    stopped_by = "time"
                    break
                rows, images = [], []
                for _ in range(settings.batch_size):
                    i = rng.randrange(len(pool))
                    prompt, response = _vl_demonstration(data, i, rng, settings)
                    rows.append((prompt, [*tok.encode(response, add_special_tokens=False), tok.eos_token_id]))
                    images.append([data.images[i]])
                ids, mask, labels = sft_tensors(rows, tok.pad_token_id)
                if step < settings.warmup_steps:
                    lr = settings.lr * (step + 1) / settings.warmup_steps
                else:
                    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
                    lr = settings.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
                for group in optimizer.param_groups:
                    group["lr"] = lr
                extra = vision_kwargs(ids, images, processor, spec.image_token_id)
                loss = model(input_ids=ids, attention_mask=mask, labels=labels, **extra).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
                optimizer.step()
                losses.append(float(loss.detach()))
                step += 1
                if step % max(1, settings.steps // 10) == 0:
                    log(f"step {step}/{settings.steps}  loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
            model.eval()
            test = image_arith.generate("test", settings.eval_size, seed=settings.seed)
            held = _VLData(tok, spec, test)
            accuracy = {
                "sampled_t1": evaluate_vl(model, held, temperature=1.0, seed=settings.seed),
                "greedy": evaluate_vl(model, held, temperature=0.0, seed=settings.seed),
                "blind_sampled_t1": evaluate_vl(model, held, temperature=1.0, seed=settings.seed, blind=True),
                "blind_greedy": evaluate_vl(model, held, temperature=0.0, seed=settings.seed, blind=True),
            }
            log(
                "test: sampled {sampled_t1:.1%}, greedy {greedy:.1%}; image-blind (grey image): sampled "
                "{blind_sampled_t1:.1%}, greedy {blind_greedy:.1%}".format(**accuracy)
            )
            manifest = {
                "kind": "tiny-vl",
                "task": "image_arith",
                "settings_hash": digest,
                "build_version": VL_BUILD_VERSION,
                "task_version": image_arith.TASK_VERSION,
                "settings": dataclasses.asdict(settings),
                "parameters": n_params,
                "vocab_size": len(tok),
                "training": {
                    "steps_done": step,
                    "stopped_by": stopped_by,
                    "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
                },
                "accuracy": {"test": accuracy},
                "build_seconds": round(time.monotonic() - t0, 1),
                "threads": BUILD_THREADS,
                "versions": {
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "python": platform.python_version(),
                },
            }
            model.save_pretrained(tmp)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        log(f"saved {out} in {manifest['build_seconds']:.0f}s")
        return manifest
    finally:
        torch.set_num_threads(threads)
