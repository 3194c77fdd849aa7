"""The learning-rate schedule (App. B, Table 6): cosine decay with a linear warm-up (5 steps in the paper).

A pure function of the step, so a resumed run gets exactly the same values. Steps count from 0.
"""

from __future__ import annotations

import math

__all__ = ["lr_at"]


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
