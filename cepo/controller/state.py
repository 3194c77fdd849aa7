"""The state of one training step as its stages fill it in (read by the trainer and the recorder)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cepo_proto import Problem, Verdict
from cepo_proto.learner import UpdateResult
from cepo_proto.pipeline import STAGES, Rollout, StepReport

__all__ = ["StepState"]


@dataclass
class StepState:
    """What one step has produced so far; row i is rollout i, its group the index of its prompt."""

    index: int
    lam: float
    version: int  # the adapter version the rollouts come from
    problems: list[Problem]
    prompt_texts: list[str]
    prompt_ids: list[list[int]]
    rollouts: list[Rollout] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    seq_adv: torch.Tensor | None = None
    token_adv: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    negatives: dict[int, Any] = field(default_factory=dict)  # group → its r⁻ choice
    row_negatives: list[Any] = field(default_factory=list)  # row → the r⁻ that conditions its P_T⁻
    logp_pos: torch.Tensor | None = None
    logp_neg: torch.Tensor | None = None
    evidence: Any = None  # EvidenceStats of a scored step
    old_logp: torch.Tensor | None = None
    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    overlap: float = 0.0  # stage seconds hidden behind other stages (the old log-probs beside stages 2–4)
    staleness: int = 0  # learner version at the update − the rollouts' version (async: 0 or 1)
    teacher_version: int | None = (
        None  # the adapter version the teacher scored with (None: not scored / base)
    )
    importance: Any = None  # ImportanceStats of the truncated IS weights (all 1 when on-policy)
    restarts: dict[str, int] = field(default_factory=dict)  # replicas replaced during the step, by role
    probe_failures: int = 0  # replicas that failed the adapter probe before this step
    teacher_unfit: int = 0  # rows whose teacher context was too long to score (Δ = 0 for them)
    images: Any = None  # ImageRefs of the step's problems (a VL policy): one object-store batch
    image_bytes: int = 0  # bytes of that batch (decoded images, put once)
    image_count: int = 0
    chunks: list | None = None  # streamed: the futures of stages 2–4, one per chunk of groups (None: barrier)
    stream_started: float = 0.0  # streamed: when stage 1 began (perf_counter)
    stream_chunks: int = 0  # streamed: how many chunks stages 2–4 ran in

    @property
    def groups(self) -> list[int]:
        return [r.prompt_index for r in self.rollouts]

    @property
    def rewards(self) -> list[float]:
        return [v.reward for v in self.verdicts]

    @property
    def correct(self) -> list[bool]:
        return [v.correct for v in self.verdicts]

    def report(self, method: str, update: UpdateResult, seconds: float) -> StepReport:
        """The step's line of metrics.jsonl."""
        stats, ev, tokens = update.stats, self.evidence, int(self.mask.sum())
        signal = {g for g, a in zip(self.groups, self.seq_adv.tolist(), strict=True) if a != 0}
        return StepReport(
            step=self.index,
            policy_version=self.version,
            adapter_version=update.adapter.version,
            update_skipped=stats.skipped,
            probe_failures=self.probe_failures,
            teacher_unfit_rows=self.teacher_unfit,
            replica_restarts=self.restarts,
            method=method,
            lam=self.lam,
            reward_mean=float(np.mean(self.rewards)),
            accuracy=float(np.mean(self.correct)),
            zero_variance_groups=len(self.problems) - len(signal),  # groups whose rollouts all got A = 0
            groups=len(self.problems),
            tokens=tokens,
            stage_seconds={k: round(v, 4) for k, v in self.times.items()},
            step_seconds=seconds,
            tokens_per_s=tokens / seconds,
            negatives_found=sum(1 for c in self.negatives.values() if c is not None),
            loss=stats.loss,
            grad_norm=stats.grad_norm,
            ppo_clip_frac=stats.clip_frac,
            approx_kl=stats.approx_kl,
            optimizer_steps=stats.optimizer_steps,
            lr=stats.lr,
            distill_loss=stats.distill_loss,
            adapter_checksum=update.adapter.checksum,
            **({} if ev is None else {k: getattr(ev, k) for k in EVIDENCE_FIELDS}),
        )

    def samples(self, keep: int) -> list[dict[str, Any]]:
        """The first ``keep`` rollouts as the ledger shows them."""
        return [
            {
                "prompt": self.prompt_texts[r.prompt_index],
                "response": r.text,
                "answer": self.problems[r.prompt_index].answer,
                "reward": v.reward,
                "correct": v.correct,
            }
            for r, v in list(zip(self.rollouts, self.verdicts, strict=True))[:keep]
        ]


EVIDENCE_FIELDS = ("delta_pos_frac", "delta_neg_frac", "weight_clip_frac", "abs_adv_before", "abs_adv_after")
