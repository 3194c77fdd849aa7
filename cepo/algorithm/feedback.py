"""Feedback sources: which text conditions P_T⁺ and P_T⁻ (paper Table 5).

The reference placed in the teacher context is

- r⁺ (``teacher.positive``): ``ground_truth`` — the verified answer (paper default); ``peer_full`` /
  ``peer_prefix`` / ``peer_suffix`` — the whole response, or its first or second half, of a *correct peer*:
  the highest-reward correct rollout of the same group other than the scored row itself (ties: first in batch
  order). A row with no such peer (it is its group's only correct rollout, or the group has none) falls back
  to the ground truth: never to itself, whose tokens the teacher would then simply copy.
- r⁻ (``teacher.negative``): ``answer`` — the extracted final answer of the group's lowest-reward rejected
  rollout (Algorithm 1 line 4, paper default); ``full`` / ``prefix`` / ``suffix`` — that same rollout's
  whole response, or its first or second half.

Halves are cut in token space: the prefix is the first ⌈n/2⌉ response tokens, the suffix the remaining
⌊n/2⌋, each decoded on its own. A reference that decodes to blank text counts as missing (r⁺: ground truth;
r⁻: score under P_S, i.e. RLSD for that row).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "NEGATIVE_SOURCES",
    "POSITIVE_SOURCES",
    "negative_text",
    "peer_for",
    "positive_texts",
    "reference_text",
    "split_half",
]

POSITIVE_SOURCES = ("ground_truth", "peer_full", "peer_prefix", "peer_suffix")
NEGATIVE_SOURCES = ("answer", "full", "prefix", "suffix")


def split_half(response_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """(first ⌈n/2⌉ ids, last ⌊n/2⌋ ids)."""
    cut = (len(response_ids) + 1) // 2
    return list(response_ids[:cut]), list(response_ids[cut:])


def reference_text(
    kind: str, *, answer: str | None, response_ids: Sequence[int] | None, tokenizer: Any
) -> str | None:
    """The text of one reference: ``answer`` for answer kinds, else (part of) the decoded response.

    ``kind`` is any of POSITIVE_SOURCES or NEGATIVE_SOURCES (``peer_`` is ignored). None when missing/blank.
    """
    part = kind.removeprefix("peer_")
    if part in ("ground_truth", "answer"):
        text = answer
    elif part in ("full", "prefix", "suffix"):
        if response_ids is None:
            return None
        ids = list(response_ids)
        if part != "full":
            ids = split_half(ids)[0 if part == "prefix" else 1]
        text = tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
    else:
        allowed = ", ".join((*POSITIVE_SOURCES, *NEGATIVE_SOURCES))
        raise ValueError(f"unknown feedback source {kind!r}; allowed: {allowed}")
    return text if text is not None and text.strip() else None


def peer_for(
    row: int, group_rows: Sequence[int], rewards: Sequence[float], correct: Sequence[bool]
) -> int | None:
    """The correct peer of ``row``: the highest-reward correct rollout of its group other than itself."""
    best: int | None = None
    for i in group_rows:
        if i == row or not correct[i]:
            continue
        if best is None or rewards[i] > rewards[best]:
            best = i
    return best


def positive_texts(
    kind: str,
    groups: Sequence[int],
    answers: Sequence[str],
    rewards: Sequence[float],
    correct: Sequence[bool],
    response_ids: Sequence[Sequence[int]],
    tokenizer: Any,
) -> list[str]:
    """r⁺ of every row: its group's ground truth (``answers[group]``), or part of the row's correct peer."""
    members: dict[int, list[int]] = {}
    for row, group in enumerate(groups):
        members.setdefault(group, []).append(row)
    texts = []
    for row, group in enumerate(groups):
        answer = answers[group]
        peer = None if kind == "ground_truth" else peer_for(row, members[group], rewards, correct)
        if peer is None:  # ground truth asked for, or no correct peer besides the row itself
            texts.append(answer)
            continue
        text = reference_text(kind, answer=None, response_ids=response_ids[peer], tokenizer=tokenizer)
        texts.append(text or answer)
    return texts


def negative_text(
    kind: str, choice: Any, response_ids: Sequence[Sequence[int]], tokenizer: Any
) -> str | None:
    """r⁻ of a group: the chosen rejected rollout's answer, or (part of) its response; None → score under P_S."""
    if choice is None:
        return None
    return reference_text(
        kind, answer=choice.answer, response_ids=response_ids[choice.index], tokenizer=tokenizer
    )
