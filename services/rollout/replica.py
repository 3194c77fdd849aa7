"""The rollout replica: one engine behind a Ray actor, generating with the adapter version it serves."""

from __future__ import annotations

import time
from collections.abc import Iterator

from cepo_proto.pipeline import GenerateRequest, Rollout, RolloutResult
from cepo_services.common import metrics
from cepo_services.common.replica import EngineReplica

__all__ = ["RolloutReplica"]


class RolloutReplica(EngineReplica):
    """Use as ``ray.remote(num_cpus=…)(RolloutReplica).remote(name, backend, model_path, **engine_kwargs)``."""

    def generate(self, request: GenerateRequest) -> RolloutResult:
        with metrics.track_rollout(self.name) as tracked:
            self.check_version(request.expected_version)
            start = time.perf_counter()
            groups = self.engine.generate(request.prompts, request.sampling, images=self._images(request))
            result = self._result(list(enumerate(groups)), start)
            tracked.tokens = result.generated_tokens
        return result

    def generate_stream(self, request: GenerateRequest) -> Iterator[RolloutResult]:
        """The request's groups as they finish (call with ``num_returns="streaming"``): each result holds the
        groups done since the last, every prompt once over the stream; ``seconds`` counts from the request."""
        with metrics.track_rollout(self.name) as tracked:
            self.check_version(request.expected_version)
            start, tracked.tokens = time.perf_counter(), 0
            for batch in self.engine.generate_stream(
                request.prompts, request.sampling, images=self._images(request)
            ):
                result = self._result(batch, start)
                tracked.tokens += result.generated_tokens
                yield result

    @staticmethod
    def _images(request: GenerateRequest) -> list | None:
        return None if request.images is None else request.images.resolve()

    def _result(self, groups: list[tuple[int, list]], start: float) -> RolloutResult:
        """Rollouts of (prompt row, its completions) pairs; ``prompt_index`` is the row in the request."""
        rollouts = [
            [
                Rollout(
                    prompt_index=index,
                    response_ids=c.token_ids,
                    logprobs=c.logprobs,
                    text=c.text,
                    finish_reason=c.finish_reason,
                    policy_version=self.engine.version,
                )
                for c in group
            ]
            for index, group in groups
        ]
        tokens = sum(len(r.response_ids) for group in rollouts for r in group)
        return RolloutResult(
            replica=self.name, rollouts=rollouts, seconds=time.perf_counter() - start, generated_tokens=tokens
        )
