"""PPO-clip, OPSD, SDPO, EMA and aggregation, with hand-computed cases and the leakage structure (Eq. 3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _float import half_precision_bound

from cepo.algorithm.advantages import cepo_token_advantages
from cepo_services.learner.losses import (
    agg_loss,
    ema_update,
    generalized_jsd,
    opsd_loss,
    ppo_clip_loss,
    sdpo_loss,
    token_kl,
)


def test_agg_token_mean_and_seq_mean():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert float(agg_loss(loss, mask, "token-mean")) == pytest.approx(10 / 4)
    assert float(agg_loss(loss, mask, "seq-mean-token-mean")) == pytest.approx((2.0 + 4.0) / 2)
    with pytest.raises(ValueError, match="allowed: token-mean, seq-mean-token-mean"):
        agg_loss(loss, mask, "sum")


def test_token_mean_over_global_batch_is_split_invariant():
    """Summing micro-batch losses normalised by the global token count equals the full-batch token mean."""
    gen = torch.Generator().manual_seed(1)
    loss = torch.rand(6, 7, generator=gen)
    mask = (torch.rand(6, 7, generator=gen) > 0.3).float()
    full = agg_loss(loss, mask, "token-mean")
    total = mask.sum()
    parts = sum(
        agg_loss(loss[i : i + 2], mask[i : i + 2], "token-mean", global_tokens=total) for i in (0, 2, 4)
    )
    assert float(parts) == pytest.approx(float(full), rel=1e-6)
    seqs = sum(
        agg_loss(loss[i : i + 3], mask[i : i + 3], "seq-mean-token-mean", global_seqs=6) for i in (0, 3)
    )
    assert float(seqs) == pytest.approx(float(agg_loss(loss, mask, "seq-mean-token-mean")), rel=1e-6)


def test_ppo_clip_hand_computed():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]]))  # ratios 1.5, 0.5, 1.1, 0.7
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    out = ppo_clip_loss(logp, old, adv, torch.ones(1, 4), clip_low=0.2, clip_high=0.28)
    # A>0: max(−1.5, −1.28) = −1.28 (clipped); max(−0.5, −0.8) = −0.5
    # A<0: max(1.1, 1.1) = 1.1; max(0.7, 0.8) = 0.8 (clipped)
    assert float(out.loss) == pytest.approx((-1.28 - 0.5 + 1.1 + 0.8) / 4, abs=1e-6)
    assert float(out.clip_frac) == pytest.approx(0.5)


def test_ppo_gradient_only_through_logp_and_zero_at_padding():
    logp = torch.tensor([[-1.0, -2.0, float("-inf")]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.0, 0.0]], requires_grad=True)
    adv = torch.tensor([2.0, 0.0], requires_grad=True)[:1]  # [B] form, broadcast over tokens
    out = ppo_clip_loss(logp, old, adv, torch.tensor([[1, 1, 0]]))
    out.loss.backward()
    assert old.grad is None or torch.count_nonzero(old.grad) == 0
    # on-policy (ratio 1): d loss / d logp_t = −A / n_valid at valid tokens, exactly 0 at padding
    assert logp.grad[0].tolist() == pytest.approx([-1.0, -1.0, 0.0])
    assert torch.isfinite(logp.grad).all()


def test_ppo_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="share one"):
        ppo_clip_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_opsd_is_token_kl_hand_computed():
    teacher = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    student = torch.log(torch.tensor([[[0.25, 0.5, 0.25]]]))
    kl = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    assert float(opsd_loss(student, teacher, torch.ones(1, 1))) == pytest.approx(kl, abs=1e-6)
    assert float(opsd_loss(student, student, torch.ones(1, 1))) == pytest.approx(0.0, abs=1e-7)


def test_generalized_jsd_hand_computed_and_symmetric_at_half():
    p = torch.log(torch.tensor([1.0, 1e-30]))  # point masses on different tokens → JSD = log 2
    q = torch.log(torch.tensor([1e-30, 1.0]))
    assert float(generalized_jsd(p, q, 0.5)) == pytest.approx(math.log(2), abs=1e-6)
    a = F.log_softmax(torch.tensor([0.3, -1.0, 2.0]), -1)
    b = F.log_softmax(torch.tensor([1.0, 0.5, -0.5]), -1)
    assert float(generalized_jsd(a, b, 0.5)) == pytest.approx(float(generalized_jsd(b, a, 0.5)), abs=1e-7)
    assert float(generalized_jsd(a, b, 0.3)) == pytest.approx(float(generalized_jsd(b, a, 0.7)), abs=1e-7)
    with pytest.raises(ValueError, match="alpha"):
        generalized_jsd(a, b, 1.0)


def test_sdpo_top_k_with_tail_is_a_distribution_and_full_k_matches():
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(2, 3, 50, generator=gen)
    teacher = torch.randn(2, 3, 50, generator=gen)
    mask = torch.ones(2, 3)
    full = sdpo_loss(student, teacher, mask, top_k=None)
    assert float(sdpo_loss(student, teacher, mask, top_k=50)) == pytest.approx(float(full), abs=1e-6)
    approx = sdpo_loss(student, teacher, mask, top_k=10)
    # merging tokens into one bucket can only lose information (data-processing inequality)
    assert 0.0 <= float(approx) <= float(full) + 1e-6


def test_ema_update_hand_computed_and_pure():
    teacher = {"w": torch.tensor([1.0, 2.0])}
    student = {"w": torch.tensor([3.0, 4.0])}
    out = ema_update(teacher, student, decay=0.75)
    assert out["w"].tolist() == pytest.approx([1.5, 2.5])
    assert teacher["w"].tolist() == [1.0, 2.0] and student["w"].tolist() == [3.0, 4.0]
    with pytest.raises(ValueError, match="missing"):
        ema_update(teacher, {"w": torch.zeros(2), "b": torch.zeros(1)})


def test_leakage_structure_opsd_vs_cepo():
    """Eq. 3 vs Theorem 1 (ii): move the teacher's mass between two tokens that were never sampled.

    The teacher's probability of the sampled token is unchanged. OPSD's gradient changes (its gradient is a
    vocabulary-wide sum over the teacher's probabilities); CEPO's gradient is identical, because the teacher
    enters only as a detached scalar at the sampled token.
    """
    sampled = torch.tensor([[0]])
    student_logits = torch.tensor([[[0.2, 0.1, -0.3, 0.4, 0.0]]])
    teacher_a = torch.log(torch.tensor([[[0.4, 0.3, 0.2, 0.05, 0.05]]]))
    teacher_b = torch.log(torch.tensor([[[0.4, 0.05, 0.2, 0.3, 0.05]]]))  # tokens 1 and 3 swap mass
    wrong_teacher = torch.log(torch.tensor([[[0.1, 0.3, 0.2, 0.2, 0.2]]]))
    mask = torch.ones(1, 1)

    def opsd_grad(teacher):
        logits = student_logits.clone().requires_grad_(True)
        opsd_loss(logits, teacher, mask).backward()
        return logits.grad

    def cepo_grad(teacher):
        logits = student_logits.clone().requires_grad_(True)
        logp = F.log_softmax(logits, -1).gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        pos = F.log_softmax(teacher, -1).gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        neg = F.log_softmax(wrong_teacher, -1).gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        adv = cepo_token_advantages(torch.tensor([1.0]), pos, neg, mask, lam=0.5, eps_w=0.5)
        ppo_clip_loss(logp, logp.detach(), adv, mask).loss.backward()
        return logits.grad

    assert not torch.allclose(opsd_grad(teacher_a), opsd_grad(teacher_b))
    # P_T(sampled) is the same in exact arithmetic; log-softmax sums the 5 entries in another order, so in
    # float32 it (and the gradient through Â) may differ by rounding only (tests/_float.py)
    scale = float(cepo_grad(teacher_a).abs().max())
    bound = half_precision_bound(torch.float32) * scale
    assert float((cepo_grad(teacher_a) - cepo_grad(teacher_b)).abs().max()) <= bound
    assert float((opsd_grad(teacher_a) - opsd_grad(teacher_b)).abs().max()) > 100 * bound
    # and the CEPO gradient is not trivially zero
    assert cepo_grad(teacher_a).abs().sum() > 0


def test_token_kl_zero_iff_equal():
    p = F.log_softmax(torch.tensor([[0.0, 1.0, 2.0]]), -1)
    assert float(token_kl(p, p)) == pytest.approx(0.0, abs=1e-7)
    assert float(token_kl(p, p.flip(-1))) > 0
