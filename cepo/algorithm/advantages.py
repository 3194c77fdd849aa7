"""Sequence- and token-level advantages of the paper, as pure tensor functions.

Hold these against the paper (CEPO, §3):

- Eq. 1  GRPO:  A⁽ⁱ⁾ = (R⁽ⁱ⁾ − μ_G) / σ_G                                  → :func:`grpo_advantages`
- Eq. 4  RLSD:  w_t = exp(sign(A) · sg(log P_T⁺(y_t) − log P_S(y_t)))      → :func:`rlsd_token_advantages`
- Eq. 5  CEPO:  Δ_t = sg(log P_T⁺(y_t) − log P_T⁻(y_t))
- Eq. 7         w_t = exp(sign(A) · Δ_t)
                Â_t = A · [(1 − λ) + λ · clip(w_t, 1 − ε_w, 1 + ε_w)]       → :func:`cepo_token_advantages`

``cepo_token_advantages`` and ``rlsd_token_advantages`` are the project's public API: other trainers import
them, so their names and argument orders do not change. Teacher log-probs enter only as detached scalars at
the sampled token (Theorem 1 ii); no gradient flows back to any log-prob argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "EvidenceStats",
    "cepo_token_advantages",
    "evidence_delta",
    "evidence_stats",
    "evidence_token_advantages",
    "evidence_weights",
    "grpo_advantages",
    "rlsd_token_advantages",
]


def grpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor | list[Any],
    *,
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> torch.Tensor:
    """Eq. 1: group-normalised sequence advantages, shape [N] like ``rewards``.

    ``group_ids[i]`` names the prompt rollout *i* was sampled for (any hashable values, or an integer tensor).
    σ_G is the unbiased standard deviation of the group (as in verl/EasyR1's GRPO estimator) and ``eps`` keeps
    the division finite. A zero-variance group (all right or all wrong, or a group of one) carries no
    preference between its members, so every member gets advantage exactly 0. With ``scale_by_std=False``
    the advantage is only mean-centred (Dr. GRPO).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape [N], got {tuple(rewards.shape)}")
    keys = group_ids.tolist() if isinstance(group_ids, torch.Tensor) else list(group_ids)
    if len(keys) != rewards.shape[0]:
        raise ValueError(f"group_ids has {len(keys)} entries but rewards has {rewards.shape[0]}")
    if not torch.isfinite(rewards).all():
        bad = int((~torch.isfinite(rewards)).nonzero()[0])
        raise ValueError(f"rewards[{bad}] is {rewards[bad].item()}; rewards must be finite")

    rewards = rewards.detach().to(torch.float32)
    advantages = torch.zeros_like(rewards)
    members: dict[Any, list[int]] = {}
    for index, key in enumerate(keys):
        members.setdefault(key, []).append(index)
    for indices in members.values():
        idx = torch.tensor(indices, dtype=torch.long)
        group = rewards[idx]
        if group.numel() < 2 or bool((group == group[0]).all()):
            continue  # zero-variance group: no signal, advantage 0
        centred = group - group.mean()
        advantages[idx] = centred / (group.std(unbiased=True) + eps) if scale_by_std else centred
    return advantages


def _check_token_inputs(seq_adv, logp_a, logp_b, mask, lam, eps_w, names) -> None:
    if seq_adv.dim() != 1:
        raise ValueError(f"seq_adv must have shape [B], got {tuple(seq_adv.shape)}")
    batch = seq_adv.shape[0]
    for name, tensor in zip(names, (logp_a, logp_b, mask), strict=True):
        if tensor.dim() != 2 or tensor.shape[0] != batch:
            raise ValueError(f"{name} must have shape [B, T] with B={batch}, got {tuple(tensor.shape)}")
    if logp_a.shape != logp_b.shape or logp_a.shape != mask.shape:
        raise ValueError(
            f"{names[0]}, {names[1]} and {names[2]} must share one shape, got "
            f"{tuple(logp_a.shape)}, {tuple(logp_b.shape)}, {tuple(mask.shape)}"
        )
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam must lie in [0, 1] (Theorem 1), got {lam}")
    if not 0.0 < float(eps_w) < 1.0:
        raise ValueError(f"eps_w must lie in (0, 1) (Theorem 1), got {eps_w}")


def evidence_delta(logp_num: torch.Tensor, logp_den: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sg(log P_num(y_t) − log P_den(y_t)) at valid positions, 0 elsewhere.

    Padded positions may hold −inf or NaN log-probs; they are zeroed *before* any arithmetic so that 0·∞
    never produces NaN. At a valid position where both log-probs are −inf (a token impossible under both
    contexts) there is no evidence either way, and Δ is 0.
    """
    valid = mask.bool()
    num = logp_num.detach().to(torch.float32)
    den = logp_den.detach().to(torch.float32)
    delta = torch.where(valid, num, torch.zeros_like(num)) - torch.where(valid, den, torch.zeros_like(den))
    return torch.nan_to_num(delta, nan=0.0)


def evidence_weights(seq_adv: torch.Tensor, delta: torch.Tensor, eps_w: float) -> torch.Tensor:
    """The clipped evidence weight clip(exp(sign(A) · Δ_t), 1 − ε_w, 1 + ε_w), [B, T] (Eq. 7; Eq. 4 for RLSD's Δ).

    A row with A = 0 gets weight exp(0) = 1. Detached; what ``cepo inspect`` colours tokens by.
    """
    sign = torch.sign(seq_adv.detach().to(torch.float32)).unsqueeze(1)
    # exp(±inf) = inf or 0, which the clip maps to 1 ± ε_w; NaN never reaches here (see evidence_delta).
    return torch.exp(sign * delta.detach().to(torch.float32)).clamp(1.0 - eps_w, 1.0 + eps_w)


def evidence_token_advantages(
    seq_adv: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor, lam: float, eps_w: float
) -> torch.Tensor:
    """Â_t = A · [(1 − λ) + λ · clip(exp(sign(A) · Δ_t), 1 − ε_w, 1 + ε_w)], masked positions 0.

    The shared body of Eq. 4 (RLSD) and Eq. 7 (CEPO); they differ only in which log-prob Δ subtracts.
    ``delta`` is treated as a constant (detached).
    """
    adv = seq_adv.detach().to(torch.float32)
    clipped = evidence_weights(adv, delta, eps_w)
    token_adv = adv.unsqueeze(1) * ((1.0 - lam) + lam * clipped)
    return torch.where(mask.bool(), token_adv, torch.zeros_like(token_adv))


def cepo_token_advantages(
    seq_adv: torch.Tensor,
    logp_pos: torch.Tensor,
    logp_neg: torch.Tensor,
    mask: torch.Tensor,
    lam: float,
    eps_w: float,
) -> torch.Tensor:
    """CEPO token advantages (Eqs. 5 and 7), shape [B, T].

    Args:
        seq_adv: [B] sequence advantages A (Eq. 1).
        logp_pos: [B, T] log P_T⁺(y_t): the sampled token's log-prob with the correct answer r⁺ in context.
        logp_neg: [B, T] log P_T⁻(y_t): the same with the rejected answer r⁻ in context. Where the group has no
            usable wrong rollout, pass log P_S(y_t) for that row: CEPO then equals RLSD exactly (Theorem 1 iii).
        mask: [B, T] 1 at response tokens, 0 at padding.
        lam: λ ∈ [0, 1], the evidence dose of this step (see ``schedules.lambda_at``).
        eps_w: ε_w ∈ (0, 1), the evidence clip.

    Returns a detached [B, T] float32 tensor; masked positions are 0 and sign(Â_t) = sign(A) everywhere else.
    """
    _check_token_inputs(seq_adv, logp_pos, logp_neg, mask, lam, eps_w, ("logp_pos", "logp_neg", "mask"))
    return evidence_token_advantages(seq_adv, evidence_delta(logp_pos, logp_neg, mask), mask, lam, eps_w)


def rlsd_token_advantages(
    seq_adv: torch.Tensor,
    logp_pos: torch.Tensor,
    logp_student: torch.Tensor,
    mask: torch.Tensor,
    lam: float,
    eps_w: float,
) -> torch.Tensor:
    """RLSD token advantages (Eq. 4): Δ_t = log P_T⁺(y_t) − log P_S(y_t), otherwise as CEPO. Shape [B, T]."""
    _check_token_inputs(
        seq_adv, logp_pos, logp_student, mask, lam, eps_w, ("logp_pos", "logp_student", "mask")
    )
    return evidence_token_advantages(seq_adv, evidence_delta(logp_pos, logp_student, mask), mask, lam, eps_w)


@dataclass(frozen=True)
class EvidenceStats:
    """What the evidence did this step (paper Fig. 4 and Fig. 5's clip rate)."""

    delta_pos_frac: float  # fraction of valid tokens with Δ > tol
    delta_neg_frac: float  # fraction of valid tokens with Δ < −tol
    delta_mean: float
    weight_clip_frac: float  # fraction of valid tokens (with A ≠ 0) whose weight hit 1 ± ε_w
    abs_adv_before: float  # mean |A| over valid tokens
    abs_adv_after: float  # mean |Â_t| over valid tokens


def evidence_stats(
    seq_adv: torch.Tensor,
    logp_pos: torch.Tensor,
    logp_ref: torch.Tensor,
    mask: torch.Tensor,
    lam: float,
    eps_w: float,
    *,
    tol: float = 1e-6,
) -> EvidenceStats:
    """Summary statistics of Δ, the weight clip and |A| before and after reweighting.

    ``logp_ref`` is log P_T⁻ for CEPO or log P_S for RLSD.
    """
    valid = mask.bool()
    n_valid = int(valid.sum())
    if n_valid == 0:
        return EvidenceStats(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    delta = evidence_delta(logp_pos, logp_ref, mask)
    adv = seq_adv.detach().to(torch.float32)
    weight = torch.exp(torch.sign(adv).unsqueeze(1) * delta)
    clipped = (weight < 1.0 - eps_w) | (weight > 1.0 + eps_w)
    scored = valid & (adv != 0).unsqueeze(1)
    n_scored = int(scored.sum())
    token_adv = evidence_token_advantages(seq_adv, delta, mask, lam, eps_w)
    before = adv.abs().unsqueeze(1).expand_as(delta)[valid]
    return EvidenceStats(
        delta_pos_frac=float((delta[valid] > tol).float().mean()),
        delta_neg_frac=float((delta[valid] < -tol).float().mean()),
        delta_mean=float(delta[valid].mean()),
        weight_clip_frac=float(clipped[scored].float().mean()) if n_scored else 0.0,
        abs_adv_before=float(before.mean()),
        abs_adv_after=float(token_adv[valid].abs().mean()),
    )
