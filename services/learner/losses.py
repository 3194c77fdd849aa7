"""Policy losses of the paper and its baselines, as pure functions of tensors.

- :func:`ppo_clip_loss` — the PPO clipped surrogate with separate ε_low / ε_high (DAPO's "clip-higher"),
  used by GRPO, RLSD and CEPO with sequence- or token-level advantages (Algorithm 1, line 9).
- :func:`opsd_loss` — OPSD: per-token KL(P_T⁺ ‖ P_S) over the whole vocabulary (its gradient is Eq. 3, the
  vocabulary-wide r⁺-conditioned sum the paper calls leakage).
- :func:`sdpo_loss` — SDPO: generalised Jensen–Shannon divergence between P_T⁺ and P_S with mixing weight α,
  optionally over the student's top-k tokens plus one tail bucket (as SDPO's official code does).
- :func:`ema_update` — SDPO's EMA teacher: θ_T ← β·θ_T + (1 − β)·θ_S.

Every loss reduces through :func:`agg_loss`, the one place that owns aggregation modes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cepo_proto.learner import AGG_MODES

__all__ = [
    "AGG_MODES",
    "PolicyLoss",
    "agg_loss",
    "ema_update",
    "generalized_jsd",
    "opsd_loss",
    "ppo_clip_loss",
    "sdpo_loss",
    "token_kl",
]


def agg_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar.

    - ``token-mean``: Σ loss·mask / (number of valid tokens). Pass ``global_tokens`` (the count over the whole
      global batch, across micro-batches and ranks) so that summing micro-batch losses gives the exact
      global token mean — every token weighs the same however the batch is split.
    - ``seq-mean-token-mean``: the mean over sequences of each sequence's token mean; ``global_seqs`` plays
      the same role for the sequence count. Rows with no valid token contribute 0.
    """
    mask = mask.to(loss_mat.dtype)
    if mode == "token-mean":
        denom = mask.sum() if global_tokens is None else torch.as_tensor(global_tokens, dtype=loss_mat.dtype)
        return (loss_mat * mask).sum() / denom.clamp_min(1.0)
    if mode == "seq-mean-token-mean":
        per_seq = (loss_mat * mask).sum(dim=-1) / mask.sum(dim=-1).clamp_min(1.0)
        denom = loss_mat.shape[0] if global_seqs is None else global_seqs
        return per_seq.sum() / max(float(denom), 1.0)
    raise ValueError(f"unknown loss aggregation {mode!r}; allowed: {', '.join(AGG_MODES)}")


@dataclass(frozen=True)
class PolicyLoss:
    loss: torch.Tensor  # scalar, differentiable
    clip_frac: torch.Tensor  # fraction of valid tokens where the clipped branch was taken (no grad)
    approx_kl: torch.Tensor  # token mean of old_logp − logp (no grad), a drift diagnostic


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    agg: str = "token-mean",
    *,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
) -> PolicyLoss:
    """PPO clipped surrogate, to be minimised: max(−Â·ρ, −Â·clip(ρ, 1 − ε_low, 1 + ε_high)), ρ = π/π_old.

    ``advantages`` is [B, T] (token-level Â_t) or [B] (one A per sequence, broadcast over tokens).
    Only ``logp`` carries gradient; ``old_logp`` and ``advantages`` are treated as constants.
    Defaults are the paper's (App. B, Table 6: ε_low 0.2, ε_high 0.28, token-mean, no KL, no entropy).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1).expand_as(logp)
    if not (logp.shape == old_logp.shape == advantages.shape == mask.shape):
        raise ValueError(
            "logp, old_logp, advantages and mask must share one [B, T] shape, got "
            f"{tuple(logp.shape)}, {tuple(old_logp.shape)}, {tuple(advantages.shape)}, {tuple(mask.shape)}"
        )
    valid = mask.bool()
    zeros = torch.zeros_like(logp)
    # Zero padded positions before the exponent so that −inf or NaN there never poisons the gradient.
    log_ratio = torch.where(valid, logp - old_logp.detach(), zeros)
    ratio = torch.exp(log_ratio)
    adv = torch.where(valid, advantages.detach().to(logp.dtype), zeros)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_mat = torch.maximum(unclipped, clipped)
    loss = agg_loss(loss_mat, mask, agg, global_tokens=global_tokens, global_seqs=global_seqs)
    with torch.no_grad():
        n = valid.sum().clamp_min(1)
        clip_frac = ((clipped > unclipped) & valid).sum() / n
        approx_kl = (-log_ratio * valid).sum() / n
    return PolicyLoss(loss=loss, clip_frac=clip_frac, approx_kl=approx_kl)


def token_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """KL(P_T ‖ P_S) per position over the last (vocabulary) axis, from log-probabilities: [..., V] → [...]."""
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(dim=-1)


def opsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    agg: str = "token-mean",
    global_tokens: float | None = None,
) -> torch.Tensor:
    """OPSD: mean over response tokens of KL(P_T⁺ ‖ P_S), both [B, T, V] logits at the response positions.

    The teacher (the same policy with r⁺ in context) is detached; the gradient w.r.t. the student is
    −Σ_v P_T⁺(v) ∇ log P_S(v) (Eq. 3): every vocabulary entry's teacher probability enters it.
    """
    student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return agg_loss(token_kl(teacher_logp, student_logp), mask, agg, global_tokens=global_tokens)


def _top_k_with_tail(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Restrict both distributions to the student's top-k tokens plus one bucket holding the rest of the mass."""
    idx = student_logp.topk(k, dim=-1).indices

    def reduce(logp: torch.Tensor) -> torch.Tensor:
        top = logp.gather(-1, idx)
        top_mass = torch.logsumexp(top, dim=-1, keepdim=True).clamp(max=0.0)
        # log(1 − m) for the top mass m = exp(top_mass): −expm1(log m) = 1 − m, kept ≥ 1e-30 to stay finite.
        tail = torch.log((-torch.expm1(top_mass)).clamp_min(1e-30))
        return torch.cat([top, tail], dim=-1)

    return reduce(student_logp), reduce(teacher_logp)


def generalized_jsd(teacher_logp: torch.Tensor, student_logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """JSD_α(P_T, P_S) = α·KL(P_T ‖ M) + (1 − α)·KL(P_S ‖ M), M = α·P_T + (1 − α)·P_S; [..., V] → [...].

    α = 0.5 is the symmetric Jensen–Shannon divergence.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    mixture = torch.logsumexp(
        torch.stack([teacher_logp + math.log(alpha), student_logp + math.log(1.0 - alpha)]), dim=0
    )
    return alpha * token_kl(teacher_logp, mixture) + (1.0 - alpha) * token_kl(student_logp, mixture)


def sdpo_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    top_k: int | None = None,
    agg: str = "token-mean",
    global_tokens: float | None = None,
) -> torch.Tensor:
    """SDPO: generalised JSD between the (EMA, detached) teacher P_T⁺ and the student P_S per response token.

    With ``top_k`` both distributions are reduced to the student's top-k tokens plus a tail bucket
    (SDPO's official code uses k = 100); ``None`` uses the whole vocabulary.
    """
    student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    if top_k is not None and top_k < student_logp.shape[-1]:
        student_logp, teacher_logp = _top_k_with_tail(student_logp, teacher_logp, top_k)
    return agg_loss(
        generalized_jsd(teacher_logp, student_logp, alpha), mask, agg, global_tokens=global_tokens
    )


def ema_update(
    teacher: Mapping[str, torch.Tensor], student: Mapping[str, torch.Tensor], decay: float = 0.999
) -> dict[str, torch.Tensor]:
    """SDPO's EMA teacher (Table 7: β 0.999, every step): returns β·θ_T + (1 − β)·θ_S for every tensor.

    Pure: neither input is modified. The key sets must match exactly.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must lie in [0, 1], got {decay}")
    if teacher.keys() != student.keys():
        missing = sorted(set(student) - set(teacher))[:3]
        extra = sorted(set(teacher) - set(student))[:3]
        raise ValueError(f"teacher and student parameters differ: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        return {
            name: decay * teacher[name] + (1.0 - decay) * student[name].to(teacher[name]) for name in teacher
        }
