"""Eqs. 1, 4, 5, 7 and Theorem 1 / Proposition 1 of the paper, against the pure functions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cepo.algorithm.advantages import (
    cepo_token_advantages,
    evidence_stats,
    grpo_advantages,
    rlsd_token_advantages,
)

# --------------------------------------------------------------------------------------------- Eq. 1 (GRPO)


def test_grpo_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    groups = ["a", "a", "a", "a", "b", "b"]
    adv = grpo_advantages(rewards, groups, eps=0.0)
    # group a: mean 0.5, unbiased std sqrt(1/3) → ±0.5/0.57735 = ±0.866025
    assert adv[:4].tolist() == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025], abs=1e-6)
    assert adv[4:].tolist() == [0.0, 0.0]  # all-correct group → 0


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_grpo_zero_variance_group_is_zero(value):
    adv = grpo_advantages(torch.full((8,), value), [7] * 8)
    assert torch.equal(adv, torch.zeros(8))


def test_grpo_singleton_group_and_interleaved_ids():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5])
    groups = torch.tensor([0, 1, 0, 1, 2])  # interleaved; group 2 has one member
    adv = grpo_advantages(rewards, groups, eps=0.0)
    s = 1 / math.sqrt(0.5)  # unbiased std of {0, 1} = sqrt(0.5); (1 − 0.5)/sqrt(0.5)
    assert adv.tolist() == pytest.approx([0.5 * s, -0.5 * s, -0.5 * s, 0.5 * s, 0.0])


def test_grpo_without_std_scaling_is_centred():
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), [0] * 4, scale_by_std=False)
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_grpo_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="group_ids has 2 entries"):
        grpo_advantages(torch.tensor([1.0, 0.0, 1.0]), [0, 0])
    with pytest.raises(ValueError, match=r"rewards\[1\] is nan"):
        grpo_advantages(torch.tensor([1.0, float("nan")]), [0, 0])


@given(st.lists(st.sampled_from([0.0, 1.0]), min_size=2, max_size=16))
def test_grpo_group_advantages_sum_to_zero(rewards):
    adv = grpo_advantages(torch.tensor(rewards), [0] * len(rewards))
    assert float(adv.sum()) == pytest.approx(0.0, abs=1e-5)
    assert all((a > 0) == (r == 1.0) for a, r in zip(adv.tolist(), rewards, strict=True) if a != 0)


# --------------------------------------------------------------------------------------------- Eqs. 5 and 7


def reference_token_advantages(seq_adv, logp_num, logp_den, mask, lam, eps_w):
    """Eq. 7 written out per element with Python floats: the reader's cross-check."""
    rows = []
    for b, a in enumerate(seq_adv.tolist()):
        row = []
        for t in range(logp_num.shape[1]):
            if not mask[b, t]:
                row.append(0.0)
                continue
            delta = float(logp_num[b, t]) - float(logp_den[b, t])
            sign = (a > 0) - (a < 0)
            w = math.exp(sign * delta)
            row.append(a * ((1 - lam) + lam * min(max(w, 1 - eps_w), 1 + eps_w)))
        rows.append(row)
    return torch.tensor(rows)


def test_cepo_hand_computed():
    seq_adv = torch.tensor([1.5, -0.5])
    logp_pos = torch.log(torch.tensor([[0.8, 0.2, 0.5], [0.1, 0.6, 0.3]]))
    logp_neg = torch.log(torch.tensor([[0.4, 0.2, 0.9], [0.3, 0.2, 0.3]]))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = cepo_token_advantages(seq_adv, logp_pos, logp_neg, mask, lam=0.5, eps_w=0.5)
    # row 0 (A>0): w = P+/P- = 2.0 → clip 1.5; 1.0; 0.5556 → 0.5556 (inside [0.5, 1.5])
    # row 1 (A<0): w = P-/P+ = 3.0 → 1.5; 1/3 → 0.5; masked → 0
    expected = torch.tensor(
        [
            [1.5 * (0.5 + 0.5 * 1.5), 1.5 * 1.0, 1.5 * (0.5 + 0.5 * (0.5 / 0.9))],
            [-0.5 * (0.5 + 0.5 * 1.5), -0.5 * (0.5 + 0.5 * 0.5), 0.0],
        ]
    )
    assert torch.allclose(out, expected, atol=1e-6)


def test_matches_equations_on_random_inputs():
    gen = torch.Generator().manual_seed(0)
    seq_adv = torch.randn(16, generator=gen)
    seq_adv[3] = 0.0
    logp_pos = -torch.rand(16, 12, generator=gen) * 5
    logp_neg = -torch.rand(16, 12, generator=gen) * 5
    logp_s = -torch.rand(16, 12, generator=gen) * 5
    mask = torch.rand(16, 12, generator=gen) > 0.2
    for lam in (0.0, 0.3, 1.0):
        for eps_w in (0.1, 0.5, 0.9):
            got = cepo_token_advantages(seq_adv, logp_pos, logp_neg, mask, lam, eps_w)
            want = reference_token_advantages(seq_adv, logp_pos, logp_neg, mask, lam, eps_w)
            assert torch.allclose(got, want, atol=1e-5)
            got = rlsd_token_advantages(seq_adv, logp_pos, logp_s, mask, lam, eps_w)
            want = reference_token_advantages(seq_adv, logp_pos, logp_s, mask, lam, eps_w)
            assert torch.allclose(got, want, atol=1e-5)


finite_logp = st.floats(min_value=-30.0, max_value=0.0, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(
    a=st.floats(min_value=-5, max_value=5, allow_nan=False).filter(lambda x: abs(x) > 1e-6),
    lp=st.lists(st.tuples(finite_logp, finite_logp), min_size=1, max_size=8),
    lam=st.floats(min_value=0.0, max_value=1.0),
    eps_w=st.floats(min_value=1e-3, max_value=1 - 1e-3),
)
def test_theorem1_direction_anchoring(a, lp, lam, eps_w):
    """Theorem 1 (i): sign(Â_t) = sign(A) for every token, every λ ∈ [0, 1] and ε_w ∈ (0, 1)."""
    logp_pos = torch.tensor([[p for p, _ in lp]])
    logp_neg = torch.tensor([[n for _, n in lp]])
    mask = torch.ones_like(logp_pos)
    out = cepo_token_advantages(torch.tensor([a]), logp_pos, logp_neg, mask, lam, eps_w)
    assert torch.all(torch.sign(out) == math.copysign(1.0, a))


@given(lam=st.floats(min_value=0.0, max_value=1.0), eps_w=st.floats(min_value=1e-3, max_value=1 - 1e-3))
def test_zero_advantage_gives_zero_whatever_the_evidence(lam, eps_w):
    out = cepo_token_advantages(
        torch.tensor([0.0]),
        torch.tensor([[-0.1, -9.0]]),
        torch.tensor([[-9.0, -0.1]]),
        torch.ones(1, 2),
        lam,
        eps_w,
    )
    assert torch.equal(out, torch.zeros(1, 2))


@settings(max_examples=200, deadline=None)
@given(
    a=st.floats(min_value=-5, max_value=5, allow_nan=False),
    lp=st.lists(st.tuples(finite_logp, finite_logp), min_size=1, max_size=8),
    lam=st.floats(min_value=0.0, max_value=1.0),
    eps_w=st.floats(min_value=1e-3, max_value=1 - 1e-3),
)
def test_theorem1_rlsd_containment(a, lp, lam, eps_w):
    """Theorem 1 (iii): P_T⁻ = P_S reproduces RLSD exactly (bit for bit)."""
    logp_pos = torch.tensor([[p for p, _ in lp]])
    logp_s = torch.tensor([[s for _, s in lp]])
    mask = torch.ones_like(logp_pos)
    seq_adv = torch.tensor([a])
    cepo = cepo_token_advantages(seq_adv, logp_pos, logp_s, mask, lam, eps_w)
    rlsd = rlsd_token_advantages(seq_adv, logp_pos, logp_s, mask, lam, eps_w)
    # bit for bit is sound here: both go through evidence_token_advantages with the same tensors, in the same
    # order of operations, in one process
    assert torch.equal(cepo, rlsd)


@given(a=st.floats(min_value=-5, max_value=5, allow_nan=False), lam=st.floats(0.0, 1.0))
def test_zero_delta_gives_weight_one(a, lam):
    """Δ = 0 (P_T⁺ = P_T⁻) gives w = 1 and Â = A: filler tokens are left as GRPO left them."""
    logp = torch.tensor([[-0.7, -3.2, -11.0]])
    out = cepo_token_advantages(torch.tensor([a]), logp, logp.clone(), torch.ones(1, 3), lam, 0.5)
    assert torch.allclose(out, torch.full((1, 3), a), atol=1e-6 * max(1.0, abs(a)))


@settings(max_examples=300, deadline=None)
@given(
    a=st.floats(min_value=0.01, max_value=5),
    p_pos=st.floats(min_value=1e-4, max_value=1.0),
    p_neg=st.floats(min_value=1e-4, max_value=1.0),
    p_s=st.floats(min_value=1e-4, max_value=1.0),
)
def test_proposition1_sharpness(a, p_pos, p_neg, p_s):
    """Proposition 1: for A > 0, w_CE > w_RLSD iff P_T⁻ < P_S (before clipping, i.e. ε_w → 1, λ = 1).

    The unclipped weight is recovered from Â = A·w when λ = 1 and the clip is wide enough; we compare the
    weights directly through Δ to stay before clipping.
    """
    if math.isclose(p_neg, p_s, rel_tol=1e-6):
        return
    w_ce = math.exp(math.log(p_pos) - math.log(p_neg))
    w_rlsd = math.exp(math.log(p_pos) - math.log(p_s))
    assert (w_ce > w_rlsd) == (p_neg < p_s)
    # and the library agrees whenever neither weight is clipped
    eps_w = 0.999
    if 1 - eps_w < w_ce < 1 + eps_w and 1 - eps_w < w_rlsd < 1 + eps_w:
        args = (torch.tensor([a]), torch.tensor([[math.log(p_pos)]]))
        ce = cepo_token_advantages(*args, torch.tensor([[math.log(p_neg)]]), torch.ones(1, 1), 1.0, eps_w)
        rl = rlsd_token_advantages(*args, torch.tensor([[math.log(p_s)]]), torch.ones(1, 1), 1.0, eps_w)
        assert (float(ce) > float(rl)) == (p_neg < p_s)


def test_proposition1_negative_case():
    """For A < 0 the symmetric condition: w_CE > w_RLSD iff P_T⁻ > P_S."""
    a = torch.tensor([-1.0])
    logp_pos = torch.log(torch.tensor([[0.3, 0.3]]))
    logp_neg = torch.log(torch.tensor([[0.5, 0.2]]))
    logp_s = torch.log(torch.tensor([[0.4, 0.4]]))
    ce = cepo_token_advantages(a, logp_pos, logp_neg, torch.ones(1, 2), 1.0, 0.99)
    rl = rlsd_token_advantages(a, logp_pos, logp_s, torch.ones(1, 2), 1.0, 0.99)
    # more blame (more negative Â) where the wrong answer favours the token more than the student does
    assert ce[0, 0] < rl[0, 0] and ce[0, 1] > rl[0, 1]


def test_no_gradient_reaches_teacher_logprobs():
    seq_adv = torch.tensor([1.0, -2.0], requires_grad=True)
    logp_pos = torch.randn(2, 5, requires_grad=True)
    logp_neg = torch.randn(2, 5, requires_grad=True)
    out = cepo_token_advantages(seq_adv, logp_pos, logp_neg, torch.ones(2, 5), 0.5, 0.5)
    assert not out.requires_grad
    out2 = rlsd_token_advantages(seq_adv, logp_pos, logp_neg, torch.ones(2, 5), 0.5, 0.5)
    assert not out2.requires_grad


def test_masked_positions_are_zero_even_with_infinite_logprobs():
    """Padded positions may hold −inf/NaN (as a teacher's padding does): they must not produce NaN."""
    logp_pos = torch.tensor([[-1.0, float("-inf"), float("nan")]])
    logp_neg = torch.tensor([[-2.0, float("-inf"), -1.0]])
    mask = torch.tensor([[1, 0, 0]])
    out = cepo_token_advantages(torch.tensor([1.0]), logp_pos, logp_neg, mask, 0.5, 0.5)
    assert torch.isfinite(out).all() and out[0, 1:].tolist() == [0.0, 0.0]
    # a valid position impossible under both teachers carries no evidence: weight 1
    both_inf = cepo_token_advantages(
        torch.tensor([2.0]),
        torch.tensor([[float("-inf")]]),
        torch.tensor([[float("-inf")]]),
        torch.ones(1, 1),
        1,
        0.5,
    )
    assert both_inf.tolist() == [[2.0]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lam": 1.5}, "lam must lie in"),
        ({"eps_w": 1.0}, "eps_w must lie in"),
        ({"eps_w": 0.0}, "eps_w must lie in"),
        ({"logp_neg": torch.zeros(2, 4)}, "must share one shape"),
        ({"seq_adv": torch.zeros(2, 1)}, r"seq_adv must have shape \[B\]"),
        ({"mask": torch.ones(3, 5)}, "mask must have shape"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    args = {
        "seq_adv": torch.zeros(2),
        "logp_pos": torch.zeros(2, 5),
        "logp_neg": torch.zeros(2, 5),
        "mask": torch.ones(2, 5),
        "lam": 0.5,
        "eps_w": 0.5,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        cepo_token_advantages(**args)


def test_evidence_stats_hand_computed():
    seq_adv = torch.tensor([1.0, 0.0])
    logp_pos = torch.log(torch.tensor([[0.8, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    logp_neg = torch.log(torch.tensor([[0.2, 0.5, 0.6], [0.5, 0.5, 0.5]]))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    stats = evidence_stats(seq_adv, logp_pos, logp_neg, mask, lam=1.0, eps_w=0.5)
    assert stats.delta_pos_frac == pytest.approx(1 / 5)
    assert stats.delta_neg_frac == pytest.approx(1 / 5)
    assert stats.weight_clip_frac == pytest.approx(1 / 3)  # w = 4 clipped; only A ≠ 0 tokens count
    assert stats.abs_adv_before == pytest.approx(3 / 5)
    assert stats.abs_adv_after == pytest.approx((1.5 + 1.0 + 0.5 / 0.6) / 5)
