"""The state of one training step as its stages fill it in (read by the trainer and the recorder)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from cepo_proto import Problem, Verdict
from cepo_proto.pipeline import STAGES, Rollout

__all__ = ["StepState"]


@dataclass
class StepState:
    """What one step has produced so far; row i is rollout i, its group the index of its prompt."""

    index: int
    lam: float
    problems: list[Problem]
    prompt_texts: list[str]
    prompt_ids: list[list[int]]
    rollouts: list[Rollout] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    seq_adv: torch.Tensor | None = None
    token_adv: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    negatives: dict[int, Any] = field(default_factory=dict)
    logp_pos: torch.Tensor | None = None
    logp_neg: torch.Tensor | None = None
    evidence: Any = None  # EvidenceStats of a scored step
    old_logp: torch.Tensor | None = None
    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    @property
    def groups(self) -> list[int]:
        return [r.prompt_index for r in self.rollouts]

    @property
    def rewards(self) -> list[float]:
        return [v.reward for v in self.verdicts]

    @property
    def correct(self) -> list[bool]:
        return [v.correct for v in self.verdicts]
