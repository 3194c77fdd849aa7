"""The distributed learner: N Ray actors, one torch.distributed process group, FSDP2 over the LoRA policy.

The driver-side :class:`LearnerGroup` starts ``ranks`` :class:`LearnerRank` actors that join one process group
(gloo on CPU, NCCL when each rank has a GPU) and each own a :class:`~cepo_services.learner.policy.LoraPolicy`
built with ``fsdp=True``. Every call takes plain data — samples as (prompt ids, response ids), tensors for
the rest — and shards the batch contiguously across ranks (as even as possible; with fewer samples than
ranks some shards are empty).

Normalisation. The driver counts the response tokens and sequences of the WHOLE batch and hands them to every
rank; each rank's loss is its tokens' share of the global token mean, FSDP sums (never averages) the gradients
across ranks, so the step equals one taken on the whole batch in one process. FSDP2 communicates in every
forward and backward, so the driver also tells every rank the global number of micro-batches and ranks with
less work run dummy micro-batches.

Failure handling. Each call first lets the ranks agree that their inputs are valid (one all-reduce of an error
flag): a bad input fails on every rank at once, the rank that rejected it is named, and the group stays usable.
A rank that fails later, inside a collective, would leave its peers waiting forever, so the driver waits a
grace period for the others and otherwise tears the group down. No call waits longer than ``timeout_s``.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import ray
import torch
import torch.nn.functional as F

from cepo_proto.adapter import AdapterPayload
from cepo_proto.learner import UpdateRequest, UpdateResult, UpdateStats
from cepo_proto.pipeline import ImageRefs
from cepo_services.common import metrics
from cepo_services.learner.policy import (
    LoraPolicy,
    PolicyBatch,
    plan_update,
    shard_bounds,
    teacher_image_rows,
)

__all__ = ["LearnerError", "LearnerGroup", "LearnerRank", "shard_bounds"]

Samples = Sequence[tuple[Sequence[int], Sequence[int]]]


class LearnerError(RuntimeError):
    """A learner rank failed; ``rank`` is the rank whose error is reported (None for a timeout)."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


class _PeerRejected(RuntimeError):
    """This rank's inputs were fine, another rank's were not (the agreement step failed elsewhere)."""


PORT_ATTEMPTS = 3


def _port_taken(exc: BaseException) -> bool:
    """Did the process group fail because its rendezvous port was taken (EADDRINUSE)?"""
    text = f"{exc} {exc.__cause__ or ''}".lower()
    return "eaddrinuse" in text or "address already in use" in text


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resolve(images: ImageRefs | None) -> list[list[Any]] | None:
    return None if images is None else images.resolve()


def _response_width(samples: Samples) -> int:
    return max((len(r) for _, r in samples), default=0)


@ray.remote
class LearnerRank:
    """One rank: joins the process group, owns an FSDP-sharded LoraPolicy, runs its shard of every call."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        backend: str,
        model_path: str,
        policy_kwargs: dict[str, Any],
        threads: int,
        pg_timeout_s: float,
    ) -> None:
        # the group joins in join(), once rank 0's node (the rendezvous address) is known
        self.rank, self.world_size = rank, world_size
        self.device = torch.device("cuda" if backend == "nccl" else "cpu")
        self._settings = (backend, model_path, policy_kwargs, threads, pg_timeout_s)
        self._start_error: BaseException | None = None

    def node(self) -> dict[str, Any]:
        """Where this rank runs: Ray node id and address (rank 0's is the group's rendezvous address)."""
        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}

    def free_port(self) -> int:
        """A port free on this rank's node (rank 0's: the rendezvous port when the ranks span nodes)."""
        return _free_port()

    def join(self, master_addr: str, master_port: int) -> None:
        """Join the process group at rank 0's (address, port) and build the policy. A failure is raised here
        (the driver sees the real error, not "actor died") and kept for ready()."""
        backend, model_path, policy_kwargs, threads, pg_timeout_s = self._settings
        try:
            self._start(master_addr, master_port, backend, model_path, policy_kwargs, threads, pg_timeout_s)
        except Exception as exc:
            self._start_error = exc
            raise

    def _start(
        self,
        master_addr: str,
        master_port: int,
        backend: str,
        model_path: str,
        policy_kwargs: dict[str, Any],
        threads: int,
        pg_timeout_s: float,
    ) -> None:
        import torch.distributed as dist

        rank, world_size = self.rank, self.world_size
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK="0",
        )
        torch.set_num_threads(max(1, threads))
        if self.device.type == "cuda":
            torch.cuda.set_device(0)  # Ray exposes each rank's own GPU as cuda:0
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout_s)
        )
        self.policy = LoraPolicy(model_path, fsdp=True, device=self.device.type, **policy_kwargs)
        self.vocab_size = int(self.policy.model.get_input_embeddings().num_embeddings)

    # ------------------------------------------------------------------ plumbing
    def ready(self) -> dict[str, Any]:
        if self._start_error is not None:
            raise self._start_error
        return {"rank": self.rank, "pid": os.getpid(), "device": str(self.device)}

    def _agree(self, prepare: Callable[[], Any]) -> Any:
        """Run ``prepare`` (validation, no collectives) and agree with every rank that all of them succeeded."""
        import torch.distributed as dist

        error: BaseException | None = None
        try:
            prepared = prepare()
        except Exception as exc:
            error = exc
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if error is not None:
            raise error
        if int(flag.item()):
            raise _PeerRejected("another learner rank rejected its inputs")
        return prepared

    def _batch(
        self, samples: Samples, index: Sequence[int], images: Sequence[Sequence[Any]] | None = None
    ) -> PolicyBatch:
        """This rank's shard as a batch; ``index`` holds each sample's index in the global batch; ``images``
        each sample's images (a VL policy; resolved from the request's :class:`ImageRefs`)."""
        for i, (prompt, response) in zip(index, samples, strict=True):
            bad = [t for t in (*prompt, *response) if not 0 <= int(t) < self.vocab_size]
            if bad:
                raise ValueError(
                    f"sample {i}: token id {bad[0]} outside the vocabulary [0, {self.vocab_size})"
                )
        if not samples:
            return PolicyBatch.empty()
        try:
            rows = images
            if rows is not None and any(rows) and self.policy.image_processor is None:
                raise ValueError("the policy model is text-only but the samples have images")
            return PolicyBatch.build(samples, images=rows)
        except ValueError as exc:
            first = index[0] if len(index) else 0
            raise ValueError(f"{exc} (counting from sample {first}, this rank's first)") from None

    # ------------------------------------------------------------------ work
    def old_logprobs(
        self,
        samples: Samples,
        offset: int,
        micro_batch_size: int,
        num_micro_batches: int,
        images: ImageRefs | None = None,
    ) -> torch.Tensor:
        index = range(offset, offset + len(samples))
        batch = self._agree(lambda: self._batch(samples, index, _resolve(images)))
        return self.policy.old_logprobs(batch, micro_batch_size, num_micro_batches=num_micro_batches)

    def update(
        self,
        samples: Samples,
        index: Sequence[int],
        advantages: torch.Tensor,
        old_logp: torch.Tensor,
        options: dict[str, Any],
        teacher_samples: Samples | None = None,
        images: ImageRefs | None = None,
    ) -> UpdateStats:
        def prepare() -> tuple[PolicyBatch, PolicyBatch | None]:
            rows = _resolve(images)  # one ray.get of the step's image batch, for the student and teacher rows
            batch = self._batch(samples, index, rows)
            width = batch.response_mask.shape[1]
            for name, t in (("advantages", advantages), ("old_logp", old_logp)):
                if t.shape[0] != len(batch) or t.shape[1] < width:
                    raise ValueError(
                        f"{name} shard must have {len(batch)} rows and ≥ {width} columns, got {tuple(t.shape)}"
                    )
            teacher = None
            if teacher_samples is not None:  # r⁺ contexts: each with its sample's images, or none (blind)
                token = self.policy.image_token_id
                teacher_rows = teacher_image_rows(samples, teacher_samples, rows, token, index)
                teacher = self._batch(teacher_samples, index, teacher_rows)
            return batch, teacher

        start = time.perf_counter()
        batch, teacher = self._agree(prepare)
        width = batch.response_mask.shape[1]
        stats = self.policy.update(
            batch, advantages[:, :width], old_logp[:, :width], teacher_batch=teacher, **options
        )
        metrics.observe_learner_update(
            self.rank, stats.loss, stats.grad_norm, stats.clip_frac, time.perf_counter() - start
        )
        return stats

    def lora_state(self) -> dict[str, torch.Tensor] | None:
        state = self.policy.lora_state()
        return state if self.rank == 0 else None

    def export_adapter(self) -> AdapterPayload | None:
        return self.policy.export_adapter()

    def training_state(self) -> dict[str, Any] | None:
        return self.policy.training_state()

    def load_training_state(self, state: dict[str, Any]) -> int:
        self.policy.load_training_state(state)
        return self.policy.version

    def metrics_endpoint(self, port: int) -> tuple[str, int]:
        """Serve this rank's Prometheus metrics on ``port`` (0: ephemeral); returns (node ip, port)."""
        return metrics.endpoint(port)

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class LearnerGroup:
    """Driver-side handle on ``ranks`` LearnerRank actors forming one FSDP learner.

    ``backend``: "gloo", "nccl" or "auto" (NCCL when each rank gets a GPU, i.e. ``gpus_per_rank`` > 0, else
    gloo). NCCL needs one whole GPU per rank (two ranks may not share a device). ``timeout_s`` bounds every
    call (and the start); ``grace_s`` is how long the other ranks get to finish after one failed before the
    group is presumed stuck in a collective and torn down.
    """

    def __init__(
        self,
        model_path: str,
        ranks: int,
        *,
        policy_kwargs: dict[str, Any],
        backend: str = "auto",
        cpus_per_rank: float = 1,
        gpus_per_rank: float = 0,
        resources: dict[str, float] | None = None,
        timeout_s: float = 600.0,
        grace_s: float = 30.0,
    ) -> None:
        if ranks < 1:
            raise ValueError(f"ranks must be ≥ 1, got {ranks}")
        if backend == "auto":
            backend = "nccl" if gpus_per_rank > 0 else "gloo"
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'auto', 'gloo' or 'nccl', got {backend!r}")
        reserved = {"fsdp", "device"} & set(policy_kwargs)
        if reserved:
            raise ValueError(f"policy_kwargs may not set {sorted(reserved)}: the group chooses them")
        self.ranks, self.backend = ranks, backend
        self._version = 0
        self.timeout_s, self.grace_s = timeout_s, grace_s
        threads = max(1, int(cpus_per_rank))
        options: dict[str, Any] = {"num_cpus": cpus_per_rank, "num_gpus": gpus_per_rank, "max_restarts": 0}
        if resources:
            options["resources"] = dict(resources)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            # the rendezvous port is free when chosen, but another process may take it before rank 0
            # binds it: that one error is retried on a fresh port, any other is raised at once
            self._closed: str | None = None
            self._actors = [
                LearnerRank.options(**options).remote(
                    r, ranks, backend, model_path, dict(policy_kwargs), threads, timeout_s
                )
                for r in range(ranks)
            ]
            try:
                self.nodes = self._call("start", [a.node.remote() for a in self._actors])
                master_addr, port = self._rendezvous()
                self._call("start", [a.join.remote(master_addr, port) for a in self._actors])
                self.info = self._call("start", [a.ready.remote() for a in self._actors])
                break
            except BaseException as exc:
                self._teardown("failed to start")
                if attempt == PORT_ATTEMPTS or not _port_taken(exc):
                    raise

    def _rendezvous(self) -> tuple[str, int]:
        """torch.distributed's master (address, port): loopback when every rank shares one node, else rank 0's
        node address and a port free there, so ranks may sit on different nodes of a cluster."""
        one_node = len({n["node_id"] for n in self.nodes}) == 1
        if one_node and self._on_this_node(0):
            return "127.0.0.1", _free_port()
        port = self._call("start", [self._actors[0].free_port.remote()])[0]
        return ("127.0.0.1" if one_node else self.nodes[0]["ip"]), port

    def _on_this_node(self, rank: int) -> bool:
        try:
            return self.nodes[rank]["node_id"] == ray.get_runtime_context().get_node_id()
        except Exception:  # not connected as a driver of this cluster's nodes
            return False

    # ------------------------------------------------------------------ plumbing
    def _call(self, what: str, refs: list[ray.ObjectRef]) -> list[Any]:
        """Wait for one result per rank; name the failing rank; never wait longer than timeout_s."""
        deadline = time.monotonic() + self.timeout_s
        results: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}
        first_error_at = 0.0
        index = {ref: r for r, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            left = deadline - time.monotonic()
            if errors:  # one rank failed: the others get a grace period, they may be stuck in a collective
                left = min(left, first_error_at + self.grace_s - time.monotonic())
            if left <= 0:
                break
            done, pending = ray.wait(pending, num_returns=1, timeout=left)
            for ref in done:
                r = index[ref]
                try:
                    results[r] = ray.get(ref)
                except Exception as exc:
                    if not errors:
                        first_error_at = time.monotonic()
                    errors[r] = exc
        stuck = sorted(index[ref] for ref in pending)
        if stuck:
            self._teardown(f"{what}: ranks {stuck} did not finish")
        if errors:
            rank, exc = self._root_cause(errors)
            cause = getattr(exc, "cause", None) or exc
            message = f"learner rank {rank} failed in {what}: {type(cause).__name__}: {_first_line(cause)}"
            if stuck:
                message += f" (ranks {stuck} were stuck; the group was shut down)"
            raise LearnerError(message, rank) from exc
        if stuck:
            raise LearnerError(
                f"learner {what} timed out after {self.timeout_s:g} s; ranks {stuck} still running; "
                "the group was shut down"
            )
        return [results[r] for r in range(len(refs))]

    @staticmethod
    def _root_cause(errors: dict[int, BaseException]) -> tuple[int, BaseException]:
        """The lowest rank whose error is its own (not the echo of another rank's rejected input)."""
        for rank in sorted(errors):
            if not isinstance(getattr(errors[rank], "cause", None), _PeerRejected):
                return rank, errors[rank]
        rank = min(errors)
        return rank, errors[rank]

    def _live(self) -> list[Any]:
        if self._closed is not None:
            raise LearnerError(f"the learner group is shut down ({self._closed})")
        return self._actors

    def _shards(self, samples: Samples, micro_batch_size: int) -> tuple[list[tuple[int, int]], int]:
        if not samples:
            raise ValueError("a learner call needs at least one sample")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be ≥ 1, got {micro_batch_size}")
        bounds = shard_bounds(len(samples), self.ranks)
        micro = max(math.ceil((stop - start) / micro_batch_size) for start, stop in bounds)
        return bounds, micro

    # ------------------------------------------------------------------ API
    def old_logprobs(
        self, samples: Samples, micro_batch_size: int = 8, images: ImageRefs | None = None
    ) -> torch.Tensor:
        """[B, T] old-policy log-probs of every sample's response tokens (0 at padding), T = longest response;
        ``images``: each sample's images (a VL policy)."""
        actors = self._live()
        samples = [(list(p), list(r)) for p, r in samples]
        bounds, micro = self._shards(samples, micro_batch_size)
        refs = [
            a.old_logprobs.remote(
                samples[start:stop],
                start,
                micro_batch_size,
                micro,
                None if images is None else images.slice(start, stop),
            )
            for a, (start, stop) in zip(actors, bounds, strict=True)
        ]
        parts = self._call("old_logprobs", refs)
        width = _response_width(samples)
        return torch.cat([F.pad(p, (0, width - p.shape[1])) for p in parts])

    @property
    def version(self) -> int:
        """The policy version the learner holds: 0 before any update, + 1 per update (assigned here only)."""
        return self._version

    def update(self, request: UpdateRequest) -> UpdateResult:
        """One update on every rank over the whole batch (``ppo_epochs × mini_batches`` optimizer steps, each
        over a global mini-batch sharded across the ranks: :func:`plan_update`); the adapter it produced, at
        version + 1. Stats are aggregated over the ranks. OPSD / SDPO: ``request.distill`` and
        ``request.teacher_samples``; a teacher context with image tokens gets its sample's images
        (``request.images``), one without none (:func:`teacher_image_rows`).
        """
        start = time.perf_counter()
        actors = self._live()
        samples = [(list(p), list(r)) for p, r in request.samples]
        settings = request.settings
        plans = plan_update(
            [len(r) for _, r in samples], self.ranks, settings.mini_batches, settings.micro_batch_size
        )
        tokens = [sum(len(samples[i][1]) for i in rows) for rows, _ in plans]
        advantages = torch.tensor(request.advantages)
        old_logp = torch.tensor(request.old_logp)
        teacher = request.teacher_samples
        refs = [
            a.update.remote(
                [samples[i] for i in rows],
                rows,
                advantages[rows],
                old_logp[rows],
                {"settings": settings, "plan": plan, "distill": request.distill},
                None
                if request.distill is None
                else [(list(teacher[i][0]), list(teacher[i][1])) for i in rows],
                None
                if request.images is None
                else ImageRefs(batch=request.images.batch, rows=[request.images.rows[i] for i in rows]),
            )
            for a, (rows, plan) in zip(actors, plans, strict=True)
        ]
        stats: list[UpdateStats] = self._call("update", refs)
        skipped = stats[0].skipped  # decided on every rank from the same all-reduced flag
        if not skipped:
            self._version += 1
        total = max(float(sum(tokens)), 1.0)
        merged = UpdateStats(
            loss=sum(s.loss for s in stats),
            clip_frac=sum(s.clip_frac * n for s, n in zip(stats, tokens, strict=True)) / total,
            approx_kl=sum(s.approx_kl * n for s, n in zip(stats, tokens, strict=True)) / total,
            grad_norm=stats[0].grad_norm,  # the global norm, identical on every rank
            lr=stats[0].lr,
            distill_loss=sum(s.distill_loss for s in stats),
            skipped=skipped,
            optimizer_steps=stats[0].optimizer_steps,
        )
        adapter = self.export_adapter()
        return UpdateResult(stats=merged, adapter=adapter, seconds=time.perf_counter() - start)

    def export_adapter(self) -> AdapterPayload:
        """The full adapter (gathered across ranks) in PEFT's file format, as rank 0 writes it, at :attr:`version`."""
        payload = self._call("export_adapter", [a.export_adapter.remote() for a in self._live()])[0]
        assert payload is not None, "rank 0 returned no adapter"
        if payload.version != self._version:
            raise LearnerError(f"rank 0 exported version {payload.version}, the group holds {self._version}")
        return payload

    def training_state(self) -> dict[str, Any]:
        """Everything an exact resume needs (adapter, optimizer, update count, EMA, RNG), full-size, on CPU."""
        state = self._call("training_state", [a.training_state.remote() for a in self._live()])[0]
        assert state is not None, "rank 0 returned no training state"
        return state

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Every rank restores ``state`` (its own shard of it); the group then holds the saved version."""
        ref = ray.put(state)
        versions = self._call(
            "load_training_state", [a.load_training_state.remote(ref) for a in self._live()]
        )
        self._version = versions[0]

    def metrics_endpoints(self, ports: Sequence[int]) -> list[tuple[str, int]]:
        """Start every rank's metrics server on ``ports[r]`` (0: ephemeral); (node ip, port) per rank."""
        refs = [a.metrics_endpoint.remote(p) for a, p in zip(self._live(), ports, strict=True)]
        return self._call("metrics_endpoint", refs)

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The full (gathered) LoRA state in PEFT's naming."""
        return self._call("lora_state", [a.lora_state.remote() for a in self._live()])[0]

    def shutdown(self) -> None:
        """Destroy the process group on every rank, then kill the actors. Idempotent."""
        if self._closed is not None:
            return
        refs = [a.shutdown.remote() for a in self._actors]
        try:
            ray.wait(refs, num_returns=len(refs), timeout=min(self.timeout_s, 30.0))
        finally:
            self._teardown("shut down")

    def _teardown(self, reason: str) -> None:
        for actor in self._actors:
            with contextlib.suppress(Exception):  # already dead
                ray.kill(actor, no_restart=True)
        self._closed = self._closed or reason

    def __enter__(self) -> LearnerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
