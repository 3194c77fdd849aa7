"""The replica base that rollout and teacher share: an engine with a name, serving one adapter version."""

from __future__ import annotations

import os

import numpy as np

from cepo_proto.adapter import AdapterAck, AdapterPayload
from cepo_proto.pipeline import ProbeRequest, ProbeResult
from cepo_services.common import metrics
from cepo_services.common.engines import make_engine

__all__ = ["EngineReplica", "VersionMismatch"]


class VersionMismatch(RuntimeError):
    """A replica was asked to serve a version it has not loaded: the adapter sync did not happen."""


class EngineReplica:
    """An engine with a name: loads adapters by version and says which one it serves."""

    service = "rollout"  # the metrics' service label (TeacherReplica: "teacher")

    def __init__(self, name: str, backend: str, model_path: str, **engine_kwargs) -> None:
        self.name = name
        self.engine = make_engine(backend, model_path, **engine_kwargs)

    def load_adapter(self, payload: AdapterPayload) -> AdapterAck:
        version, checksum = self.engine.load_adapter(payload)
        metrics.set_adapter_version(self.service, self.name, version)
        return AdapterAck(replica=self.name, version=version, checksum=checksum)

    def pull(self, version: int, checksum: str, where: list) -> AdapterAck:
        """Serve adapter ``version`` (whose bytes hash to ``checksum``): a replica that already holds it only
        confirms; otherwise it fetches the payload from the object store (``where[0]``, an ObjectRef passed
        inside a list so that Ray hands over the reference, not the bytes) and loads it. The controller tells
        every replica what to serve; new, restarted and lagging replicas catch up by pulling."""
        if (self.engine.version, self.engine.checksum) == (version, checksum):
            return AdapterAck(replica=self.name, version=version, checksum=checksum)
        import ray

        payload = ray.get(where[0])
        if (payload.version, payload.checksum) != (version, checksum):
            raise VersionMismatch(
                f"{self.name} was told to serve version {version} ({checksum[:12]}), the object holds "
                f"version {payload.version} ({payload.checksum[:12]})"
            )
        return self.load_adapter(payload)

    def serving(self) -> tuple[int | None, str | None]:
        return self.engine.version, self.engine.checksum

    def check_version(self, expected: int | None) -> None:
        if expected != self.engine.version:
            raise VersionMismatch(
                f"{self.name} serves adapter version {self.engine.version}, the step expects {expected}"
            )

    def metrics_endpoint(self, port: int) -> tuple[str, int]:
        """Serve this actor's Prometheus metrics on ``port`` (0: ephemeral); returns (node ip, port)."""
        return metrics.endpoint(port)

    def probe(self, request: ProbeRequest) -> ProbeResult:
        """Log-probs of fixed sequences under the adapter this replica serves (the controller compares them with
        the learner's: a checksum proves the bytes arrived, this proves they are in use)."""
        scores = self.engine.score(
            [(list(ids), start) for ids, start in request.sequences], request.temperature
        )
        return ProbeResult(
            replica=self.name,
            version=self.engine.version,
            logprobs=[np.asarray(s, dtype=np.float32) for s in scores],
        )

    def pid(self) -> int:
        """The replica's process id (operators and fault-injection tests kill it with this)."""
        return os.getpid()

    def node(self) -> dict[str, str]:
        """Where this replica runs: Ray node id and address."""
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}

    def shutdown(self) -> None:
        self.engine.close()
