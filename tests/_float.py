"""Rounding bounds for tests that compare floating-point results computed in a different order.

Summing n terms in another order changes the result by at most about n·u relative to the sum of their
magnitudes (u = eps/2, the unit roundoff; Higham, "Accuracy and Stability of Numerical Algorithms", §4.2).
A log-softmax over a vocabulary of V entries sums V exponentials, so the normaliser log Z moves by at most
about V·u in absolute terms when the same logits are summed in another order, and every log-prob with it.
The bounds below use eps (= 2u) per term, a factor of two of headroom over the worst case.
"""

from __future__ import annotations

import math

import torch


def reduction_bound(dtype: torch.dtype, terms: int) -> float:
    """Worst-case relative change of a sum of ``terms`` values of ``dtype`` under reordering (×2 headroom)."""
    return terms * torch.finfo(dtype).eps


def logsoftmax_bound(dtype: torch.dtype, vocab: int, max_abs_logit: float) -> float:
    """Absolute bound on how far one log-softmax entry moves when the vocabulary is summed in another order.

    log Z moves by ≤ V·eps (relative error of the sum of exponentials), and subtracting it from a logit of
    magnitude ≤ max_abs_logit rounds once more.
    """
    eps = torch.finfo(dtype).eps
    return reduction_bound(dtype, vocab) + 2 * eps * (1.0 + abs(max_abs_logit))


def half_precision_bound(dtype: torch.dtype) -> float:
    """sqrt(eps): a change smaller than this relative to a quantity's scale is rounding, not signal."""
    return math.sqrt(torch.finfo(dtype).eps)
