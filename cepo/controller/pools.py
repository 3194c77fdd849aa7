"""Service pools: start the replicas and the learner, fan work out to them with timeouts, sync adapters, close.

Every call crosses the boundary as a ``cepo_proto`` message; results come back through the Ray object store.
A pool never waits longer than ``resources.call_timeout_s`` for any call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cepo.config import RunConfig
from cepo.controller.cluster import engine_options, policy_options, start_ray
from cepo_proto import AdapterAck, AdapterPayload, Verdict
from cepo_proto.pipeline import (
    GenerateRequest,
    GradeRequest,
    Rollout,
    SamplingSpec,
    TeacherItem,
    TeacherRequest,
)

__all__ = ["ServicePools", "SyncError", "check_acks", "split_evenly"]


class SyncError(RuntimeError):
    """A replica did not confirm the adapter version and checksum the learner exported."""


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges covering range(n) in ``parts`` nearly equal pieces (empty ones dropped)."""
    base, extra = divmod(n, parts)
    ranges, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        if stop > start:
            ranges.append((start, stop))
        start = stop
    return ranges


def check_acks(acks: Sequence[AdapterAck], version: int, checksum: str, expected: Sequence[str]) -> None:
    """Every expected replica confirmed exactly (version, checksum); otherwise name every one that did not."""
    seen = {ack.replica: ack for ack in acks}
    problems = []
    for name in expected:
        ack = seen.get(name)
        if ack is None:
            problems.append(f"{name}: no confirmation")
        elif ack.version != version or ack.checksum != checksum:
            problems.append(f"{name}: serves version {ack.version} checksum {ack.checksum[:12]}")
    if problems:
        raise SyncError(f"adapter version {version} ({checksum[:12]}) not confirmed: " + "; ".join(problems))


class ServicePools:
    """The rollout, teacher (only when ``with_teacher``) and verifier replicas and the learner group of a run."""

    def __init__(self, cfg: RunConfig, *, with_teacher: bool) -> None:
        import ray

        from cepo_services.learner.distributed import LearnerGroup
        from cepo_services.rollout.replica import RolloutReplica
        from cepo_services.teacher.replica import TeacherReplica
        from cepo_services.verifier.replica import VerifierReplica

        self.cfg = cfg
        start_ray(cfg)
        res = cfg.resources
        replica = {"num_cpus": res.cpus_per_replica, "num_gpus": res.gpus_per_replica}

        def engine(cls: type, name: str, backend: str, seed: int) -> Any:
            options = engine_options(cfg, backend, seed)
            return ray.remote(**replica)(cls).remote(name, backend, cfg.model.path, **options)

        self.rollout = {
            f"rollout-{i}": engine(RolloutReplica, f"rollout-{i}", cfg.rollout.backend, cfg.seed + i)
            for i in range(cfg.rollout.replicas)
        }
        self.teacher = {}
        if with_teacher:
            self.teacher = {
                f"teacher-{i}": engine(
                    TeacherReplica, f"teacher-{i}", cfg.teacher.backend, cfg.seed + 100 + i
                )
                for i in range(cfg.teacher.replicas)
            }
        v = cfg.verifier
        self.verifier = {
            f"verifier-{i}": ray.remote(num_cpus=1)(VerifierReplica).remote(
                f"verifier-{i}",
                format_weight=v.format_weight,
                timeout_s=v.timeout_s,
                max_chars=v.max_response_chars,
            )
            for i in range(v.replicas)
        }
        self.learner = LearnerGroup(
            cfg.model.path,
            cfg.learner.ranks,
            policy_kwargs=policy_options(cfg),
            backend=cfg.learner.backend,
            cpus_per_rank=res.cpus_per_learner_rank,
            gpus_per_rank=res.gpus_per_learner_rank,
            timeout_s=res.call_timeout_s,
        )

    # ------------------------------------------------------------------------------------------ plumbing
    def _call(self, refs: list[Any]) -> list[Any]:
        import ray

        return ray.get(refs, timeout=self.cfg.resources.call_timeout_s)

    def _fan_out(self, actors: Sequence[Any], n: int, call: Callable[[Any, int, int], Any]) -> list[Any]:
        """Split rows [0, n) over ``actors``; ``call(actor, start, stop)`` returns a ref; results in order."""
        ranges = split_evenly(n, len(actors))
        return self._call([call(actors[i], a, b) for i, (a, b) in enumerate(ranges)])

    def metrics_endpoints(self, port_of: Callable[[str, int], int | None]) -> list[dict[str, Any]]:
        """Start every service's /metrics endpoint on ``port_of(service, index)``; one target per endpoint."""
        named = [
            *(("rollout", i, name, a) for i, (name, a) in enumerate(self.rollout.items())),
            *(("teacher", i, name, a) for i, (name, a) in enumerate(self.teacher.items())),
            *(("verifier", i, name, a) for i, (name, a) in enumerate(self.verifier.items())),
        ]
        refs = [actor.metrics_endpoint.remote(port_of(service, i)) for service, i, _, actor in named]
        targets = [
            {"service": service, "host": host, "port": port, "replica": name}
            for (service, _, name, _), (host, port) in zip(named, self._call(refs), strict=True)
        ]
        ports = [port_of("learner", r) for r in range(self.cfg.learner.ranks)]
        for r, (host, port) in enumerate(self.learner.metrics_endpoints(ports)):
            targets.append({"service": "learner", "host": host, "port": port, "replica": f"rank-{r}"})
        return targets

    # ------------------------------------------------------------------------------------------ calls
    def broadcast(self, payload: AdapterPayload, *, include_teacher: bool) -> None:
        """One ray.put of the adapter; every rollout (and teacher) replica loads it and confirms it."""
        import ray

        ref = ray.put(payload)
        targets = {**self.rollout, **(self.teacher if include_teacher else {})}
        acks = self._call([actor.load_adapter.remote(ref) for actor in targets.values()])
        check_acks(acks, payload.version, payload.checksum, list(targets))

    def generate(
        self, prompt_ids: list[list[int]], sampling: SamplingSpec, version: int
    ) -> list[list[Rollout]]:
        """Spread prompts over the rollout replicas; per prompt, its ``sampling.n`` rollouts of ``version``."""

        def call(actor: Any, a: int, b: int) -> Any:
            request = GenerateRequest(prompts=prompt_ids[a:b], sampling=sampling, expected_version=version)
            return actor.generate.remote(request)

        groups: list[list[Rollout]] = []
        for result in self._fan_out(list(self.rollout.values()), len(prompt_ids), call):
            offset = len(groups)
            for group in result.rollouts:
                stale = [r.policy_version for r in group if r.policy_version != version]
                if stale:
                    raise SyncError(
                        f"{result.replica} generated with version {stale[0]}, the step uses {version}"
                    )
                groups.append([r.model_copy(update={"prompt_index": offset + r.prompt_index}) for r in group])
        return groups

    def grade(self, responses: list[str], answers: list[str]) -> list[Verdict]:
        def call(actor: Any, a: int, b: int) -> Any:
            return actor.grade.remote(GradeRequest(responses=responses[a:b], answers=answers[a:b]))

        return [
            v
            for result in self._fan_out(list(self.verifier.values()), len(responses), call)
            for v in result.verdicts
        ]

    def score(
        self, items: list[TeacherItem], *, temperature: float, template: str, version: int | None
    ) -> tuple[list[np.ndarray | None], list[np.ndarray]]:
        """log P_T⁺ and log P_T⁻ (or log P_S) of every item's response tokens; ``version`` None: reference teacher."""

        def call(actor: Any, a: int, b: int) -> Any:
            request = TeacherRequest(
                items=items[a:b], temperature=temperature, template=template, expected_version=version
            )
            return actor.score.remote(request)

        pos: list[np.ndarray | None] = []
        neg: list[np.ndarray] = []
        for result in self._fan_out(list(self.teacher.values()), len(items), call):
            pos.extend(result.logp_pos)
            neg.extend(result.logp_neg)
        return pos, neg

    def close(self, log: Callable[[str], None]) -> None:
        """Shut every replica down (each given a minute), kill it, then the learner group."""
        import ray

        for actor in [*self.rollout.values(), *self.teacher.values(), *self.verifier.values()]:
            try:
                ray.get(actor.shutdown.remote(), timeout=60)
            except Exception as exc:  # keep closing the others
                log(f"shutdown failed: {exc}")
            ray.kill(actor)
        self.learner.shutdown()
