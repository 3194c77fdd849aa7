"""The controller: Algorithm 1 of the paper, run across the rollout, verifier, teacher and learner services.

``Trainer.step`` is the paper's step, one named stage per line:

    1. rollout    prompts ← data cursor; G rollouts per prompt from the replicas serving adapter v
    2. verify     rewards ← verifier replicas
    3. advantage  A ← GRPO advantages (Eq. 1); r⁻ ← answer of the lowest-reward rejected rollout (Alg. 1 line 4)
    4. teacher    log P_T⁺, log P_T⁻ ← teacher replicas, Â_t ← the method's token advantages (Eqs. 4, 5, 7);
                  skipped when λ = 0 or the method needs no scores (what a method needs: ``cepo.algorithm.methods``)
    5. update     learner: old log-probs, PPO-clip update (+ the method's learner loss) → adapter v + 1
    6. sync       one ray.put of adapter v + 1 → every replica loads it and confirms (version, checksum)

The learner assigns policy versions (0: the initial adapter, + 1 per update); every message carries the version
it was made with, and the step report records both the rollouts' version and the one the update produced.
Service calls live in :mod:`cepo.controller.pools`, the run's records in :mod:`cepo.controller.recorder`.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cepo import telemetry
from cepo.algorithm.advantages import evidence_stats, grpo_advantages
from cepo.algorithm.feedback import negative_text, positive_texts
from cepo.algorithm.methods import get_method
from cepo.algorithm.negatives import select_negative_answers
from cepo.algorithm.schedules import lambda_at
from cepo.config import RunConfig
from cepo.controller.cluster import eval_modes, train_sampling
from cepo.controller.pools import ServicePools
from cepo.controller.recorder import StepRecorder
from cepo.controller.state import StepState
from cepo_proto import AdapterPayload, Problem
from cepo_proto.learner import DistillSpec, UpdateRequest, UpdateResult, UpdateSettings
from cepo_proto.pipeline import SamplingSpec, StepReport, TeacherItem

__all__ = ["Trainer", "median_stages"]


class Trainer:
    """Owns the service pools, the data cursor, the λ schedule and the run's recorder."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: str | Path,
        *,
        on_step: Callable[[StepReport], None] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.cfg = config
        self.method = get_method(config.algorithm.method)
        self.run_dir = Path(run_dir)
        self.on_step, self.log = on_step, log
        self.step_index = 0
        self.version = -1  # the adapter version every replica serves (the learner assigns it)
        self.checksum = ""
        self.payload: AdapterPayload | None = None
        self.teacher_version: int | None = None
        self._started = False
        self.pools: ServicePools | None = None
        # the run's id in the ledger and in Prometheus target labels: name + start time, unique per run
        self.run_id = f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 10000:04d}"
        self.recorder = StepRecorder(config, self.run_dir, self.run_id, log)

    @property
    def learner(self) -> Any:
        return self.pools.learner

    # ------------------------------------------------------------------------------------------ set-up
    def start(self) -> None:
        from transformers import AutoTokenizer

        from cepo.data import DataCursor, from_config

        cfg = self.cfg
        self.recorder.open()
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        loaded = from_config(cfg.data)
        for skipped in loaded.skipped:
            self.log(f"skipped {skipped.describe()}")
        self.cursor = DataCursor(loaded.problems, cfg.data.seed)
        self.pools = ServicePools(cfg, with_teacher=self.method.scores_evidence)
        self._started = True
        base = cfg.logging.metrics_port
        if base is not None:
            endpoints = self.pools.metrics_endpoints(lambda s, i: telemetry.service_port(base, s, i))
            self.metrics_targets = self.recorder.targets(endpoints)
        # Version 0: the learner's initial adapter (LoRA B = 0, i.e. exactly the base policy), served everywhere.
        self._serve(self.learner.export_adapter(), include_teacher=cfg.teacher.source != "reference")

    def _serve(self, payload: AdapterPayload, *, include_teacher: bool) -> None:
        self.pools.broadcast(payload, include_teacher=include_teacher)
        self.version, self.checksum, self.payload = payload.version, payload.checksum, payload
        if include_teacher and self.pools.teacher:
            self.teacher_version = payload.version

    def prompts(self, problems: Sequence[Problem]) -> tuple[list[str], list[list[int]]]:
        """Student prompt texts (``data.prompt_template``) and their chat-templated token ids."""
        from cepo_services.common.templates import chat_prompt_ids

        texts = [self.cfg.data.prompt_template.format(problem=p.problem) for p in problems]
        return texts, [chat_prompt_ids(self.tokenizer, t) for t in texts]

    # ------------------------------------------------------------------------------------------ one step
    def step(self) -> StepReport:
        alg = self.cfg.algorithm
        started = time.perf_counter()
        lam = lambda_at(self.step_index, alg.lambda_schedule, alg.lambda0, alg.warm_steps, alg.fast_steps)
        s = self._rollout(lam)  # 1. prompts → G rollouts each, from adapter v
        self._verify(s)  # 2. rewards
        self._advantages(s)  # 3. A (Eq. 1) and r⁻ per group
        self._teacher(s)  # 4. log P_T⁺ / log P_T⁻ → Â_t (the method's token advantages)
        update = self._update(s)  # 5. old log-probs, PPO-clip update → adapter v + 1
        self._sync(s, update.adapter)  # 6. adapter v + 1 on every replica, confirmed
        return self._finish(s, update, time.perf_counter() - started)

    @contextlib.contextmanager
    def _timed(self, s: StepState, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            s.times[stage] += time.perf_counter() - start

    def _rollout(self, lam: float) -> StepState:
        problems = self.cursor.next_batch(self.cfg.rollout.prompts_per_step)
        s = StepState(self.step_index, lam, problems, *self.prompts(problems))
        with self._timed(s, "gen"):
            groups = self.pools.generate(s.prompt_ids, train_sampling(self.cfg), self.version)
        s.rollouts = [r for group in groups for r in group]
        return s

    def _verify(self, s: StepState) -> None:
        with self._timed(s, "verify"):
            answers = [s.problems[g].answer for g in s.groups]
            s.verdicts = self.pools.grade([r.text for r in s.rollouts], answers)

    def _advantages(self, s: StepState) -> None:
        alg = self.cfg.algorithm
        with self._timed(s, "adv"):
            rewards = torch.tensor(s.rewards, dtype=torch.float32)
            s.seq_adv = grpo_advantages(rewards, s.groups, eps=alg.adv_eps, scale_by_std=alg.scale_adv_by_std)
            answers = [v.answer for v in s.verdicts]
            s.negatives = select_negative_answers(s.rewards, s.groups, answers, s.correct)
            lengths = [len(r.response_ids) for r in s.rollouts]
            s.mask = torch.zeros(len(lengths), max(lengths))
            for row, length in enumerate(lengths):
                s.mask[row, :length] = 1
            s.token_adv = s.seq_adv.unsqueeze(1) * s.mask  # GRPO: every token gets its sequence's A

    def _positives(self, s: StepState) -> list[str]:
        """r⁺ of every row (``teacher.positive``)."""
        answers = [p.answer for p in s.problems]
        ids = [r.response_ids for r in s.rollouts]
        kind = self.cfg.teacher.positive
        return positive_texts(kind, s.groups, answers, s.rewards, s.correct, ids, self.tokenizer)

    def _teacher(self, s: StepState) -> None:
        """Score the rows whose A ≠ 0 (A = 0 gives Â = 0 whatever Δ is) and form the method's Â_t."""
        if not self.method.scores_evidence or s.lam <= 0:
            return
        cfg, alg = self.cfg, self.cfg.algorithm
        rows = [i for i in range(len(s.rollouts)) if s.seq_adv[i] != 0]
        positives, ids = self._positives(s), [r.response_ids for r in s.rollouts]
        items = [
            TeacherItem(
                student_prompt=s.prompt_texts[s.groups[i]],
                student_prompt_ids=s.prompt_ids[s.groups[i]],
                response_ids=s.rollouts[i].response_ids,
                positive=positives[i],
                negative=negative_text(cfg.teacher.negative, s.negatives[s.groups[i]], ids, self.tokenizer)
                if self.method.negative_context
                else None,  # P_T⁻ := P_S (RLSD; and CEPO's rows without a usable r⁻, Theorem 1 iii)
            )
            for i in rows
        ]
        s.logp_pos, s.logp_neg = torch.zeros_like(s.mask), torch.zeros_like(s.mask)
        with self._timed(s, "teacher"):
            if items:
                expected = self.teacher_version if cfg.teacher.source != "reference" else None
                temperature, template = cfg.rollout.temperature, cfg.teacher.template
                pos, neg = self.pools.score(
                    items, temperature=temperature, template=template, version=expected
                )
                for i, p, q in zip(rows, pos, neg, strict=True):
                    s.logp_pos[i, : len(p)] = torch.as_tensor(p)
                    s.logp_neg[i, : len(q)] = torch.as_tensor(q)
        with self._timed(s, "adv"):
            s.token_adv = self.method.token_advantages(
                s.seq_adv, s.logp_pos, s.logp_neg, s.mask, s.lam, alg.eps_w
            )
            scored = s.mask * (s.seq_adv != 0).unsqueeze(1)
            s.evidence = evidence_stats(s.seq_adv, s.logp_pos, s.logp_neg, scored, s.lam, alg.eps_w)

    def _distillation(
        self, s: StepState
    ) -> tuple[DistillSpec | None, list[tuple[list[int], list[int]]] | None]:
        """The method's learner loss and, for it, every row's response after its r⁺ teacher context."""
        if self.method.learner_loss is None:
            return None, None
        from cepo_services.common.templates import teacher_context_ids

        alg, template = self.cfg.algorithm, self.cfg.teacher.template
        spec = DistillSpec(
            self.method.learner_loss,
            weight=alg.distill_weight,
            alpha=alg.sdpo_alpha,
            top_k=alg.sdpo_top_k,
            ema_decay=alg.ema_decay,
            with_pg=alg.distill_with_pg,
        )
        texts = [s.prompt_texts[g] for g in s.groups]
        contexts = [
            teacher_context_ids(self.tokenizer, t, p, template)
            for t, p in zip(texts, self._positives(s), strict=True)
        ]
        return spec, [(c, r.response_ids) for c, r in zip(contexts, s.rollouts, strict=True)]

    def _update(self, s: StepState) -> UpdateResult:
        lc = self.cfg.learner
        samples = [(s.prompt_ids[r.prompt_index], r.response_ids) for r in s.rollouts]
        with self._timed(s, "old_logp"):
            s.old_logp = self.learner.old_logprobs(samples, micro_batch_size=lc.micro_batch_size)
        distill, teacher_samples = self._distillation(s)
        settings = UpdateSettings(
            micro_batch_size=lc.micro_batch_size,
            clip_low=lc.clip_low,
            clip_high=lc.clip_high,
            loss_agg=lc.loss_agg,
        )
        request = UpdateRequest(
            samples=samples,
            advantages=s.token_adv,
            old_logp=s.old_logp,
            settings=settings,
            distill=distill,
            teacher_samples=teacher_samples,
        )
        with self._timed(s, "update"):
            return self.learner.update(request)

    def _sync(self, s: StepState, adapter: AdapterPayload) -> None:
        source, after = self.cfg.teacher.source, s.index + 1
        with_teacher = source == "actor" or (source == "synced" and after % self.cfg.teacher.sync_every == 0)
        with self._timed(s, "sync"):
            self._serve(adapter, include_teacher=with_teacher)

    def _finish(self, s: StepState, update: UpdateResult, seconds: float) -> StepReport:
        """The step's report, recorded everywhere; checkpoint every ``logging.checkpoint_every`` steps."""
        stats, ev = update.stats, s.evidence
        tokens = int(s.mask.sum())
        report = StepReport(
            step=s.index,
            policy_version=update.adapter.version - 1,
            adapter_version=update.adapter.version,
            method=self.method.name,
            lam=s.lam,
            reward_mean=float(np.mean(s.rewards)),
            accuracy=float(np.mean(s.correct)),
            zero_variance_groups=len(s.problems)
            - len({g for g, a in zip(s.groups, s.seq_adv.tolist(), strict=True) if a != 0}),
            groups=len(s.problems),
            tokens=tokens,
            stage_seconds={k: round(v, 4) for k, v in s.times.items()},
            step_seconds=seconds,
            tokens_per_s=tokens / seconds,
            negatives_found=sum(1 for c in s.negatives.values() if c is not None),
            loss=stats.loss,
            grad_norm=stats.grad_norm,
            ppo_clip_frac=stats.clip_frac,
            lr=stats.lr,
            distill_loss=stats.distill_loss,
            adapter_checksum=update.adapter.checksum,
            **({} if ev is None else {k: getattr(ev, k) for k in EVIDENCE_FIELDS}),
        )
        self.recorder.dump_tokens(s, report.policy_version, self.tokenizer)
        keep = self.cfg.logging.samples_per_step
        samples = [
            {
                "prompt": s.prompt_texts[r.prompt_index],
                "response": r.text,
                "answer": s.problems[r.prompt_index].answer,
            }
            | {"reward": v.reward, "correct": v.correct}
            for r, v in list(zip(s.rollouts, s.verdicts, strict=True))[:keep]
        ]
        self.recorder.record(report, samples)
        self.step_index = s.index + 1
        if self.step_index % self.cfg.logging.checkpoint_every == 0:
            self.checkpoint()
        if self.on_step:
            self.on_step(report)
        return report

    # ------------------------------------------------------------------------------------------ runs
    def train(
        self, steps: int | None = None, *, every: int = 0, callback: Callable[[int], None] | None = None
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

    def checkpoint(self) -> Path:
        """The adapter every replica serves + controller state (step, next λ, data cursor)."""
        alg = self.cfg.algorithm
        lam = lambda_at(self.step_index, alg.lambda_schedule, alg.lambda0, alg.warm_steps, alg.fast_steps)
        state = {"lambda_next": lam, "cursor": self.cursor.state_dict()}
        return self.recorder.checkpoint(self.step_index, self.payload, state)

    def evaluate(
        self, problems: Sequence[Problem], *, samples: int = 1, greedy: bool = False
    ) -> dict[str, float]:
        """Held-out accuracy of the adapter the replicas serve now, with the ``eval`` sampling settings.

        Returns ``sampled`` (mean over problems of the fraction of ``samples`` correct) with its standard error
        over problems, and with ``greedy`` also the greedy (temperature 0, one sample) accuracy and error.
        """
        from cepo.evaluate import heldout_accuracy

        def generate(ids: list[list[int]], spec: SamplingSpec) -> list[list[str]]:
            return [[r.text for r in group] for group in self.pools.generate(ids, spec, self.version)]

        modes = eval_modes(self.cfg, greedy=greedy)
        modes[0] = ("sampled", modes[0][1].model_copy(update={"n": samples}))
        return heldout_accuracy(problems, self.prompts(problems)[1], modes, generate, self.pools.grade)

    def close(self, error: BaseException | None = None) -> None:
        """Stop every service; the ledger records how the run ended (``error``: what stopped it, if anything)."""
        self.recorder.finish(error)
        if self._started:
            self.pools.close(self.log)
            self._started = False


EVIDENCE_FIELDS = ("delta_pos_frac", "delta_neg_frac", "weight_clip_frac", "abs_adv_before", "abs_adv_after")


def median_stages(reports: Sequence[StepReport], skip: int = 1) -> dict[str, Any]:
    """Medians over steps after ``skip`` warm-up steps: step seconds, per-stage seconds and tokens/s."""
    kept = list(reports[skip:]) or list(reports)

    def median(*stages: str) -> float:
        return statistics.median(sum(r.stage_seconds[st] for st in stages) for r in kept)

    return {
        "step_s": statistics.median(r.step_seconds for r in kept),
        "stages": {
            "gen": median("gen"),
            "verify": median("verify"),
            "teacher": median("teacher"),
            "adv": median("adv"),
            "update": median("old_logp", "update"),
            "sync": median("sync"),
        },
        "tokens_per_s": statistics.median(r.tokens_per_s for r in kept),
    }
