"""The rollout replica: one engine behind a Ray actor, serving one adapter version at a time."""

from __future__ import annotations

import time

from cepo import telemetry
from cepo_proto.adapter import AdapterAck, AdapterPayload
from cepo_proto.pipeline import GenerateRequest, Rollout, RolloutResult
from services.rollout.engines import SamplingSpec, make_engine

__all__ = ["EngineReplica", "RolloutReplica", "VersionMismatch"]


class VersionMismatch(RuntimeError):
    """A replica was asked to serve a version it has not loaded: the adapter sync did not happen."""


class EngineReplica:
    """An engine with a name: loads adapters by version and says which one it serves."""

    service = "rollout"  # the telemetry service label (TeacherReplica: "teacher")

    def __init__(self, name: str, backend: str, model_path: str, **engine_kwargs) -> None:
        self.name = name
        self.engine = make_engine(backend, model_path, **engine_kwargs)

    def load_adapter(self, payload: AdapterPayload) -> AdapterAck:
        version, checksum = self.engine.load_adapter(payload)
        telemetry.set_adapter_version(self.service, self.name, version)
        return AdapterAck(replica=self.name, version=version, checksum=checksum)

    def serving(self) -> tuple[int | None, str | None]:
        return self.engine.version, self.engine.checksum

    def check_version(self, expected: int | None) -> None:
        if expected != self.engine.version:
            raise VersionMismatch(
                f"{self.name} serves adapter version {self.engine.version}, the step expects {expected}"
            )

    def metrics_endpoint(self, port: int) -> tuple[str, int]:
        """Serve this actor's Prometheus metrics on ``port`` (0: ephemeral); returns (node ip, port)."""
        return telemetry.endpoint(port)

    def shutdown(self) -> None:
        self.engine.close()


class RolloutReplica(EngineReplica):
    """Use as ``ray.remote(num_cpus=…)(RolloutReplica).remote(name, backend, model_path, **engine_kwargs)``."""

    def generate(self, request: GenerateRequest) -> RolloutResult:
        with telemetry.track_rollout(self.name) as tracked:
            result = self._generate(request)
            tracked.tokens = result.generated_tokens
        return result

    def _generate(self, request: GenerateRequest) -> RolloutResult:
        self.check_version(request.expected_version)
        start = time.perf_counter()
        spec = SamplingSpec(
            n=request.n,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            max_tokens=request.max_tokens,
            presence_penalty=request.presence_penalty,
        )
        groups = self.engine.generate(request.prompts, spec)
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
