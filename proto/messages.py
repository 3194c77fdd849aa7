"""Message types shared by the controller and the services."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Problem(_Message):
    """One training or evaluation problem with a verifiable answer."""

    id: str = Field(min_length=1, description="Stable identifier (unique within a dataset).")
    problem: str = Field(
        min_length=1, description="Problem text; images are referenced by <image> placeholders."
    )
    answer: str = Field(min_length=1, description="The verified correct answer r⁺.")
    images: list[str] = Field(
        default_factory=list, description="Image paths or data URIs, in placeholder order."
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Source, split, suite, generator settings…"
    )


class Verdict(_Message):
    """The verifier's judgement of one response."""

    correct: bool
    reward: float = Field(description="Accuracy in {0, 1}, or 0.9·accuracy + 0.1·format when configured.")
    answer: str | None = Field(
        description="The extracted final answer (last \\boxed{…}), None if there is none."
    )
    reason: str = Field(
        description="Why: 'correct', 'wrong_answer', 'no_boxed', 'unclosed_boxed', 'timeout', …"
    )
