"""The verifier replica: the grader behind a Ray actor (one persistent math-verify worker per replica)."""

from __future__ import annotations

import os
import time

from cepo_proto.pipeline import GradeRequest, GradeResult
from cepo_services.common import metrics
from cepo_services.verifier.grader import Grader

__all__ = ["VerifierReplica"]


class VerifierReplica:
    def __init__(
        self, name: str, *, format_weight: float = 0.0, timeout_s: float = 5.0, max_chars: int = 100_000
    ):
        self.name = name
        self.grader = Grader(format_weight=format_weight, timeout_s=timeout_s, max_chars=max_chars)
        self.grader.warm_up()

    def grade(self, request: GradeRequest) -> GradeResult:
        start = time.perf_counter()
        verdicts = self.grader.grade_batch(request.responses, request.answers)
        seconds = time.perf_counter() - start
        metrics.observe_verdicts(self.name, verdicts, seconds)
        return GradeResult(replica=self.name, verdicts=verdicts, seconds=seconds)

    def metrics_endpoint(self, port: int) -> tuple[str, int]:
        """Serve this actor's Prometheus metrics on ``port`` (0: ephemeral); returns (node ip, port)."""
        return metrics.endpoint(port)

    def pid(self) -> int:
        """The replica's process id (operators and fault-injection tests kill it with this)."""
        return os.getpid()

    def shutdown(self) -> None:
        self.grader.close()
