"""Small pure statistics of the evaluation and the ``cepo compare`` report: no plotting, no file I/O.

- :func:`mean_se`: mean and standard error of a sample;
- :func:`problem_accuracy`: held-out accuracy (and its standard error over problems) from per-sample verdicts;
- :func:`auc`: the normalised area under an accuracy-vs-step curve (AUC@H);
- :func:`median_stages`: a run's step and stage medians (metrics.jsonl rows).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise
from typing import Any

__all__ = ["auc", "mean_se", "median_stages", "problem_accuracy"]


def mean_se(values: Iterable[float]) -> tuple[float, float]:
    """Mean and standard error (sample standard deviation / √n; 0 for a single value)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_se of no values")
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        return mean, 0.0
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var / n)


def problem_accuracy(correct: Sequence[Sequence[bool]]) -> tuple[float, float]:
    """Held-out accuracy from each problem's samples: the mean over problems of the fraction correct, and its
    standard error over problems."""
    return mean_se(sum(c) / len(c) for c in correct)


def auc(points: Sequence[tuple[int, float]], horizon: int) -> float:
    """Normalised area under an accuracy curve over steps [0, horizon] (trapezoid rule).

    The curve is linear between points, so the result is the mean accuracy over the window. A horizon between
    two points is reached by linear interpolation; points beyond it are ignored. Raises ``ValueError`` if the
    horizon is not positive, there is no point at step 0, two points share a step or the curve ends before the
    horizon.
    """
    if horizon <= 0:
        raise ValueError(f"horizon must be positive, got {horizon}")
    pts = sorted((int(s), float(v)) for s, v in points)
    steps = [s for s, _ in pts]
    if len(set(steps)) != len(steps):
        raise ValueError(f"repeated steps in the curve: {steps}")
    if not pts or pts[0][0] != 0:
        raise ValueError(f"no point at step 0 (curve starts at step {pts[0][0] if pts else None})")
    area = 0.0
    reached = 0
    for (s0, v0), (s1, v1) in pairwise(pts):
        if s1 <= horizon:
            area += (s1 - s0) * (v0 + v1) / 2
            reached = s1
            if s1 == horizon:
                break
        else:
            v_h = v0 + (v1 - v0) * (horizon - s0) / (s1 - s0)
            area += (horizon - s0) * (v0 + v_h) / 2
            reached = horizon
            break
    if reached < horizon:
        raise ValueError(f"the curve ends at step {reached}, before the horizon {horizon}")
    return area / horizon


def median_stages(rows: Sequence[Mapping[str, Any]], skip: int = 1) -> dict[str, Any]:
    """Medians over steps after ``skip`` warm-up steps: step seconds, per-stage seconds and tokens/s, from
    metrics.jsonl rows (``StepReport.model_dump()``)."""
    kept = list(rows[skip:]) or list(rows)

    def median(*stages: str) -> float:
        return statistics.median(sum(r["stage_seconds"].get(st, 0.0) for st in stages) for r in kept)

    return {
        "step_s": statistics.median(r["step_seconds"] for r in kept),
        "stages": {
            "gen": median("gen"),
            "verify": median("verify"),
            "teacher": median("teacher"),
            "adv": median("adv"),
            "update": median("old_logp", "update"),
            "sync": median("sync"),
        },
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in kept),
    }
