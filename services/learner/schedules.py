"""Schedules as pure functions of the step, so a resumed run gets exactly the same values.

λ (the evidence dose, paper §3.4 and Fig. 3):
- ``linear``: λ₀ decays linearly to 0 over T_warm steps (the paper's default: λ₀ 0.5, T_warm 25);
- ``constant``: λ₀ at every step (Fig. 3's λ = 0.5 and λ = 1.0 rows);
- ``fast``: the same linear decay over a shorter horizon (Fig. 3's 10-step fast decay).

Learning rate (App. B, Table 6): cosine decay with a linear warm-up (5 steps in the paper).
Steps count from 0: step 0 is the first update.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["LAMBDA_SCHEDULES", "lambda_at", "lr_at"]


def _linear(step: int, lam0: float, horizon: int) -> float:
    if horizon <= 0:
        return 0.0
    return lam0 * max(0.0, 1.0 - step / horizon)


LAMBDA_SCHEDULES: dict[str, Callable[..., float]] = {
    "linear": lambda step, lam0, warm_steps, fast_steps: _linear(step, lam0, warm_steps),
    "constant": lambda step, lam0, warm_steps, fast_steps: lam0,
    "fast": lambda step, lam0, warm_steps, fast_steps: _linear(step, lam0, fast_steps),
}


def lambda_at(
    step: int, schedule: str = "linear", lam0: float = 0.5, warm_steps: int = 25, fast_steps: int = 10
) -> float:
    """λ at a 0-based step: ``lambda_at(0) == λ₀`` and, for ``linear``, ``lambda_at(T_warm) == 0``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not 0.0 <= lam0 <= 1.0:
        raise ValueError(f"lam0 must lie in [0, 1], got {lam0}")
    try:
        fn = LAMBDA_SCHEDULES[schedule]
    except KeyError:
        raise ValueError(
            f"unknown lambda schedule {schedule!r}; allowed: {', '.join(LAMBDA_SCHEDULES)}"
        ) from None
    return float(fn(step, lam0, warm_steps, fast_steps))


def lr_at(
    step: int,
    base_lr: float,
    total_steps: int,
    warmup_steps: int = 5,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.0,
) -> float:
    """Learning rate at a 0-based step: linear warm-up to ``base_lr`` over ``warmup_steps``, then cosine
    decay to ``min_lr_ratio · base_lr`` at ``total_steps`` (or constant after warm-up)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}; allowed: cosine, constant")
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)
