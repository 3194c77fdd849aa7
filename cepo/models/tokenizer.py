"""A tiny byte-level BPE tokenizer for the arithmetic task, with a Qwen-like chat template.

Digits are always single tokens (``Digits(individual_digits=True)``), so every number is spelled digit by
digit and arithmetic stays learnable; byte-level fallback means any text encodes (unseen words cost more
tokens, never an unknown token). Saved as a transformers ``PreTrainedTokenizerFast`` folder that vLLM loads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["CHAT_TEMPLATE", "EOS_TOKEN", "IM_START", "PAD_TOKEN", "SPECIAL_TOKENS", "train_tokenizer"]

IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, EOS_TOKEN]
# Qwen's layout without its default system prompt: <|im_start|>role\ncontent<|im_end|>\n …
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tokenizer(
    corpus: Iterable[str], vocab_size: int = 384, extra_special: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """Train the BPE on ``corpus`` (deterministic for a given corpus) and wrap it for transformers;
    ``extra_special`` tokens (e.g. a vision-language model's image tokens) follow the three of the text model."""
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
        special_tokens=[*SPECIAL_TOKENS, *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, *extra_special],
        padding_side="left",
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
