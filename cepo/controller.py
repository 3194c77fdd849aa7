"""The controller: runs Algorithm 1 of the paper across the rollout, verifier, teacher and learner services.

One step (``Trainer.step``) reads like the paper:

    prompts ← data cursor
    rollouts ← rollout replicas (G per prompt, current adapter version v)
    rewards ← verifier replicas
    A ← GRPO advantages (Eq. 1); r⁻ ← answer of the lowest-reward rejected rollout per group (Alg. 1 line 4)
    log P_T⁺, log P_T⁻ ← teacher replicas          (skipped entirely when λ = 0 or the method is GRPO)
    Â_t ← CEPO (Eqs. 5, 7) or RLSD (Eq. 4) token advantages
    learner ranks: old log-probs, PPO-clip update → adapter v + 1
    one ray.put of the adapter → every replica loads it and confirms (version, checksum), or the step fails

Batches move between services as Ray object references of ``cepo_proto`` messages; no one ships logits.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cepo.config import RunConfig, dump_config
from cepo.report import problem_accuracy
from cepo_proto import AdapterAck, AdapterPayload, Problem
from cepo_proto.pipeline import GenerateRequest, Rollout, StepReport, TeacherItem, TeacherRequest
from services.learner.advantages import (
    cepo_token_advantages,
    evidence_delta,
    evidence_stats,
    evidence_weights,
    grpo_advantages,
    rlsd_token_advantages,
)
from services.learner.negatives import select_negative_answers
from services.learner.policy import DistillSpec
from services.learner.schedules import lambda_at
from services.teacher.feedback import peer_for, reference_text

__all__ = ["PIPELINE_METHODS", "SyncError", "Trainer", "split_evenly"]

PIPELINE_METHODS = ("grpo", "rlsd", "cepo", "opsd", "sdpo")
EVIDENCE_METHODS = ("cepo", "rlsd")  # scored by the teacher replicas at the sampled tokens
DISTILL_METHODS = ("opsd", "sdpo")  # the teacher's full distribution, computed on the learner ranks
STAGES = ("gen", "verify", "adv", "teacher", "old_logp", "update", "sync")


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


def _finite(values: torch.Tensor) -> list[float]:
    """JSON-safe floats: an impossible token's log-prob (−inf) becomes −1e4, NaN 0."""
    return torch.nan_to_num(values.float(), nan=0.0, neginf=-1e4, posinf=1e4).tolist()


@dataclass
class _Batch:
    """The step's rollouts, flattened: row i is rollout i, group = its prompt's index in the batch."""

    problems: list[Problem]
    prompt_texts: list[str]
    prompt_ids: list[list[int]]
    rollouts: list[Rollout] = field(default_factory=list)

    @property
    def groups(self) -> list[int]:
        return [r.prompt_index for r in self.rollouts]


class Trainer:
    """Owns the replica pools, the learner group, the data cursor, the λ schedule and the run folder."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: str | Path,
        *,
        on_step: Callable[[StepReport], None] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        if config.algorithm.method not in PIPELINE_METHODS:
            raise ValueError(
                f"algorithm.method {config.algorithm.method!r} does not run in the pipeline yet; "
                f"available: {', '.join(PIPELINE_METHODS)}"
            )
        self.cfg = config
        self.run_dir = Path(run_dir)
        self.on_step = on_step
        self.log = log
        self.step_index = 0
        self.version = -1
        self.checksum = ""
        self.teacher_version: int | None = None
        self._started = False
        self.ledger = None
        self._ledger_open = False  # a ledger record was started and not yet finished
        # the run's id in the ledger and in Prometheus target labels: name + start time, unique per run
        self.run_id = f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 10000:04d}"

    # ------------------------------------------------------------------------------------------ set-up
    def start(self) -> None:
        import ray
        from transformers import AutoTokenizer

        from cepo.data import DataCursor, from_config
        from services.learner.distributed import LearnerGroup
        from services.rollout.replica import RolloutReplica
        from services.teacher.replica import TeacherReplica
        from services.verifier.replica import VerifierReplica

        cfg = self.cfg
        # a configured but unreachable Redis is an error now, before any service starts
        self.ledger = None
        if cfg.logging.redis_url:
            from cepo.ledger import RunLedger

            self.ledger = RunLedger(cfg.logging.redis_url)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        if self.ledger is not None:
            self.ledger.start_run(
                self.run_id,
                name=cfg.name,
                method=cfg.algorithm.method,
                config=cfg.model_dump(mode="json"),
                run_dir=str(self.run_dir.resolve()),
            )
            self._ledger_open = True
        self.metrics_path = self.run_dir / "metrics.jsonl"

        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        loaded = from_config(cfg.data)
        for skipped in loaded.skipped:
            self.log(f"skipped {skipped.describe()}")
        self.cursor = DataCursor(loaded.problems, cfg.data.seed)

        if not ray.is_initialized():
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            needed = (
                (cfg.rollout.replicas + cfg.teacher.replicas) * cfg.resources.cpus_per_replica
                + cfg.verifier.replicas
                + cfg.learner.ranks * cfg.resources.cpus_per_learner_rank
            )
            ray.init(
                address=cfg.resources.ray_address,
                num_cpus=None
                if cfg.resources.ray_address
                else max(int(np.ceil(needed)), cfg.resources.num_cpus or 1),
                num_gpus=cfg.resources.num_gpus,
                include_dashboard=False,
                log_to_driver=False,
            )
        engine_kwargs = self._engine_kwargs()
        replica_options = {
            "num_cpus": cfg.resources.cpus_per_replica,
            "num_gpus": cfg.resources.gpus_per_replica,
        }
        self.rollout = {
            f"rollout-{i}": ray.remote(**replica_options)(RolloutReplica).remote(
                f"rollout-{i}", cfg.rollout.backend, cfg.model.path, **engine_kwargs(cfg.rollout.backend, i)
            )
            for i in range(cfg.rollout.replicas)
        }
        self.teacher = {}
        if cfg.algorithm.method in EVIDENCE_METHODS:
            self.teacher = {
                f"teacher-{i}": ray.remote(**replica_options)(TeacherReplica).remote(
                    f"teacher-{i}",
                    cfg.teacher.backend,
                    cfg.model.path,
                    **engine_kwargs(cfg.teacher.backend, 100 + i),
                )
                for i in range(cfg.teacher.replicas)
            }
        self.verifier = [
            ray.remote(num_cpus=1)(VerifierReplica).remote(
                f"verifier-{i}",
                format_weight=cfg.verifier.format_weight,
                timeout_s=cfg.verifier.timeout_s,
                max_chars=cfg.verifier.max_response_chars,
            )
            for i in range(cfg.verifier.replicas)
        ]
        self.learner = LearnerGroup(
            cfg.model.path,
            cfg.learner.ranks,
            policy_kwargs=self._policy_kwargs(),
            backend=cfg.learner.backend,
            cpus_per_rank=cfg.resources.cpus_per_learner_rank,
            gpus_per_rank=cfg.resources.gpus_per_learner_rank,
            timeout_s=cfg.resources.call_timeout_s,
        )
        self._started = True
        self._serve_metrics()
        # Version 0: the learner's initial adapter (LoRA B = 0, i.e. exactly the base policy), served everywhere.
        self._broadcast(0, include_teacher=cfg.teacher.source != "reference")

    def _serve_metrics(self) -> None:
        """Start every service's /metrics endpoint (``logging.metrics_port``) and list them for Prometheus."""
        from cepo import telemetry

        base = self.cfg.logging.metrics_port
        if base is None:
            return
        host, port = telemetry.endpoint(telemetry.service_port(base, "controller"))
        targets = [{"service": "controller", "host": host, "port": port, "replica": "controller"}]
        named = [
            *(("rollout", i, name, actor) for i, (name, actor) in enumerate(self.rollout.items())),
            *(("teacher", i, name, actor) for i, (name, actor) in enumerate(self.teacher.items())),
            *(("verifier", i, f"verifier-{i}", actor) for i, actor in enumerate(self.verifier)),
        ]
        refs = [actor.metrics_endpoint.remote(telemetry.service_port(base, s, i)) for s, i, _, actor in named]
        for (service, _, name, _), (h, p) in zip(named, self._call(refs), strict=True):
            targets.append({"service": service, "host": h, "port": p, "replica": name})
        ports = [telemetry.service_port(base, "learner", r) for r in range(self.cfg.learner.ranks)]
        for r, (h, p) in enumerate(self.learner.metrics_endpoints(ports)):
            targets.append({"service": "learner", "host": h, "port": p, "replica": f"rank-{r}"})
        for target in targets:
            target["run"] = self.run_id
        self.metrics_targets = targets
        telemetry.write_prometheus_targets(self.run_dir / "prometheus_targets.json", targets)

    def _engine_kwargs(self) -> Callable[[str, int], dict[str, Any]]:
        cfg = self.cfg

        def kwargs(backend: str, index: int) -> dict[str, Any]:
            if backend == "transformers":
                return {"dtype": cfg.model.dtype, "seed": cfg.seed + index}
            return {
                "dtype": cfg.model.dtype,
                "max_model_len": cfg.model.max_seq_len,
                "max_lora_rank": cfg.model.lora.rank,
                "seed": cfg.seed + index,
                "enforce_eager": cfg.rollout.enforce_eager,
                "kv_cache_gib": cfg.rollout.kv_cache_gib,
                "gpu_memory_utilization": cfg.rollout.gpu_memory_utilization,
            }

        return kwargs

    def _policy_kwargs(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "rank": cfg.model.lora.rank,
            "alpha": cfg.model.lora.alpha,
            "dropout": cfg.model.lora.dropout,
            "target_modules": tuple(cfg.model.lora.target_modules),
            "dtype": cfg.model.dtype,
            "lr": cfg.learning_rate,
            "total_steps": cfg.algorithm.steps,
            "warmup_steps": cfg.learner.warmup_steps,
            "lr_schedule": cfg.learner.lr_schedule,
            "weight_decay": cfg.learner.weight_decay,
            "betas": tuple(cfg.learner.betas),
            "grad_clip": cfg.learner.grad_clip,
            "temperature": cfg.rollout.temperature,
            "seed": cfg.seed,
        }

    # ------------------------------------------------------------------------------------------ services
    def _call(self, refs: list[Any]) -> list[Any]:
        import ray

        return ray.get(refs, timeout=self.cfg.resources.call_timeout_s)

    def _broadcast(self, version: int, *, include_teacher: bool) -> None:
        """Export the learner's adapter, put it in the object store once, and have every replica confirm it."""
        import ray

        payload: AdapterPayload = self.learner.export_adapter(version)
        ref = ray.put(payload)
        targets = dict(self.rollout)
        if include_teacher:
            targets.update(self.teacher)
        acks = self._call([actor.load_adapter.remote(ref) for actor in targets.values()])
        check_acks(acks, version, payload.checksum, list(targets))
        self.version, self.checksum, self.payload = version, payload.checksum, payload
        if include_teacher and self.teacher:
            self.teacher_version = version

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        n: int,
        temperature: float,
        top_p: float | None = None,
        top_k: int | None = None,
        presence_penalty: float = 0.0,
        max_tokens: int | None = None,
    ):
        """Spread prompts over the rollout replicas; returns, per prompt, its n rollouts."""
        cfg = self.cfg.rollout
        ranges = split_evenly(len(prompt_ids), len(self.rollout))
        actors = list(self.rollout.values())
        refs = [
            actors[i].generate.remote(
                GenerateRequest(
                    prompts=prompt_ids[a:b],
                    n=n,
                    temperature=temperature,
                    top_p=cfg.top_p if top_p is None else top_p,
                    top_k=cfg.top_k if top_k is None else top_k,
                    presence_penalty=presence_penalty,
                    max_tokens=max_tokens or cfg.max_new_tokens,
                    expected_version=self.version,
                )
            )
            for i, (a, b) in enumerate(ranges)
        ]
        groups: list[list[Rollout]] = []
        for (a, _), result in zip(ranges, self._call(refs), strict=True):
            for group in result.rollouts:
                groups.append([r.model_copy(update={"prompt_index": a + r.prompt_index}) for r in group])
        return groups

    def grade(self, texts: list[str], answers: list[str]):
        ranges = split_evenly(len(texts), len(self.verifier))
        refs = [
            self.verifier[i].grade_batch.remote(texts[a:b], answers[a:b]) for i, (a, b) in enumerate(ranges)
        ]
        return [v for part in self._call(refs) for v in part]

    def score(self, items: list[TeacherItem]) -> tuple[list[np.ndarray | None], list[np.ndarray]]:
        actors = list(self.teacher.values())
        ranges = split_evenly(len(items), len(actors))
        expected = self.teacher_version if self.cfg.teacher.source != "reference" else None
        refs = [
            actors[i].score.remote(
                TeacherRequest(
                    items=items[a:b],
                    temperature=self.cfg.rollout.temperature,
                    template=self.cfg.teacher.template,
                    expected_version=expected,
                )
            )
            for i, (a, b) in enumerate(ranges)
        ]
        pos: list[np.ndarray | None] = []
        neg: list[np.ndarray] = []
        for result in self._call(refs):
            pos.extend(result.logp_pos)
            neg.extend(result.logp_neg)
        return pos, neg

    # ------------------------------------------------------------------------------------------ one step
    def _prompts(self, problems: Sequence[Problem]) -> tuple[list[str], list[list[int]]]:
        from services.teacher.sequences import chat_prompt_ids

        texts = [self.cfg.data.prompt_template.format(problem=p.problem) for p in problems]
        return texts, [chat_prompt_ids(self.tokenizer, t) for t in texts]

    def _positive_text(
        self, row: int, batch: _Batch, group_rows: list[int], rewards: list[float], correct: list[bool]
    ) -> str:
        """r⁺ for one row (``teacher.positive``): the ground truth, or part of a correct peer's response."""
        answer = batch.problems[batch.rollouts[row].prompt_index].answer
        kind = self.cfg.teacher.positive
        if kind == "ground_truth":
            return answer
        peer = peer_for(row, group_rows, rewards, correct)
        if peer is None:
            return answer  # no correct peer besides the row itself: fall back to the ground truth
        text = reference_text(
            kind, answer=None, response_ids=batch.rollouts[peer].response_ids, tokenizer=self.tokenizer
        )
        return text or answer

    def _negative_text(self, choice: Any, batch: _Batch) -> str | None:
        """r⁻ of a group (``teacher.negative``): the rejected rollout's answer, or (part of) its response."""
        if choice is None:
            return None
        return reference_text(
            self.cfg.teacher.negative,
            answer=choice.answer,
            response_ids=batch.rollouts[choice.index].response_ids,
            tokenizer=self.tokenizer,
        )

    def _dump_tokens(
        self,
        batch: _Batch,
        verdicts: list[Any],
        seq_adv: torch.Tensor,
        old_logp: torch.Tensor,
        logp_pos: torch.Tensor | None,
        logp_neg: torch.Tensor | None,
        mask: torch.Tensor,
        negatives: dict[int, Any],
        lam: float,
    ) -> None:
        """steps/step_NNNNN.json: per-token evidence of some of the step's rollouts (``cepo inspect``)."""
        limit = self.cfg.logging.token_dump_rollouts
        if limit <= 0:
            return
        eps_w = self.cfg.algorithm.eps_w
        scored = torch.zeros(len(batch.rollouts), dtype=torch.bool) if logp_pos is None else (seq_adv != 0)
        order = [i for i in range(len(batch.rollouts)) if scored[i]]
        order += [i for i in range(len(batch.rollouts)) if not scored[i]]
        chosen = sorted(order[:limit])
        weights = {}
        if logp_pos is not None:
            delta = evidence_delta(logp_pos, logp_neg, mask)
            weights = {
                "delta": delta,
                "w_cepo": evidence_weights(seq_adv, delta, eps_w),
                "w_rlsd": evidence_weights(seq_adv, evidence_delta(logp_pos, old_logp, mask), eps_w),
            }
        rows = []
        for i in chosen:
            r = batch.rollouts[i]
            g, n = r.prompt_index, len(r.response_ids)
            choice = negatives.get(g)
            row = {
                "group": g,
                "prompt": batch.prompt_texts[g],
                "answer": batch.problems[g].answer,
                "negative": None if choice is None else choice.answer,
                "response": r.text,
                "reward": verdicts[i].reward,
                "correct": verdicts[i].correct,
                "advantage": float(seq_adv[i]),
                "scored": bool(scored[i]),
                "tokens": [self.tokenizer.decode([t]) for t in r.response_ids],
                "logp_student": _finite(old_logp[i, :n]),
            }
            for key, tensor in (("logp_pos", logp_pos), ("logp_neg", logp_neg), *weights.items()):
                row[key] = _finite(tensor[i, :n]) if tensor is not None and scored[i] else None
            rows.append(row)
        data = {
            "step": self.step_index,
            "method": self.cfg.algorithm.method,
            "lam": lam,
            "eps_w": eps_w,
            "policy_version": self.version,
            "rollouts": rows,
        }
        folder = self.run_dir / "steps"
        folder.mkdir(exist_ok=True)
        path = folder / f"step_{self.step_index:05d}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, allow_nan=False, default=float))
        tmp.replace(path)

    def step(self) -> StepReport:
        cfg, alg = self.cfg, self.cfg.algorithm
        times: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        step_start = time.perf_counter()
        lam = lambda_at(self.step_index, alg.lambda_schedule, alg.lambda0, alg.warm_steps, alg.fast_steps)

        # 1. prompts → rollouts
        t = time.perf_counter()
        problems = self.cursor.next_batch(cfg.rollout.prompts_per_step)
        texts, prompt_ids = self._prompts(problems)
        batch = _Batch(problems, texts, prompt_ids)
        groups = self.generate(prompt_ids, n=cfg.rollout.group_size, temperature=cfg.rollout.temperature)
        batch.rollouts = [r for group in groups for r in group]
        group_of = batch.groups  # rollout row → its prompt's index (the GRPO group)
        times["gen"] = time.perf_counter() - t

        # 2. verify
        t = time.perf_counter()
        verdicts = self.grade([r.text for r in batch.rollouts], [problems[g].answer for g in group_of])
        times["verify"] = time.perf_counter() - t

        # 3. GRPO advantages, r⁻ per group
        t = time.perf_counter()
        reward_list, correct = [v.reward for v in verdicts], [v.correct for v in verdicts]
        rewards = torch.tensor(reward_list, dtype=torch.float32)
        seq_adv = grpo_advantages(rewards, group_of, eps=alg.adv_eps, scale_by_std=alg.scale_adv_by_std)
        negatives = select_negative_answers(reward_list, group_of, [v.answer for v in verdicts], correct)
        lengths = [len(r.response_ids) for r in batch.rollouts]
        mask = torch.zeros(len(lengths), max(lengths))
        for row, length in enumerate(lengths):
            mask[row, :length] = 1
        times["adv"] = time.perf_counter() - t

        # 4. teacher scores (skipped entirely when λ = 0 or for GRPO) and token advantages
        stats = None
        token_adv = seq_adv.unsqueeze(1) * mask
        logp_pos = logp_neg = None
        members: dict[int, list[int]] = {}
        for i, g in enumerate(group_of):
            members.setdefault(g, []).append(i)

        def positive(i: int) -> str:  # r⁺ of row i (teacher.positive)
            return self._positive_text(i, batch, members[group_of[i]], reward_list, correct)

        if alg.method in EVIDENCE_METHODS and lam > 0:
            t = time.perf_counter()
            rows = [i for i in range(len(lengths)) if seq_adv[i] != 0]  # A = 0 → Â = 0 whatever Δ is
            items = []
            for i in rows:
                g = group_of[i]
                items.append(
                    TeacherItem(
                        student_prompt=batch.prompt_texts[g],
                        student_prompt_ids=batch.prompt_ids[g],
                        response_ids=batch.rollouts[i].response_ids,
                        positive=positive(i),
                        negative=self._negative_text(negatives[g], batch) if alg.method == "cepo" else None,
                    )
                )
            logp_pos = torch.zeros_like(mask)
            logp_neg = torch.zeros_like(mask)
            if items:
                pos, neg = self.score(items)
                for i, p, q in zip(rows, pos, neg, strict=True):
                    logp_pos[i, : lengths[i]] = torch.tensor(p)
                    logp_neg[i, : lengths[i]] = torch.tensor(q)
            times["teacher"] = time.perf_counter() - t
            t = time.perf_counter()
            # With r⁻ missing, logp_neg holds log P_S for that row: CEPO = RLSD there (Theorem 1 iii).
            fn = cepo_token_advantages if alg.method == "cepo" else rlsd_token_advantages
            token_adv = fn(seq_adv, logp_pos, logp_neg, mask, lam, alg.eps_w)
            stats = evidence_stats(
                seq_adv, logp_pos, logp_neg, mask * (seq_adv != 0).unsqueeze(1), lam, alg.eps_w
            )
            times["adv"] += time.perf_counter() - t

        # OPSD / SDPO: every row's response after the r⁺ teacher context, for the learner's no-grad teacher pass
        distill = teacher_samples = None
        if alg.method in DISTILL_METHODS:
            from services.teacher.sequences import teacher_context_ids

            distill = DistillSpec(
                alg.method,
                weight=alg.distill_weight,
                alpha=alg.sdpo_alpha,
                top_k=alg.sdpo_top_k,
                ema_decay=alg.ema_decay,
                with_pg=alg.distill_with_pg,
            )
            teacher_samples = []
            for i, r in enumerate(batch.rollouts):
                context = teacher_context_ids(
                    self.tokenizer, batch.prompt_texts[group_of[i]], positive(i), cfg.teacher.template
                )
                teacher_samples.append((context, r.response_ids))

        # 5. learner: old log-probs, PPO-clip update (+ the distillation term for OPSD / SDPO)
        samples = [(batch.prompt_ids[r.prompt_index], r.response_ids) for r in batch.rollouts]
        t = time.perf_counter()
        old_logp = self.learner.old_logprobs(samples, micro_batch_size=cfg.learner.micro_batch_size)
        times["old_logp"] = time.perf_counter() - t
        t = time.perf_counter()
        update = self.learner.update(
            samples,
            token_adv,
            old_logp,
            micro_batch_size=cfg.learner.micro_batch_size,
            clip_low=cfg.learner.clip_low,
            clip_high=cfg.learner.clip_high,
            loss_agg=cfg.learner.loss_agg,
            teacher_samples=teacher_samples,
            distill=distill,
        )
        times["update"] = time.perf_counter() - t
        self._dump_tokens(batch, verdicts, seq_adv, old_logp, logp_pos, logp_neg, mask, negatives, lam)

        # 6. adapter v + 1 to every replica, confirmed
        t = time.perf_counter()
        next_step = self.step_index + 1
        sync_teacher = cfg.teacher.source == "actor" or (
            cfg.teacher.source == "synced" and next_step % cfg.teacher.sync_every == 0
        )
        self._broadcast(self.version + 1, include_teacher=sync_teacher)
        times["sync"] = time.perf_counter() - t

        step_seconds = time.perf_counter() - step_start
        tokens = int(sum(lengths))
        accuracy = float(np.mean(correct))
        signal = {g for g, a in zip(group_of, seq_adv.tolist(), strict=True) if a != 0}
        zero_var = len(problems) - len(signal)  # groups whose rollouts all got A = 0
        report = StepReport(
            step=self.step_index,
            policy_version=self.version,
            method=alg.method,
            lam=lam,
            reward_mean=float(rewards.mean()),
            accuracy=accuracy,
            zero_variance_groups=zero_var,
            groups=len(problems),
            tokens=tokens,
            stage_seconds={k: round(v, 4) for k, v in times.items()},
            step_seconds=step_seconds,
            tokens_per_s=tokens / step_seconds,
            negatives_found=sum(1 for c in negatives.values() if c is not None),
            loss=update.loss,
            grad_norm=update.grad_norm,
            ppo_clip_frac=update.clip_frac,
            lr=update.lr,
            distill_loss=update.distill_loss,
            adapter_checksum=self.checksum,
            **(
                {
                    "delta_pos_frac": stats.delta_pos_frac,
                    "delta_neg_frac": stats.delta_neg_frac,
                    "weight_clip_frac": stats.weight_clip_frac,
                    "abs_adv_before": stats.abs_adv_before,
                    "abs_adv_after": stats.abs_adv_after,
                }
                if stats
                else {}
            ),
        )
        with self.metrics_path.open("a") as fh:
            fh.write(report.model_dump_json() + "\n")
        if self.cfg.logging.metrics_port is not None:
            from cepo import telemetry

            telemetry.observe_step(report)
        if self.ledger is not None:
            keep = self.cfg.logging.samples_per_step
            samples = [
                {
                    "prompt": batch.prompt_texts[r.prompt_index],
                    "response": r.text,
                    "answer": problems[r.prompt_index].answer,
                    "reward": v.reward,
                    "correct": v.correct,
                }
                for r, v in list(zip(batch.rollouts, verdicts, strict=True))[:keep]
            ]
            self.ledger.record_step(self.run_id, report.model_dump(mode="json"), samples)
        self.step_index = next_step
        if next_step % cfg.logging.checkpoint_every == 0:
            self.checkpoint()
        if self.on_step:
            self.on_step(report)
        return report

    def train(
        self,
        steps: int | None = None,
        *,
        every: int = 0,
        callback: Callable[[int], None] | None = None,
    ) -> list[StepReport]:
        """Run ``steps`` steps; ``callback(steps_done)`` after every ``every``-th (e.g. held-out evaluation)."""
        if not self._started:
            self.start()
        reports = []
        for _ in range(steps if steps is not None else self.cfg.algorithm.steps):
            reports.append(self.step())
            if callback is not None and every > 0 and self.step_index % every == 0:
                callback(self.step_index)
        if reports and self.step_index % self.cfg.logging.checkpoint_every != 0:
            self.checkpoint()  # the last step is always saved
        return reports

    # ------------------------------------------------------------------------------------------ outputs
    def checkpoint(self) -> Path:
        """PEFT adapter folder + controller state (step, version, λ, data cursor), written atomically."""
        final = self.run_dir / "checkpoints" / f"step_{self.step_index:05d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.payload.write_to(tmp / "adapter")
        alg = self.cfg.algorithm
        state = {
            "step": self.step_index,
            "policy_version": self.version,
            "adapter_checksum": self.checksum,
            "lambda_next": lambda_at(
                self.step_index, alg.lambda_schedule, alg.lambda0, alg.warm_steps, alg.fast_steps
            ),
            "cursor": self.cursor.state_dict(),
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        latest = self.run_dir / "adapter"
        shutil.rmtree(latest, ignore_errors=True)
        shutil.copytree(final / "adapter", latest)
        if self.ledger is not None:
            self.ledger.add_checkpoint(self.run_id, self.step_index, str(final.resolve()))
        return final

    def evaluate(
        self, problems: Sequence[Problem], *, samples: int = 1, greedy: bool = False
    ) -> dict[str, float]:
        """Held-out accuracy of the adapter the replicas serve now, with the ``eval`` sampling settings.

        Returns ``sampled`` (mean over problems of the fraction of ``samples`` correct) with its standard error
        over problems, and with ``greedy`` also the greedy (temperature 0, one sample) accuracy and error.
        """
        ev = self.cfg.eval
        _, prompt_ids = self._prompts(problems)

        def accuracy(n: int, temperature: float) -> tuple[float, float]:
            groups = self.generate(
                prompt_ids,
                n=n,
                temperature=temperature,
                top_p=ev.top_p,
                top_k=ev.top_k,
                presence_penalty=ev.presence_penalty,
                max_tokens=ev.max_new_tokens,
            )
            texts = [r.text for group in groups for r in group]
            answers = [problem.answer for problem, group in zip(problems, groups, strict=True) for _ in group]
            correct = iter(v.correct for v in self.grade(texts, answers))
            return problem_accuracy([[next(correct) for _ in group] for group in groups])

        result = {"n": len(problems), "samples": samples}
        result["sampled"], result["sampled_se"] = accuracy(samples, ev.temperature)
        if greedy:
            result["greedy"], result["greedy_se"] = accuracy(1, 0.0)
        return result

    def close(self, error: BaseException | None = None) -> None:
        """Stop every service; the ledger records how the run ended (``error``: what stopped it, if anything)."""
        import ray

        if self._ledger_open:
            self._ledger_open = False
            status = "finished" if error is None else "failed"
            if isinstance(error, KeyboardInterrupt):
                status = "interrupted"
            try:
                self.ledger.finish(
                    self.run_id, status, None if error is None else f"{type(error).__name__}: {error}"
                )
            except Exception as exc:  # the run folder still holds everything
                self.log(f"ledger: could not record the end of the run: {exc}")
        if not self._started:
            return
        for actor in [*self.rollout.values(), *self.teacher.values(), *self.verifier]:
            try:
                ray.get(actor.shutdown.remote(), timeout=60)
            except Exception as exc:  # keep closing the others
                self.log(f"shutdown failed: {exc}")
            ray.kill(actor)
        self.learner.shutdown()
        self._started = False


def median_stages(reports: Sequence[StepReport], skip: int = 1) -> dict[str, Any]:
    """Medians over steps after ``skip`` warm-up steps: step seconds, per-stage seconds and tokens/s."""
    kept = list(reports[skip:]) or list(reports)
    return {
        "step_s": statistics.median(r.step_seconds for r in kept),
        "stages": {
            "gen": statistics.median(r.stage_seconds["gen"] for r in kept),
            "verify": statistics.median(r.stage_seconds["verify"] for r in kept),
            "teacher": statistics.median(r.stage_seconds["teacher"] for r in kept),
            "adv": statistics.median(r.stage_seconds["adv"] for r in kept),
            "update": statistics.median(
                r.stage_seconds["old_logp"] + r.stage_seconds["update"] for r in kept
            ),
            "sync": statistics.median(r.stage_seconds["sync"] for r in kept),
        },
        "tokens_per_s": statistics.median(r.tokens_per_s for r in kept),
    }
