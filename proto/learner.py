"""Messages of the learner service: an update request (the batch and the method's settings) and its result
(the update's statistics and the adapter it produced, stamped with the version the learner assigned).

Per-token floats (advantages, old log-probs) travel as 2-D float32 numpy arrays inside the Ray object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cepo_proto.adapter import AdapterPayload
from cepo_proto.pipeline import ImageRefs

__all__ = [
    "AGG_MODES",
    "DISTILL_KINDS",
    "DistillSpec",
    "MiniBatch",
    "UpdateRequest",
    "UpdateResult",
    "UpdateSettings",
    "UpdateStats",
]

Sample = tuple[list[int], list[int]]  # (prompt ids, response ids)

AGG_MODES = ("token-mean", "seq-mean-token-mean")
DISTILL_KINDS = ("opsd", "sdpo")


@dataclass(frozen=True)
class DistillSpec:
    """A distribution-matching term the learner adds (paper Table 7; computed on the learner ranks).

    - ``opsd``: KL(P_T⁺ ‖ P_S) over the whole vocabulary, the teacher being the current actor with r⁺ in
      context (a no-grad forward of the same weights, before this step's optimizer step).
    - ``sdpo``: generalised JSD_α(P_T⁺, P_S) over the student's top-k tokens plus a tail bucket, the teacher
      being an EMA of the actor (decay β, updated after every optimizer step), with r⁺ in context.

    ``with_pg``: loss = PPO-clip(GRPO A) + weight · D (the paper's EasyR1 reimplementation, "distillation
    weight α"); False: loss = weight · D alone (the original on-policy distillation recipe).
    """

    kind: str
    weight: float = 1.0
    alpha: float = 0.5
    top_k: int | None = 100
    ema_decay: float = 0.999
    with_pg: bool = True

    def __post_init__(self) -> None:
        if self.kind not in DISTILL_KINDS:
            raise ValueError(f"distillation kind must be 'opsd' or 'sdpo', got {self.kind!r}")
        if self.weight < 0:
            raise ValueError(f"distillation weight must be ≥ 0, got {self.weight}")


class UpdateSettings(BaseModel):
    """The PPO-clip update's settings (``learner`` config section).

    One update takes ``ppo_epochs × mini_batches`` optimizer steps: the rollout batch is cut into
    ``mini_batches`` contiguous row ranges (sizes differing by at most one) and each epoch steps once per range,
    in order. Old log-probs are the rollout policy's, so after the first step the ratio departs from 1 and the
    clip acts. Each step's loss is normalised by its own mini-batch (token-mean over its tokens).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    micro_batch_size: int = Field(default=8, ge=1)
    ppo_epochs: int = Field(default=1, ge=1)
    mini_batches: int = Field(default=1, ge=1)
    clip_low: float = Field(default=0.2, ge=0.0)
    clip_high: float = Field(default=0.28, ge=0.0)
    loss_agg: str = "token-mean"

    @field_validator("loss_agg")
    @classmethod
    def _known_agg(cls, value: str) -> str:
        if value not in AGG_MODES:
            raise ValueError(f"unknown loss aggregation {value!r}; allowed: {', '.join(AGG_MODES)}")
        return value


def _token_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    array = np.asarray(value, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"expected a [rows, tokens] array, got shape {array.shape}")
    return array


class UpdateRequest(BaseModel):
    """One optimizer step over a rollout batch.

    ``advantages`` and ``old_logp`` are [B, T] (T = the longest response); row i belongs to ``samples[i]``.
    With ``distill``, ``teacher_samples[i]`` is (teacher context with r⁺, the same response ids).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    samples: list[Sample] = Field(min_length=1)
    advantages: np.ndarray
    old_logp: np.ndarray
    settings: UpdateSettings = UpdateSettings()
    distill: DistillSpec | None = None
    teacher_samples: list[Sample] | None = None
    images: ImageRefs | None = Field(default=None, description="Per sample, its images (a VL policy).")

    _arrays = field_validator("advantages", "old_logp", mode="before")(_token_array)

    @model_validator(mode="after")
    def _consistent(self) -> UpdateRequest:
        shape = (len(self.samples), max(len(r) for _, r in self.samples))
        for name in ("advantages", "old_logp"):
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"{name} must have shape {shape} (samples × longest response), got {got}")
        if self.distill is not None:
            teacher = self.teacher_samples
            if teacher is None or len(teacher) != len(self.samples):
                got = "none" if teacher is None else len(teacher)
                raise ValueError(
                    f"{self.distill.kind} needs one teacher sample per sample ({len(self.samples)}), got {got}"
                )
            for i, ((_, r), (_, tr)) in enumerate(zip(self.samples, teacher, strict=True)):
                if list(r) != list(tr):
                    raise ValueError(f"teacher sample {i}: its response differs from sample {i}'s")
        if self.images is not None and len(self.images.rows) != len(self.samples):
            raise ValueError(f"{len(self.images.rows)} image rows for {len(self.samples)} samples")
        return self

    def response_tokens(self) -> int:
        return sum(len(r) for _, r in self.samples)


@dataclass(frozen=True)
class MiniBatch:
    """One optimizer step's rows on one rank, [start, stop) of its shard, and the counts over every rank's rows
    of that mini-batch (the loss normalisers); ``micro_batches`` is the most any rank runs for it (FSDP pads
    the others with dummy micro-batches so that collectives match)."""

    start: int
    stop: int
    tokens: float
    seqs: float
    micro_batches: int


@dataclass(frozen=True)
class UpdateStats:
    """An update's statistics. ``loss``, ``grad_norm`` and ``distill_loss`` are means over its optimizer steps;
    ``clip_frac`` and ``approx_kl`` are token-weighted over every step's tokens."""

    loss: float
    clip_frac: float
    approx_kl: float
    grad_norm: float
    lr: float
    distill_loss: float = 0.0  # the distillation term alone (OPSD / SDPO), already weighted
    skipped: bool = False  # a non-finite loss or gradient norm: no optimizer step, the version unchanged
    optimizer_steps: int = 1  # optimizer steps taken (ppo_epochs × mini_batches; 0 when skipped)


class UpdateResult(BaseModel):
    """The update's statistics (aggregated over the ranks) and the adapter it produced."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stats: UpdateStats
    adapter: AdapterPayload
    seconds: float
