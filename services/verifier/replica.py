"""The verifier replica: the grader behind a Ray actor (one persistent math-verify worker per replica, or one
for the user's reward function)."""

from __future__ import annotations

import contextlib
import os
import time

from cepo_proto.pipeline import GradeRequest, GradeResult
from cepo_services.common import metrics
from cepo_services.verifier.grader import Grader, RewardLoadError

__all__ = ["VerifierReplica"]


class VerifierReplica:
    def __init__(
        self,
        name: str,
        *,
        format_weight: float = 0.0,
        timeout_s: float = 5.0,
        max_chars: int = 100_000,
        reward_fn: str | None = None,
        reward_path: list[str] | None = None,
    ):
        """``reward_fn`` ("module:function") replaces the built-in grading, imported in the worker with
        ``reward_path`` in front of its ``sys.path`` (the controller passes its own, so a module it can import
        is found here too on the same machine)."""
        self.name = name
        self.grader = Grader(
            format_weight=format_weight,
            timeout_s=timeout_s,
            max_chars=max_chars,
            reward_fn=reward_fn,
            reward_path=reward_path,
        )
        # a reward function that cannot be loaded is raised again by the first grade call, as that call's error
        # (raised here, the actor would die and the pool would replace it until it gives up, the reason lost)
        with contextlib.suppress(RewardLoadError):
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

    def node(self) -> dict[str, str]:
        """Where this replica runs: Ray node id and address."""
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}

    def shutdown(self) -> None:
        self.grader.close()
