"""The teacher replica: builds answer-conditioned sequences and scores the student's tokens under them.

Positive and negative contexts of every item go through the engine in one batched ``score`` call. A row whose
``negative`` is None is scored under the student's own context (P_T⁻ := P_S). An item whose positive or negative
sequence is longer than the engine scores (``Engine.max_score_len``) is not sent to the engine: it comes back in
``TeacherScores.unfit`` with empty scores, and the controller gives its row Δ = 0.

Images (a vision-language model): the student context P_S always contains the problem's images; the r⁺ / r⁻
contexts contain them too with ``TeacherRequest.sees_image`` (the paper's reading), or have the image markup
removed from the text without it (the official code's blind teacher). Image tokens are expanded exactly as in the
student prompt, so the response ids follow a context whose image tokens every engine expands alike.
"""

from __future__ import annotations

import time

import numpy as np

from cepo_proto.pipeline import TeacherRequest, TeacherScores
from cepo_services.common import metrics, vision
from cepo_services.common.replica import EngineReplica
from cepo_services.common.templates import build_teacher_sequence, image_teacher_context

__all__ = ["TeacherReplica"]


class TeacherReplica(EngineReplica):
    service = "teacher"

    def __init__(self, name: str, backend: str, model_path: str, **engine_kwargs) -> None:
        from transformers import AutoTokenizer

        super().__init__(name, backend, model_path, **engine_kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.vision = vision.vision_spec(model_path) if vision.is_vision_language(model_path) else None

    def sequences(
        self, request: TeacherRequest, images: list[list] | None = None
    ) -> tuple[list[tuple[list[int], int]], list[tuple[int | None, int]], list[list]]:
        """Flattened (ids, response start) pairs, per item the indices of its positive and negative, and per
        sequence its images (``images``: per item, its problem's prepared images)."""
        pairs: list[tuple[list[int], int]] = []
        where: list[tuple[int | None, int]] = []
        seq_images: list[list] = []

        def context(item, answer: str, item_images: list) -> tuple[list[int], list]:
            # the learner-side teacher (OPSD / SDPO) builds its contexts with the same function
            return image_teacher_context(
                self.tokenizer,
                item.student_prompt,
                answer,
                request.template,
                item_images,
                self.vision,
                sees_image=request.sees_image,
            )

        def add(ctx: list[int], response: list[int], ctx_images: list) -> int:
            seq = build_teacher_sequence(ctx, response)
            pairs.append((seq.input_ids, seq.response_start))
            seq_images.append(ctx_images)
            return len(pairs) - 1

        for k, item in enumerate(request.items):
            item_images = [] if images is None else images[k]
            pos = None
            if item.positive is not None:
                ids, context_images = context(item, item.positive, item_images)
                pos = add(ids, item.response_ids, context_images)
            if item.negative is None:  # P_T⁻ := P_S: the student's own context, its images included
                neg = add(item.student_prompt_ids, item.response_ids, item_images)
            else:
                ids, context_images = context(item, item.negative, item_images)
                neg = add(ids, item.response_ids, context_images)
            where.append((pos, neg))
        return pairs, where, seq_images

    def score(self, request: TeacherRequest) -> TeacherScores:
        with metrics.track_teacher(self.name) as tracked:
            scores = self._score(request)
            tracked.tokens = scores.scored_tokens
        return scores

    def _score(self, request: TeacherRequest) -> TeacherScores:
        if request.expected_version is not None:  # None: the frozen reference teacher
            self.check_version(request.expected_version)
        start = time.perf_counter()
        images = None if request.images is None else request.images.resolve()
        if images is not None and self.vision is None and any(images):
            raise ValueError(f"{self.name}: the teacher model is text-only but the items have images")
        pairs, where, seq_images = self.sequences(request, images)
        limit = self.engine.max_score_len
        fits = lambda i: i is None or limit is None or len(pairs[i][0]) <= limit  # noqa: E731
        unfit = [k for k, (pos, neg) in enumerate(where) if not (fits(pos) and fits(neg))]
        skipped = set(unfit)
        # every sequence index belongs to one item, so this lists each once
        sent = [i for k, item in enumerate(where) if k not in skipped for i in item if i is not None]
        scored = dict(
            zip(
                sent,
                self.engine.score(
                    [pairs[i] for i in sent],
                    request.temperature,
                    images=[seq_images[i] for i in sent] if images is not None else None,
                )
                if sent
                else [],
                strict=True,
            )
        )
        empty = np.zeros(0, dtype=np.float32)
        as_array = lambda i: np.asarray(scored[i], dtype=np.float32) if i in scored else empty  # noqa: E731
        return TeacherScores(
            replica=self.name,
            logp_pos=[None if pos is None else as_array(pos) for pos, _ in where],
            logp_neg=[as_array(neg) for _, neg in where],
            seconds=time.perf_counter() - start,
            scored_tokens=sum(len(pairs[i][0]) - pairs[i][1] for i in sent),
            unfit=unfit,
        )
