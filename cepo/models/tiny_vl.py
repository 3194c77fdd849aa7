"""Tiny vision-language policies built offline: a Qwen2-VL (or Qwen2.5-VL / Qwen3-VL) of a few hundred thousand
parameters with its tokenizer and image processor saved beside it, as a Hub checkpoint would be.

:func:`save_random_vl` writes a randomly initialised model (tests: the paper's architecture class without its
weights); :mod:`cepo.models.tiny_vl_bootstrap` trains one on the offline image task.

Images are kept small: the processor's ``min_pixels`` / ``max_pixels`` bound each image to a few patches, and
images are resized beforehand to a multiple of ``patch_size × merge_size`` (see :mod:`cepo_services.common.vision`)
so every engine sees the same grid.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cepo.models.tokenizer import CHAT_TEMPLATE, EOS_TOKEN, IM_START, PAD_TOKEN

__all__ = ["VISION_TOKENS", "save_random_vl", "vl_config", "vl_tokenizer"]

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
VISION_TOKENS = [VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]


def vl_tokenizer(corpus: Iterable[str], vocab_size: int = 384):
    """The tiny byte-level BPE (digits single tokens) with Qwen's vision special tokens added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, IM_START, EOS_TOKEN, *VISION_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, *VISION_TOKENS],
        padding_side="left",
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


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
