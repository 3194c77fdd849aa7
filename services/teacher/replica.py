"""The teacher replica: builds answer-conditioned sequences and scores the student's tokens under them.

Positive and negative contexts of every item go through the engine in one batched ``score`` call. A row whose
``negative`` is None is scored under the student's own context (P_T⁻ := P_S). An item whose positive or negative
sequence is longer than the engine scores (``Engine.max_score_len``) is not sent to the engine: it comes back in
``TeacherScores.unfit`` with empty scores, and the controller gives its row Δ = 0.
"""

from __future__ import annotations

import time

import numpy as np

from cepo_proto.pipeline import TeacherRequest, TeacherScores
from cepo_services.common import metrics
from cepo_services.common.replica import EngineReplica
from cepo_services.common.templates import build_teacher_sequence, teacher_context_ids

__all__ = ["TeacherReplica"]


class TeacherReplica(EngineReplica):
    service = "teacher"

    def __init__(self, name: str, backend: str, model_path: str, **engine_kwargs) -> None:
        from transformers import AutoTokenizer

        super().__init__(name, backend, model_path, **engine_kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)

    def sequences(
        self, request: TeacherRequest
    ) -> tuple[list[tuple[list[int], int]], list[tuple[int | None, int]]]:
        """Flattened (ids, response start) pairs and, per item, the indices of its positive and negative."""
        pairs: list[tuple[list[int], int]] = []
        where: list[tuple[int | None, int]] = []

        def add(context: list[int], response: list[int]) -> int:
            seq = build_teacher_sequence(context, response)
            pairs.append((seq.input_ids, seq.response_start))
            return len(pairs) - 1

        for item in request.items:
            pos = None
            if item.positive is not None:
                pos = add(
                    teacher_context_ids(self.tokenizer, item.student_prompt, item.positive, request.template),
                    item.response_ids,
                )
            if item.negative is None:
                neg_context = item.student_prompt_ids  # P_T⁻ := P_S
            else:
                neg_context = teacher_context_ids(
                    self.tokenizer, item.student_prompt, item.negative, request.template
                )
            where.append((pos, add(neg_context, item.response_ids)))
        return pairs, where

    def score(self, request: TeacherRequest) -> TeacherScores:
        with metrics.track_teacher(self.name) as tracked:
            scores = self._score(request)
            tracked.tokens = scores.scored_tokens
        return scores

    def _score(self, request: TeacherRequest) -> TeacherScores:
        if request.expected_version is not None:  # None: the frozen reference teacher
            self.check_version(request.expected_version)
        start = time.perf_counter()
        pairs, where = self.sequences(request)
        limit = self.engine.max_score_len
        fits = lambda i: i is None or limit is None or len(pairs[i][0]) <= limit  # noqa: E731
        unfit = [k for k, (pos, neg) in enumerate(where) if not (fits(pos) and fits(neg))]
        skipped = set(unfit)
        # every sequence index belongs to one item, so this lists each once
        sent = [i for k, item in enumerate(where) if k not in skipped for i in item if i is not None]
        scored = dict(
            zip(
                sent,
                self.engine.score([pairs[i] for i in sent], request.temperature) if sent else [],
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
