"""The rollout replica: one engine behind a Ray actor, generating with the adapter version it serves."""

from __future__ import annotations

import time

from cepo_proto.pipeline import GenerateRequest, Rollout, RolloutResult
from cepo_services.common import metrics
from cepo_services.common.replica import EngineReplica

__all__ = ["RolloutReplica"]


class RolloutReplica(EngineReplica):
    """Use as ``ray.remote(num_cpus=…)(RolloutReplica).remote(name, backend, model_path, **engine_kwargs)``."""

    def generate(self, request: GenerateRequest) -> RolloutResult:
        with metrics.track_rollout(self.name) as tracked:
            result = self._generate(request)
            tracked.tokens = result.generated_tokens
        return result

    def _generate(self, request: GenerateRequest) -> RolloutResult:
        self.check_version(request.expected_version)
        start = time.perf_counter()
        images = None if request.images is None else request.images.resolve()
        groups = self.engine.generate(request.prompts, request.sampling, images=images)
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
            for index, group in enumerate(groups)
        ]
        tokens = sum(len(r.response_ids) for group in rollouts for r in group)
        return RolloutResult(
            replica=self.name, rollouts=rollouts, seconds=time.perf_counter() - start, generated_tokens=tokens
        )
