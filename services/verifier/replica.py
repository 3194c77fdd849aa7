"""The verifier replica: the grader behind a Ray actor (one persistent math-verify worker per replica)."""

from __future__ import annotations

import time

from cepo import telemetry
from cepo_proto import Verdict
from services.verifier.grader import Grader

__all__ = ["VerifierReplica"]


class VerifierReplica:
    def __init__(
        self, name: str, *, format_weight: float = 0.0, timeout_s: float = 5.0, max_chars: int = 100_000
    ):
        self.name = name
        self.grader = Grader(format_weight=format_weight, timeout_s=timeout_s, max_chars=max_chars)
        self.grader.warm_up()

    def grade_batch(self, responses: list[str], answers: list[str]) -> list[Verdict]:
        start = time.perf_counter()
        verdicts = self.grader.grade_batch(responses, answers)
        telemetry.observe_verdicts(self.name, verdicts, time.perf_counter() - start)
        return verdicts

    def metrics_endpoint(self, port: int) -> tuple[str, int]:
        """Serve this actor's Prometheus metrics on ``port`` (0: ephemeral); returns (node ip, port)."""
        return telemetry.endpoint(port)

    def shutdown(self) -> None:
        self.grader.close()
