"""Choosing the wrong-answer reference r⁻ for each group (paper Algorithm 1, line 4).

r⁻ is the final answer (answer only, not the reasoning) of the lowest-reward rollout in G⁻, the group's
rejected rollouts. Rules, in order:

1. Only rejected rollouts (``correct[i]`` is False) are candidates.
2. A rollout with no extractable answer (None, empty or blank) is not chosen while another rejected rollout
   has one. The literal text "None" is never produced for a missing answer.
3. Among the usable candidates the lowest reward wins; ties go to the first in batch order.
4. No usable candidate → ``None``: the caller sets P_T⁻ := P_S for that group, which is RLSD exactly
   (Theorem 1 iii).

Scope (``teacher.negative_scope``, :func:`row_negatives`): ``group`` (the paper) conditions every row of a
group on the group's r⁻; ``rollout`` conditions each wrong rollout with a usable answer on its *own* answer
(so the contrast at a wrong rollout's decisive token is between the right answer and the one it reached),
while right rollouts, and wrong ones without an answer, keep the group's r⁻.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

__all__ = ["NEGATIVE_SCOPES", "NegativeChoice", "row_negatives", "select_negative_answers"]

NEGATIVE_SCOPES = ("group", "rollout")


@dataclass(frozen=True)
class NegativeChoice:
    index: int  # position of the chosen rollout in the batch
    answer: str  # its extracted final answer: the text that conditions P_T⁻


def select_negative_answers(
    rewards: Sequence[float],
    group_ids: Sequence[Hashable],
    answers: Sequence[str | None],
    correct: Sequence[bool],
) -> dict[Hashable, NegativeChoice | None]:
    """Map every group id (in order of first appearance) to its r⁻ choice, or None when G⁻ has no answer."""
    n = len(rewards)
    for name, seq in (("group_ids", group_ids), ("answers", answers), ("correct", correct)):
        if len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries but rewards has {n}")

    chosen: dict[Hashable, NegativeChoice | None] = {}
    best_reward: dict[Hashable, float] = {}
    for i in range(n):
        key = group_ids[i]
        chosen.setdefault(key, None)
        answer = answers[i]
        if correct[i] or not _usable(answer):
            continue
        reward = float(rewards[i])
        if chosen[key] is None or reward < best_reward[key]:  # strict: ties keep the first
            chosen[key] = NegativeChoice(index=i, answer=answer)
            best_reward[key] = reward
    return chosen


def _usable(answer: str | None) -> bool:
    return answer is not None and bool(answer.strip())


def row_negatives(
    scope: str,
    chosen: dict[Hashable, NegativeChoice | None],
    group_ids: Sequence[Hashable],
    answers: Sequence[str | None],
    correct: Sequence[bool],
) -> list[NegativeChoice | None]:
    """r⁻ of every row: the group's choice (``chosen``, from :func:`select_negative_answers`), or with scope
    ``rollout`` a wrong rollout's own answer where it has one."""
    if scope not in NEGATIVE_SCOPES:
        raise ValueError(f"negative scope must be one of {', '.join(NEGATIVE_SCOPES)}, got {scope!r}")
    rows = [chosen[g] for g in group_ids]
    if scope == "rollout":
        for i, (answer, right) in enumerate(zip(answers, correct, strict=True)):
            if not right and _usable(answer):
                rows[i] = NegativeChoice(index=i, answer=answer)
    return rows
