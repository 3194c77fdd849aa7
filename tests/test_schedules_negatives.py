"""λ and learning-rate schedules (pure functions of the step) and the r⁻ choice (Algorithm 1, line 4)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cepo.algorithm.negatives import NegativeChoice, row_negatives, select_negative_answers
from cepo.algorithm.schedules import lambda_at
from cepo_services.learner.schedules import lr_at


def test_linear_lambda_matches_the_paper():
    # paper: λ₀ 0.5 linear → 0 over 25 steps
    assert lambda_at(0) == 0.5
    assert lambda_at(5) == pytest.approx(0.4)
    assert lambda_at(24) == pytest.approx(0.02)
    assert lambda_at(25) == 0.0 and lambda_at(40) == 0.0


def test_constant_and_fast_lambda():
    assert [lambda_at(s, "constant", 1.0) for s in (0, 10, 100)] == [1.0, 1.0, 1.0]
    assert lambda_at(5, "fast", 0.5, fast_steps=10) == pytest.approx(0.25)
    assert lambda_at(10, "fast", 0.5, fast_steps=10) == 0.0


def test_lambda_rejects_bad_input():
    with pytest.raises(ValueError, match="allowed: linear, constant, fast"):
        lambda_at(0, "cosine")
    with pytest.raises(ValueError, match="step must be"):
        lambda_at(-1)
    with pytest.raises(ValueError, match="lam0"):
        lambda_at(0, lam0=1.5)


@given(step=st.integers(0, 500), schedule=st.sampled_from(["linear", "constant", "fast"]))
def test_lambda_is_a_pure_function_of_the_step(step, schedule):
    """A resumed run recomputes λ from the step alone and gets the same value, inside [0, λ₀]."""
    first = lambda_at(step, schedule, 0.5, 25, 10)
    assert first == lambda_at(step, schedule, 0.5, 25, 10)
    assert 0.0 <= first <= 0.5


def test_lr_warmup_then_cosine():
    lrs = [lr_at(s, 1e-3, total_steps=15, warmup_steps=5) for s in range(16)]
    assert lrs[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])
    assert lrs[5] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(5e-4)  # halfway through the cosine
    assert lrs[15] == pytest.approx(0.0, abs=1e-12)
    assert lr_at(12, 1e-3, 15, 5, schedule="constant") == 1e-3


def test_negative_lowest_reward_wins_ties_go_first():
    rewards = [0.1, 0.0, 1.0, 0.0]  # format reward: 0.1 = wrong but well formatted
    choice = select_negative_answers(rewards, ["g"] * 4, ["3", "4", "7", "5"], [False, False, True, False])
    assert choice == {"g": NegativeChoice(index=1, answer="4")}


def test_negative_skips_rollouts_without_answer():
    rewards = [0.0, 0.0, 0.1]
    answers = [None, "  ", "12"]
    choice = select_negative_answers(rewards, [0, 0, 0], answers, [False, False, False])
    assert choice == {0: NegativeChoice(index=2, answer="12")}  # higher reward, but the only usable one


def test_negative_none_when_no_usable_wrong_rollout():
    choice = select_negative_answers(
        [1.0, 1.0, 0.0, 0.0, 0.0],
        ["a", "a", "b", "b", "c"],
        ["7", "7", None, "", "9"],
        [True, True, False, False, False],
    )
    assert choice["a"] is None  # all correct → P_T⁻ := P_S (RLSD)
    assert choice["b"] is None  # wrong, but no extractable answer → never the string "None"
    assert choice["c"] == NegativeChoice(index=4, answer="9")
    assert list(choice) == ["a", "b", "c"]


def test_negative_length_mismatch_is_named():
    with pytest.raises(ValueError, match="answers has 1 entries"):
        select_negative_answers([0.0, 1.0], [0, 0], ["1"], [False, True])


def test_row_negatives_by_scope():
    """group: every row gets its group's r⁻ (the paper); rollout: a wrong rollout with an answer gets its own,
    right rollouts and answerless wrong ones keep the group's."""
    rewards = [1.0, 0.0, 0.1, 0.0, 1.0, 1.0]
    groups = ["a", "a", "a", "a", "b", "b"]
    answers = ["7", "4", "5", None, "2", "2"]
    correct = [True, False, False, False, True, True]
    chosen = select_negative_answers(rewards, groups, answers, correct)
    r_minus = NegativeChoice(index=1, answer="4")
    assert row_negatives("group", chosen, groups, answers, correct) == [r_minus] * 4 + [None, None]
    assert row_negatives("rollout", chosen, groups, answers, correct) == [
        r_minus,  # right: the group's r⁻
        r_minus,  # its own answer is the group's r⁻ anyway
        NegativeChoice(index=2, answer="5"),  # its own wrong answer, not the group's lowest-reward one
        r_minus,  # no answer of its own
        None,  # a group without a wrong answer: P_T⁻ := P_S either way
        None,
    ]
    with pytest.raises(ValueError, match="negative scope must be one of group, rollout"):
        row_negatives("batch", chosen, groups, answers, correct)
