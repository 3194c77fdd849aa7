"""Service pools: start the replicas and the learner, fan work out to them with timeouts, sync adapters, scale, close.

Every call crosses the boundary as a ``cepo_proto`` message; results come back through the Ray object store.
A pool never waits longer than ``resources.call_timeout_s`` for any call.

Placement: every replica and learner rank asks for one unit of its role's Ray custom resource (``rollout``,
``teacher``, ``verifier``, ``learner``; :func:`cepo.controller.cluster.placement`), plus its GPUs.

Adapter sync is *pull*: the controller publishes, per role, the version its replicas must serve — (version,
checksum) and one ObjectRef of the payload (:meth:`ServicePools.publish`) — and tells each replica to serve it;
a replica that does not hold it fetches the payload from the object store and confirms (version, checksum)
(``EngineReplica.pull``). A replica gets work only once it has confirmed the published version of its role, so
a new (scaled up), restarted (replaced) or lagging replica catches up the same way and never serves a stale
policy; every request still carries the version it must be served with, and a replica refuses another.

Scaling (:meth:`ServicePools.scale`) changes a role's replica count between calls: a new replica pulls and
confirms the published adapter before it is added; a removed one is taken out of the pool first (no new work)
and shut down behind whatever calls it still has queued (a Ray actor runs its calls in order). Rows are split
over the replicas present in proportion to each one's measured speed (an exponential moving average of rows per
second of its past calls; a new replica starts at the pool's mean).

A replica that dies or stops answering mid-call (its process killed, the actor crashed, the call timed out) is
replaced: the new actor, under the same name, loads the adapter version its role serves and confirms it before
it gets any work, and the failed chunk of rows goes to the replicas present. A row is only ever taken from one
successful call, so no prompt is lost or counted twice; replacements are counted per role (``restarts``).
Errors raised by a replica's own code (a version mismatch, bad input) are not faults of the process and fail
the call as before. The learner is not replaced here: a rank's death fails the step with the rank named.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from cepo import telemetry
from cepo.config import RunConfig
from cepo.controller.cluster import engine_options, placement, policy_options, role_capacity, start_ray
from cepo_proto import AdapterAck, AdapterPayload, Verdict
from cepo_proto.pipeline import (
    GenerateRequest,
    GradeRequest,
    ImageRefs,
    ProbeRequest,
    Rollout,
    RolloutResult,
    SamplingSpec,
    TeacherItem,
    TeacherRequest,
)

__all__ = [
    "ROLES",
    "ReplicaLost",
    "ScaleError",
    "ServicePools",
    "SyncError",
    "check_acks",
    "split_evenly",
    "split_weighted",
]

ROLES = ("rollout", "teacher", "verifier")
MAX_REPLACEMENTS_PER_CALL = 3
SPEED_EMA = 0.5  # weight of the newest call in a replica's rows-per-second average


class ReplicaLost(RuntimeError):
    """A role's replicas kept dying during one call (more than MAX_REPLACEMENTS_PER_CALL rounds)."""


class SyncError(RuntimeError):
    """A replica did not confirm the adapter version and checksum the learner exported."""


class ScaleError(ValueError):
    """A replica count that cannot be had (below 1, above what the cluster offers, a role the run has not)."""


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


def split_weighted(n: int, weights: Sequence[float]) -> list[tuple[int, int, int]]:
    """Contiguous ranges covering range(n), one per weight in proportion to it (largest remainder), as
    (part index, start, stop); empty ones dropped. Equal weights give :func:`split_evenly`'s ranges."""
    if not weights:
        return []
    w = np.asarray([max(float(x), 0.0) for x in weights])
    w = np.ones_like(w) if not np.isfinite(w).all() or w.sum() <= 0 else w
    exact = n * w / w.sum()
    sizes = np.floor(exact).astype(int)
    order = sorted(range(len(w)), key=lambda i: (-(exact[i] - sizes[i]), i))  # ties → the earlier part
    for i in order[: n - int(sizes.sum())]:
        sizes[i] += 1
    ranges, start = [], 0
    for i, size in enumerate(sizes.tolist()):
        if size > 0:
            ranges.append((i, start, start + size))
        start += size
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

        from cepo.hooks import import_path
        from cepo_services.learner.distributed import LearnerGroup
        from cepo_services.rollout.replica import RolloutReplica
        from cepo_services.teacher.replica import TeacherReplica
        from cepo_services.verifier.replica import VerifierReplica

        self.cfg = cfg
        start_ray(cfg)
        res, v = cfg.resources, cfg.verifier
        gpus = {role: cfg.gpus_per_replica(role) for role in ("rollout", "teacher")}
        # verifier.reward_fn is imported in each verifier's worker with this process's import path (cepo.hooks)
        reward_path = import_path() if v.reward_fn is not None else None

        def engine(cls: type, backend: str, seed: int, name: str) -> Any:
            role = cls.service
            options = engine_options(cfg, backend, seed, role=role)
            where = placement(role, cpus=res.cpus_per_replica, gpus=gpus[role])
            return ray.remote(**where)(cls).remote(name, backend, cfg.model.path, **options)

        # role → start replica ``index`` under ``name``
        self._spawn: dict[str, Callable[[str, int], Any]] = {
            "rollout": lambda name, i: engine(
                RolloutReplica, cfg.engine_backend("rollout"), cfg.seed + i, name
            ),
            "teacher": lambda name, i: engine(
                TeacherReplica, cfg.engine_backend("teacher"), cfg.seed + 100 + i, name
            ),
            "verifier": lambda name, i: ray.remote(**placement("verifier", cpus=1))(VerifierReplica).remote(
                name,
                format_weight=v.format_weight,
                timeout_s=v.timeout_s,
                max_chars=v.max_response_chars,
                reward_fn=v.reward_fn,
                reward_path=reward_path,
            ),
        }
        counts = {
            "rollout": cfg.rollout.replicas,
            "teacher": cfg.teacher.replicas if with_teacher else 0,
            "verifier": v.replicas,
        }
        self.pools: dict[str, dict[str, Any]] = {
            role: {f"{role}-{i}": self._spawn[role](f"{role}-{i}", i) for i in range(counts[role])}
            for role in ROLES
        }
        self.rollout, self.teacher, self.verifier = (self.pools[role] for role in ROLES)
        self.serving: dict[str, AdapterPayload | None] = dict.fromkeys(ROLES)  # the adapter each role serves
        self._published: dict[str, Any] = dict.fromkeys(ROLES)  # role → ObjectRef of ``serving[role]``
        self.confirmed: dict[str, tuple[int, str]] = {}  # replica → the (version, checksum) it confirmed
        self._membership = threading.RLock()  # pulls and replacements, from calls that run side by side
        self.speed: dict[str, float] = {}  # replica → rows per second (exponential moving average)
        self.restarts: dict[str, int] = dict.fromkeys(ROLES, 0)
        self.targets: list[dict[str, Any]] = []
        self._port_of: Callable[[str, int], int | None] | None = None
        self._show_counts()
        learner_where = placement("learner", cpus=res.cpus_per_learner_rank)
        self.learner = LearnerGroup(
            cfg.model.path,
            cfg.learner.ranks,
            policy_kwargs=policy_options(cfg),
            backend=cfg.learner.backend,
            cpus_per_rank=res.cpus_per_learner_rank,
            gpus_per_rank=res.gpus_per_learner_rank,
            resources=learner_where.get("resources"),
            timeout_s=res.call_timeout_s,
        )

    # ------------------------------------------------------------------------------------------ plumbing
    def _call(self, refs: list[Any]) -> list[Any]:
        import ray

        return ray.get(refs, timeout=self.cfg.resources.call_timeout_s)

    def counts(self) -> dict[str, int]:
        """Replicas per role now."""
        return {role: len(self.pools[role]) for role in ROLES}

    def _show_counts(self) -> None:
        for role, n in self.counts().items():
            telemetry.set_replicas(role, n)

    def _fan_out(self, role: str, n: int, call: Callable[[Any, int, int], Any]) -> list[Any]:
        """Split rows [0, n) over the role's replicas in proportion to their measured speed; ``call(actor, start,
        stop)`` returns a ref. Results in row order; a chunk whose replica died or timed out is redone on the
        replicas present after a replacement. Every replica first serves the adapter published for its role."""
        import ray
        from ray.exceptions import RayActorError

        self._catch_up(role)
        pool = self.pools[role]
        work = self._split(role, n)
        results: dict[int, Any] = {}
        for _ in range(MAX_REPLACEMENTS_PER_CALL + 1):
            refs = {call(pool[name], a, b): (name, pool[name], a, b) for name, a, b in work}
            done, late = ray.wait(
                list(refs), num_returns=len(refs), timeout=self.cfg.resources.call_timeout_s
            )
            failed, lost = [], {}
            for ref in done:
                name, actor, a, b = refs[ref]
                try:
                    results[a] = ray.get(ref)
                except RayActorError:  # the process died (killed, crashed, out of memory)
                    failed.append((a, b))
                    lost[name] = actor
                else:
                    self._measured(name, b - a, getattr(results[a], "seconds", None))
            for ref in late:  # no answer within the call timeout: presumed hung
                name, actor, a, b = refs[ref]
                failed.append((a, b))
                lost[name] = actor
            if not failed:
                return [results[a] for a in sorted(results)]
            self._replace_lost(role, lost)
            names = list(pool)
            work = [(names[i % len(names)], a, b) for i, (a, b) in enumerate(failed)]
        raise ReplicaLost(
            f"{role} replicas kept dying: {MAX_REPLACEMENTS_PER_CALL} replacement rounds in one call"
        )

    def _split(self, role: str, n: int) -> list[tuple[str, int, int]]:
        """Rows [0, n) as (replica, start, stop) chunks, in proportion to each replica's measured speed (a
        replica not measured yet counts as the pool's mean)."""
        names = list(self.pools[role])
        weights = [self.speed.get(name, 0.0) for name in names]
        known = [w for w in weights if w > 0]
        weights = [w if w > 0 else (float(np.mean(known)) if known else 1.0) for w in weights]
        return [(names[i], a, b) for i, a, b in split_weighted(n, weights)]

    def _measured(self, name: str, rows: int, seconds: float | None) -> None:
        if not seconds or seconds <= 0 or rows <= 0:
            return
        rate = rows / seconds
        old = self.speed.get(name)
        self.speed[name] = rate if old is None else SPEED_EMA * rate + (1 - SPEED_EMA) * old

    # ------------------------------------------------------------------------------------------ adapters
    def publish(self, role: str, payload: AdapterPayload) -> None:
        """From now on ``role``'s replicas serve ``payload``: one ray.put, pulled by each replica that lacks it."""
        import ray

        self.serving[role] = payload
        self._published[role] = ray.put(payload)

    def _pull(self, role: str, names: Sequence[str]) -> None:
        """Tell ``names`` to serve their role's published adapter and wait for each to confirm it; a replica
        that died or hangs is replaced (its replacement pulls and confirms the same version)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        payload = self.serving[role]
        if payload is None or not names:
            return
        where = [self._published[role]]
        calls = {
            name: self.pools[role][name].pull.remote(payload.version, payload.checksum, where)
            for name in names
        }
        acks = []
        for name, call in calls.items():
            try:
                acks.append(ray.get(call, timeout=self.cfg.resources.call_timeout_s))
            except (RayActorError, GetTimeoutError):
                self._replace(role, name)  # pulls and confirms (version, checksum) itself
                acks.append(AdapterAck(replica=name, version=payload.version, checksum=payload.checksum))
        check_acks(acks, payload.version, payload.checksum, list(calls))
        for ack in acks:
            self.confirmed[ack.replica] = (ack.version, ack.checksum)

    def _catch_up(self, role: str) -> None:
        """Every replica of ``role`` that has not confirmed the published version pulls it before getting work."""
        payload = self.serving.get(role)
        if payload is None:
            return
        with self._membership:
            lagging = [
                name
                for name in self.pools[role]
                if self.confirmed.get(name) != (payload.version, payload.checksum)
            ]
            self._pull(role, lagging)

    def _replace_lost(self, role: str, lost: dict[str, Any]) -> None:
        """Replace each lost replica (name → the actor that failed) unless another call already has: calls may
        run side by side (streamed chunks) and see the same replica die."""
        with self._membership:
            for name, actor in sorted(lost.items()):
                if self.pools[role].get(name) is actor:
                    self._replace(role, name)

    def _replace(self, role: str, name: str) -> None:
        """Kill ``name`` (if it is still there), start a new replica under that name that pulls and confirms the
        adapter its role serves before it gets work, and restart its /metrics endpoint."""
        import ray

        with contextlib.suppress(Exception):
            ray.kill(self.pools[role][name], no_restart=True)
        self.confirmed.pop(name, None)
        index = int(name.rpartition("-")[2])
        actor = self._spawn[role](name, index)
        self._confirm_new(role, name, actor)
        self.pools[role][name] = actor
        self.restarts[role] += 1
        if self._port_of is not None:
            host, port = self._call([actor.metrics_endpoint.remote(self._port_of(role, index))])[0]
            for target in self.targets:
                if target["replica"] == name:
                    target.update(host=host, port=port)

    def _confirm_new(self, role: str, name: str, actor: Any) -> None:
        """A replica not yet in the pool pulls its role's published adapter and confirms it."""
        payload = self.serving[role]
        if payload is None:
            return
        where = [self._published[role]]
        ack = self._call([actor.pull.remote(payload.version, payload.checksum, where)])[0]
        check_acks([ack], payload.version, payload.checksum, [name])
        self.confirmed[name] = (ack.version, ack.checksum)

    def metrics_endpoints(self, port_of: Callable[[str, int], int | None]) -> list[dict[str, Any]]:
        """Start every service's /metrics endpoint on ``port_of(service, index)``; one target per endpoint (kept
        up to date in ``targets`` when a replica is replaced, added or removed)."""
        self._port_of = port_of
        named = [(role, i, name, a) for role in ROLES for i, (name, a) in enumerate(self.pools[role].items())]
        refs = [actor.metrics_endpoint.remote(port_of(service, i)) for service, i, _, actor in named]
        targets = [
            {"service": service, "host": host, "port": port, "replica": name}
            for (service, _, name, _), (host, port) in zip(named, self._call(refs), strict=True)
        ]
        ports = [port_of("learner", r) for r in range(self.cfg.learner.ranks)]
        for r, (host, port) in enumerate(self.learner.metrics_endpoints(ports)):
            targets.append({"service": "learner", "host": host, "port": port, "replica": f"rank-{r}"})
        self.targets = targets
        return targets

    # ------------------------------------------------------------------------------------------ scaling
    def scale(self, role: str, count: int) -> dict[str, int]:
        """Make ``role`` (rollout or teacher) have ``count`` replicas; call it between steps. New replicas
        (the lowest free indices) pull and confirm the published adapter before they join; removed ones (the
        highest indices) leave the pool at once and shut down after their queued calls. Returns the counts."""
        import ray

        if role not in ("rollout", "teacher"):
            raise ScaleError(f"only rollout and teacher replicas scale, not {role!r}")
        if count < 1:
            raise ScaleError(f"{role}: at least 1 replica, got {count}")
        pool = self.pools[role]
        if not pool:
            raise ScaleError(f"{role}: this run has no {role} replicas (its method does not use them)")
        capacity = role_capacity(role)
        if capacity is not None and count > capacity:
            raise ScaleError(
                f"{role}: {count} replicas asked, the cluster offers {capacity:g} {role!r} units"
            )
        limit = telemetry.SERVICES[role][1]
        if count > limit:
            raise ScaleError(f"{role}: at most {limit} replicas (the metrics port layout), got {count}")
        while len(pool) < count:
            index = min(set(range(count)) - {int(n.rpartition("-")[2]) for n in pool})
            name = f"{role}-{index}"
            actor = self._spawn[role](name, index)
            try:
                self._call([actor.node.remote()])  # up (the engine loaded) within the call timeout
                self._confirm_new(role, name, actor)
                target = None
                if self._port_of is not None:
                    host, port = self._call([actor.metrics_endpoint.remote(self._port_of(role, index))])[0]
                    target = {"service": role, "host": host, "port": port, "replica": name}
            except BaseException:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
                self.confirmed.pop(name, None)
                raise
            pool[name] = actor
            if target is not None:
                self.targets.append(target)
        removed = sorted(pool, key=lambda n: int(n.rpartition("-")[2]))[count:]
        leaving = [(name, pool.pop(name)) for name in removed]  # no new work from here on
        if leaving:
            # a Ray actor runs its calls in order: shutdown() runs after the calls already queued on it
            done = [actor.shutdown.remote() for _, actor in leaving]
            ray.wait(done, num_returns=len(done), timeout=self.cfg.resources.call_timeout_s)
            for name, actor in leaving:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
                self.confirmed.pop(name, None)
                self.speed.pop(name, None)
            self.targets = [t for t in self.targets if t.get("replica") not in set(removed)]
        self._show_counts()
        return self.counts()

    def replicas(self) -> dict[str, list[dict[str, Any]]]:
        """Every rollout and teacher replica as it answers now: name, node, the (version, checksum) it serves
        and whether it answered within the call timeout (call between steps: a busy replica answers late)."""
        import ray

        out: dict[str, list[dict[str, Any]]] = {}
        for role in ("rollout", "teacher"):
            rows = []
            for name, actor in self.pools[role].items():
                row: dict[str, Any] = {"name": name, "healthy": False, "version": None, "checksum": None}
                try:
                    (version, checksum), node = ray.get(
                        [actor.serving.remote(), actor.node.remote()],
                        timeout=self.cfg.resources.call_timeout_s,
                    )
                    row.update(healthy=True, version=version, checksum=checksum, node=node["node_id"])
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                rows.append(row)
            out[role] = rows
        return out

    # ------------------------------------------------------------------------------------------ calls
    def broadcast(self, payload: AdapterPayload, *, rollout: bool = True, teacher: bool = False) -> None:
        """Publish the adapter (one ray.put) for rollout and/or teacher; every replica of those roles pulls it
        and confirms it now. A replica that died is replaced, and its replacement pulls it too."""
        roles = [role for role, wanted in (("rollout", rollout), ("teacher", teacher)) if wanted]
        for role in roles:
            self.publish(role, payload)
        for role in roles:
            self._pull(role, list(self.pools[role]))

    def probe(
        self,
        sequences: list[tuple[list[int], int]],
        expected: list[np.ndarray],
        *,
        temperature: float,
        atol: float,
    ) -> list[str]:
        """Have every rollout and teacher replica that serves the actor's adapter score ``sequences``; one whose
        log-probs differ from ``expected`` (the learner's) by more than ``atol`` reloads its adapter and is probed
        again, and is replaced if it still differs. Returns the names that failed the first probe."""
        request = ProbeRequest(sequences=sequences, temperature=temperature)
        actor, teacher = self.serving["rollout"], self.serving["teacher"]
        same = teacher is not None and actor is not None and teacher.version == actor.version
        targets = {name: role for role in ("rollout", "teacher")[: 1 + same] for name in self.pools[role]}

        def off(names: list[str]) -> list[str]:
            results = self._call([self.pools[targets[n]][n].probe.remote(request) for n in names])
            bad = []
            for name, result in zip(names, results, strict=True):
                pairs = zip(result.logprobs, expected, strict=True)
                worst = max(float(np.abs(got - want[: len(got)]).max()) for got, want in pairs)
                if not worst <= atol:  # NaN counts as off
                    bad.append(name)
            return bad

        failed = off(list(targets))
        if not failed:
            return []
        for name in failed:  # reload the same payload (the engine gives it a fresh LoRA id)
            payload = self.serving[targets[name]]
            ack = self._call([self.pools[targets[name]][name].load_adapter.remote(payload)])[0]
            check_acks([ack], payload.version, payload.checksum, [name])
        for name in off(failed):
            self._replace(targets[name], name)
        return failed

    @staticmethod
    def _generate_request(
        prompt_ids: list[list[int]],
        sampling: SamplingSpec,
        version: int,
        images: ImageRefs | None,
        a: int,
        b: int,
    ) -> GenerateRequest:
        """Prompts [a, b) as one request (a seeded spec gets seed + a: the same rows, the same seeds)."""
        spec = sampling if sampling.seed is None else sampling.model_copy(update={"seed": sampling.seed + a})
        return GenerateRequest(
            prompts=prompt_ids[a:b],
            sampling=spec,
            expected_version=version,
            images=None if images is None else images.slice(a, b),
        )

    @staticmethod
    def _groups(result: RolloutResult, version: int, offset: int) -> list[list[Rollout]]:
        """A result's groups, ``prompt_index`` shifted by ``offset`` to the row in the whole batch; every
        rollout must come from ``version``."""
        groups = []
        for group in result.rollouts:
            stale = [r.policy_version for r in group if r.policy_version != version]
            if stale:
                raise SyncError(
                    f"{result.replica} generated with version {stale[0]}, the step uses {version}"
                )
            groups.append([r.model_copy(update={"prompt_index": offset + r.prompt_index}) for r in group])
        return groups

    def generate(
        self,
        prompt_ids: list[list[int]],
        sampling: SamplingSpec,
        version: int,
        images: ImageRefs | None = None,
    ) -> list[list[Rollout]]:
        """Spread prompts over the rollout replicas; per prompt, its ``sampling.n`` rollouts of ``version``
        (``images``: per prompt, its images, one shared object-store batch)."""

        def call(actor: Any, a: int, b: int) -> Any:
            return actor.generate.remote(self._generate_request(prompt_ids, sampling, version, images, a, b))

        results = self._fan_out("rollout", len(prompt_ids), call)
        groups: list[list[Rollout]] = []
        for result in results:
            groups.extend(self._groups(result, version, len(groups)))
        return groups

    def generate_stream(
        self,
        prompt_ids: list[list[int]],
        sampling: SamplingSpec,
        version: int,
        images: ImageRefs | None = None,
    ) -> Iterator[list[list[Rollout]]]:
        """``generate``'s groups as they finish, on whichever replica: each item a list of groups
        (``prompt_index`` = row in ``prompt_ids``), every prompt exactly once over the stream.

        Prompts are split over the replicas as ``generate`` splits them, and each replica streams its groups
        back (``RolloutReplica.generate_stream``). A replica that dies or stops answering mid-stream is replaced,
        and the prompts it had not finished are generated again on the replicas present (``generate``); the
        groups it did finish are kept. An error of the replica's own code fails the call, as in ``generate``.
        """
        import ray
        from ray.exceptions import RayActorError

        self._catch_up("rollout")
        pool, timeout = self.pools["rollout"], self.cfg.resources.call_timeout_s
        streams = {}
        for name, a, b in self._split("rollout", len(prompt_ids)):
            request = self._generate_request(prompt_ids, sampling, version, images, a, b)
            stream = pool[name].generate_stream.options(num_returns="streaming").remote(request)
            streams[stream] = (name, pool[name], a, b)
        done: set[int] = set()
        seconds: dict[str, float] = {}
        lost: dict[str, Any] = {}
        try:
            while streams:
                ready, _ = ray.wait(list(streams), num_returns=1, timeout=timeout)
                if not ready:  # no group from any replica within the call timeout: presumed hung
                    lost.update({name: actor for name, actor, _, _ in streams.values()})
                    break
                stream = ready[0]
                name, actor, a, b = streams[stream]
                try:
                    result = ray.get(next(stream))
                except StopIteration:  # the replica's whole chunk is in: its speed, as generate measures it
                    self._measured(name, b - a, seconds.get(name))
                    del streams[stream]
                    continue
                except RayActorError:  # the process died (killed, crashed, out of memory)
                    lost[name] = actor
                    del streams[stream]
                    continue
                groups = self._groups(result, version, a)
                done.update(group[0].prompt_index for group in groups)
                seconds[name] = result.seconds
                yield groups
        finally:
            for stream in streams:  # the consumer stopped early or a stream hung: cancel what is left
                with contextlib.suppress(Exception):
                    ray.cancel(stream)
        if not lost:
            return
        self._replace_lost("rollout", lost)
        missing = [i for i in range(len(prompt_ids)) if i not in done]
        if missing:
            again = self.generate(
                [prompt_ids[i] for i in missing],
                sampling,
                version,
                None if images is None else images.take(missing),
            )
            yield [
                [r.model_copy(update={"prompt_index": missing[r.prompt_index]}) for r in group]
                for group in again
            ]

    def grade(self, responses: list[str], answers: list[str]) -> list[Verdict]:
        def call(actor: Any, a: int, b: int) -> Any:
            return actor.grade.remote(GradeRequest(responses=responses[a:b], answers=answers[a:b]))

        return [v for result in self._fan_out("verifier", len(responses), call) for v in result.verdicts]

    def score(
        self,
        items: list[TeacherItem],
        *,
        temperature: float,
        template: str,
        version: int | None,
        images: ImageRefs | None = None,
        sees_image: bool = True,
    ) -> tuple[list[np.ndarray | None], list[np.ndarray], list[int]]:
        """log P_T⁺ and log P_T⁻ (or log P_S) of every item's response tokens, and the items too long for the
        teacher engines (their scores empty); ``version`` None: the reference teacher."""

        def call(actor: Any, a: int, b: int) -> Any:
            request = TeacherRequest(
                items=items[a:b],
                temperature=temperature,
                template=template,
                expected_version=version,
                images=None if images is None else images.slice(a, b),
                sees_image=sees_image,
            )
            return actor.score.remote(request)

        pos: list[np.ndarray | None] = []
        neg: list[np.ndarray] = []
        unfit: list[int] = []
        for result in self._fan_out("teacher", len(items), call):
            unfit.extend(len(neg) + k for k in result.unfit)
            pos.extend(result.logp_pos)
            neg.extend(result.logp_neg)
        return pos, neg, unfit

    def close(self, log: Callable[[str], None]) -> None:
        """Shut every replica down (each given a minute), kill it, then the learner group."""
        import ray

        for actor in [a for role in ROLES for a in self.pools[role].values()]:
            try:
                ray.get(actor.shutdown.remote(), timeout=60)
            except Exception as exc:  # keep closing the others
                log(f"shutdown failed: {exc}")
            ray.kill(actor)
        self.learner.shutdown()
