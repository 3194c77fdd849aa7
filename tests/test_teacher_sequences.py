"""Teacher sequences end with exactly the student's response ids; scores sit at exactly those positions."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from cepo_services.common.engines import score_token_logprobs
from cepo_services.common.templates import build_teacher_sequence, chat_prompt_ids, teacher_context_ids

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPT = "Compute 4+1+8. Solve the problem step by step, keeping reasoning brief.\nPut ONLY the final answer inside \\boxed{}"


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [PROMPT, "4+1=5. 5+8=13. \\boxed{13}", "Here is a sample answer: \\frac{1}{2}"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return Qwen2ForCausalLM(config).eval()


AWKWARD_RESPONSES = [
    " 4+1=5. 5+8=13. \\boxed{13}",  # starts with a space
    "\n4+1=5.\n5+8=13.\n\\boxed{13}",  # starts with a newline
    "\\boxed{\\frac{1}{2}}",  # braces
    "x",  # a single token
]


@pytest.mark.parametrize("template", ["paper", "official"])
@pytest.mark.parametrize("answer", ["13", "\\frac{1}{2}", "{a, b}", " 1 3"])
@pytest.mark.parametrize("response", AWKWARD_RESPONSES)
def test_sequence_ends_with_the_exact_response_ids(tokenizer, template, answer, response):
    response_ids = tokenizer.encode(response, add_special_tokens=False)
    context = teacher_context_ids(tokenizer, PROMPT, answer, template)
    seq = build_teacher_sequence(context, response_ids)
    assert seq.response_ids == response_ids
    assert seq.input_ids[: seq.response_start] == context
    # re-tokenizing the decoded text may merge across the boundary; concatenating ids never does
    assert tokenizer.decode(seq.input_ids[seq.response_start :]) == response


def test_paper_template_text(tokenizer):
    ids = teacher_context_ids(tokenizer, PROMPT, "13", "paper")
    text = tokenizer.decode(ids)
    assert text.endswith(
        "Put ONLY the final answer inside \\boxed{}.\nHere is a sample answer: 13<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("answer", ["{a, b}", "13", "\\frac{1}{2}"])
def test_official_template_puts_answer_right_before_response(tokenizer, answer):
    """The published code encodes f" {answer}": the answer's tokens carry the leading space (a byte-level BPE
    gives the space-prefixed tokens, not the bare ones) and follow the student's chat-templated prompt."""
    student = chat_prompt_ids(tokenizer, PROMPT)
    ids = teacher_context_ids(tokenizer, PROMPT, answer, "official")
    assert ids[: len(student)] == student
    hint = ids[len(student) :]
    assert hint == tokenizer.encode(" " + answer, add_special_tokens=False)
    assert hint != tokenizer.encode(answer, add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(hint[0]).startswith("Ġ")  # the space is in the first token
    assert tokenizer.decode(hint) == " " + answer


@pytest.mark.parametrize("answer", ["", "   "])
def test_empty_answer_is_refused(tokenizer, answer):
    with pytest.raises(ValueError, match="non-empty reference"):
        teacher_context_ids(tokenizer, PROMPT, answer)


def test_batched_scores_equal_single_forward(tokenizer, model):
    """Padding and batching do not change a score; positions are exactly the response tokens."""
    sequences = []
    for answer in ("13", "7"):
        for response in AWKWARD_RESPONSES:
            ids = tokenizer.encode(response, add_special_tokens=False)
            sequences.append(build_teacher_sequence(teacher_context_ids(tokenizer, PROMPT, answer), ids))
    pairs = [(seq.input_ids, seq.response_start) for seq in sequences]
    batched = score_token_logprobs(model, pairs, temperature=0.7, batch_size=8, pad_id=tokenizer.pad_token_id)
    batched = [torch.tensor(b) for b in batched]
    for seq, scores in zip(sequences, batched, strict=True):
        assert scores.shape == (len(seq.response_ids),)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq.input_ids])).logits[0].float() / 0.7
        logp = torch.log_softmax(logits, -1)
        want = torch.stack(
            [logp[t - 1, seq.input_ids[t]] for t in range(seq.response_start, len(seq.input_ids))]
        )
        assert torch.allclose(scores, want, atol=1e-5)
    # different contexts give different scores for the same response (the answer is seen)
    assert not torch.allclose(batched[0], batched[len(AWKWARD_RESPONSES)])
