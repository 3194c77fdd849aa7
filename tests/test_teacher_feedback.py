"""Feedback sources (paper Table 5) and templates build exactly the specified teacher token sequences."""

from __future__ import annotations

import numpy as np
import pytest
from _tiny import tiny_tokenizer

from cepo.algorithm.feedback import negative_text, peer_for, positive_texts, reference_text, split_half
from cepo.algorithm.negatives import select_negative_answers
from cepo.config import load_config
from cepo_proto.pipeline import Rollout
from cepo_services.common.templates import build_teacher_sequence, teacher_context_ids

PROMPT = "Compute 4+1+8. Solve the problem step by step, keeping reasoning brief.\nPut ONLY the final answer inside \\boxed{}"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_split_half_cuts_in_token_space():
    assert split_half([1, 2, 3, 4, 5]) == ([1, 2, 3], [4, 5])
    assert split_half([1, 2, 3, 4]) == ([1, 2], [3, 4])
    assert split_half([7]) == ([7], [])
    assert split_half([]) == ([], [])


def test_reference_text_kinds(tok):
    ids = tok.encode("4+1=5. 5+8=13. \\boxed{13}", add_special_tokens=False)
    first, second = split_half(ids)
    assert reference_text("ground_truth", answer="13", response_ids=ids, tokenizer=tok) == "13"
    assert reference_text("answer", answer="12", response_ids=ids, tokenizer=tok) == "12"
    assert reference_text("full", answer="12", response_ids=ids, tokenizer=tok) == tok.decode(ids)
    assert reference_text("peer_prefix", answer=None, response_ids=ids, tokenizer=tok) == tok.decode(first)
    assert reference_text("suffix", answer=None, response_ids=ids, tokenizer=tok) == tok.decode(second)
    # blank references count as missing
    assert reference_text("answer", answer="  ", response_ids=ids, tokenizer=tok) is None
    assert reference_text("suffix", answer=None, response_ids=ids[:1], tokenizer=tok) is None
    with pytest.raises(ValueError, match="unknown feedback source 'middle'"):
        reference_text("middle", answer="1", response_ids=ids, tokenizer=tok)


def test_peer_is_the_best_correct_other_rollout():
    rewards = [1.0, 0.0, 1.0, 1.0]
    correct = [True, False, True, True]
    assert peer_for(0, [0, 1, 2, 3], rewards, correct) == 2  # ties: first in batch order, never itself
    assert peer_for(2, [0, 1, 2, 3], rewards, correct) == 0
    assert peer_for(1, [0, 1, 2, 3], rewards, correct) == 0
    assert peer_for(0, [0, 1], rewards, correct) is None  # the only correct rollout of its group


def _rollout(tok, text: str) -> Rollout:
    ids = tok.encode(text, add_special_tokens=False)
    return Rollout(
        prompt_index=0,
        response_ids=ids,
        logprobs=np.zeros(len(ids)),
        text=text,
        finish_reason="stop",
        policy_version=0,
    )


def _paper(tok, text: str) -> list[int]:
    messages = [{"role": "user", "content": PROMPT + ".\nHere is a sample answer: " + text}]
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _official(tok, text: str) -> list[int]:
    out = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True
    )
    # the published code encodes f" {answer}": a leading space before the hint
    return [
        *(out["input_ids"] if hasattr(out, "keys") else out),
        *tok.encode(" " + text, add_special_tokens=False),
    ]


@pytest.mark.parametrize("template", ["paper", "official"])
@pytest.mark.parametrize("positive", ["ground_truth", "peer_full", "peer_prefix", "peer_suffix"])
@pytest.mark.parametrize("negative", ["answer", "full", "prefix", "suffix"])
def test_every_variant_builds_the_specified_sequence(tok, tmp_path, template, positive, negative):
    cfg = load_config(
        None,
        [
            "data.source=arithmetic",
            f"teacher.template={template}",
            f"teacher.positive={positive}",
            f"teacher.negative={negative}",
        ],
    )
    texts = ["4+1=5. 5+8=13. \\boxed{13}", "4+1=5. 5+8=12. \\boxed{12}", "4+1=5. 5+8=13. So \\boxed{13}"]
    rollouts = [_rollout(tok, t) for t in texts]
    ids = [r.response_ids for r in rollouts]
    rewards, correct = [1.0, 0.0, 1.0], [True, False, True]
    choice = select_negative_answers(rewards, [0, 0, 0], ["13", "12", "13"], correct)[0]
    assert choice.index == 1

    scored = 0  # the first (correct) rollout
    peer_ids = rollouts[2].response_ids  # its correct peer
    wrong_ids = rollouts[1].response_ids
    expected_pos = {
        "ground_truth": "13",
        "peer_full": tok.decode(peer_ids),
        "peer_prefix": tok.decode(split_half(peer_ids)[0]),
        "peer_suffix": tok.decode(split_half(peer_ids)[1]),
    }[positive]
    expected_neg = {
        "answer": "12",
        "full": tok.decode(wrong_ids),
        "prefix": tok.decode(split_half(wrong_ids)[0]),
        "suffix": tok.decode(split_half(wrong_ids)[1]),
    }[negative]
    kind = cfg.teacher.positive
    pos = positive_texts(kind, [0, 0, 0], ["13"], rewards, correct, ids, tok)[scored]
    neg = negative_text(cfg.teacher.negative, choice, ids, tok)
    assert (pos, neg) == (expected_pos, expected_neg)

    build = _paper if template == "paper" else _official
    response = rollouts[scored].response_ids
    for text in (pos, neg):
        seq = build_teacher_sequence(teacher_context_ids(tok, PROMPT, text, template), response)
        assert seq.input_ids == [*build(tok, text), *response]
        assert seq.response_ids == response

    # the only correct rollout of a group has no peer: r⁺ falls back to the ground truth, never itself
    assert positive_texts(kind, [0, 0, 1], ["13", "7"], rewards, correct, ids, tok)[scored] == "13"
