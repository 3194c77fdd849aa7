"""Off-policy correction for the one-step-off asynchronous mode (``algorithm.max_staleness``), as pure functions.

With ``max_staleness: 1`` a step's rollouts may come from the adapter one version behind the learner's. The
PPO ratio keeps the learner's own old log-probs as its anchor (π_old = the learner's current policy), and each
token's advantage is multiplied by a truncated importance weight of that anchor against the policy that
actually sampled the token (the engine's sampling log-probs):

    ρ_t = min(exp(log π_old(y_t) − log π_behaviour(y_t)), C)          → :func:`truncated_is_weights`
    Â_t ← ρ_t · Â_t

Multiplying the advantage is the same as weighting each token's clipped PPO term, since ρ_t > 0:
min(r·ρA, clip(r)·ρA) = ρ·min(r·A, clip(r)·A). On-policy rows (staleness 0) get ρ = 1 exactly, never a ratio of
two engines' numerics of the same policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ImportanceStats", "importance_stats", "truncated_is_weights"]


def truncated_is_weights(
    learner_logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    mask: torch.Tensor,
    stale: torch.Tensor,
    cap: float,
) -> torch.Tensor:
    """[B, T] weights ρ_t = min(π_old / π_behaviour, ``cap``) on the response tokens of ``stale`` rows ([B]
    bools); 1 on on-policy rows and at padding. Log-probs are detached: ρ carries no gradient."""
    if cap < 1.0:
        raise ValueError(f"cap must be ≥ 1, got {cap}")
    if learner_logp.shape != behaviour_logp.shape or learner_logp.shape != mask.shape:
        raise ValueError(
            f"shapes differ: learner {tuple(learner_logp.shape)}, behaviour {tuple(behaviour_logp.shape)}, "
            f"mask {tuple(mask.shape)}"
        )
    log_ratio = (learner_logp.detach() - behaviour_logp.detach()).to(torch.float32)
    rho = torch.exp(torch.clamp(log_ratio, max=torch.log(torch.tensor(float(cap))).item()))
    use = mask.bool() & stale.bool().unsqueeze(1)
    return torch.where(use, rho, torch.ones_like(rho))


@dataclass(frozen=True)
class ImportanceStats:
    mean: float  # mean ρ over the stale rows' tokens (1.0 when none)
    max: float
    min: float
    clip_frac: float  # fraction of those tokens truncated at the cap
    stale_rows: int


def importance_stats(
    weights: torch.Tensor, mask: torch.Tensor, stale: torch.Tensor, cap: float
) -> ImportanceStats:
    use = mask.bool() & stale.bool().unsqueeze(1)
    if not bool(use.any()):
        return ImportanceStats(1.0, 1.0, 1.0, 0.0, int(stale.sum()))
    w = weights[use]
    return ImportanceStats(
        mean=float(w.mean()),
        max=float(w.max()),
        min=float(w.min()),
        clip_frac=float((w >= cap - 1e-6).float().mean()),
        stale_rows=int(stale.sum()),
    )
