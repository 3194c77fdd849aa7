"""The λ schedule as a pure function of the step, so a resumed run gets exactly the same values.

λ (the evidence dose, paper §3.4 and Fig. 3):
- ``linear``: λ₀ decays linearly to 0 over T_warm steps (the paper's default: λ₀ 0.5, T_warm 25);
- ``constant``: λ₀ at every step (Fig. 3's λ = 0.5 and λ = 1.0 rows);
- ``fast``: the same linear decay over a shorter horizon (Fig. 3's 10-step fast decay).

Steps count from 0: step 0 is the first update. (The learning rate's schedule runs on the learner:
``cepo_services.learner.schedules``.)
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["LAMBDA_SCHEDULES", "lambda_at"]


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
