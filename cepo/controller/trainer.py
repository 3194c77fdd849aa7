"""The controller: Algorithm 1 of the paper, run across the rollout, verifier, teacher and learner services.

``Trainer.step`` is the paper's step, one named stage per line:

    1. rollout    prompts ← data cursor; G rollouts per prompt from the replicas serving adapter v
    2. verify     rewards ← verifier replicas
    3. advantage  A ← GRPO advantages (Eq. 1); r⁻ ← answer of the lowest-reward rejected rollout (Alg. 1 line 4)
    4. teacher    log P_T⁺, log P_T⁻ ← teacher replicas, Â_t ← the method's token advantages (Eqs. 4, 5, 7);
                  skipped when λ = 0 or the method needs no scores (what a method needs: ``cepo.algorithm.methods``)
    5. update     learner: PPO-clip update (+ the method's learner loss) → adapter v + 1, on the old log-probs the
                  learner computed beside stages 2–4 (its pass starts as soon as the rollouts are in)
    6. sync       one ray.put of adapter v + 1 → every replica loads it and confirms (version, checksum)

With ``algorithm.max_staleness: 1`` (one-step-off asynchronous), stage 1 of step t + 1 — drawing its prompts and
generating from adapter v — starts right after step t's rollouts are in and runs beside stages 2–5 of step t;
the rollout replicas load v + 1 once it is done. Step t + 1 then trains on rollouts of version v with the learner
at v + 1: the teacher scores them under v (their own version, so "teacher = actor" holds), and each token's
advantage carries a truncated importance weight against the engine's sampling log-prob
(:mod:`cepo.algorithm.staleness`).

With ``rollout.stream_groups: k`` (streaming), stages 2–4 run chunk by chunk while stage 1 goes on: every k groups
that finish generating are graded, get their A and r⁻, and their rows with A ≠ 0 are scored by the teacher. Each
of these stages is local to a group (A is a group's statistic, r⁻ comes from the row's own group), so a chunk is
computed as the batch would compute it; the chunks are put back in prompt order, A recomputed over the batch and
Â_t formed there, exactly as the barrier path does (tests/test_streaming.py holds the two against each other).

The learner assigns policy versions (0: the initial adapter, + 1 per update); every message carries the version
it was made with, and the step report records both the rollouts' version and the one the update produced.
Service calls live in :mod:`cepo.controller.pools`, the run's records in :mod:`cepo.controller.recorder`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cepo import telemetry
from cepo.algorithm.advantages import evidence_stats, grpo_advantages
from cepo.algorithm.feedback import negative_text, positive_texts
from cepo.algorithm.methods import get_method
from cepo.algorithm.negatives import row_negatives, select_negative_answers
from cepo.algorithm.schedules import lambda_at
from cepo.algorithm.staleness import importance_stats, truncated_is_weights
from cepo.config import RunConfig, check_model_path
from cepo.controller.cluster import distill_spec, eval_modes, start_ray, train_sampling, update_settings
from cepo.controller.pools import ServicePools
from cepo.controller.recorder import StepRecorder
from cepo.controller.state import StepState
from cepo_proto import AdapterPayload, Problem
from cepo_proto.learner import DistillSpec, UpdateRequest, UpdateResult, UpdateStats
from cepo_proto.pipeline import ImageBatch, ImageRefs, SamplingSpec, StepReport, TeacherItem

__all__ = ["PoisonedRun", "RunInterrupted", "Trainer"]


class PoisonedRun(RuntimeError):
    """Too many updates in a row were skipped as non-finite."""


class RunInterrupted(KeyboardInterrupt):
    """The run stopped on request (a signal) after a finished, checkpointed step."""


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
        self.teacher_payload: AdapterPayload | None = None  # what the teacher replicas serve (None: base)
        self._started = False
        self._stop = threading.Event()
        # the learner's old log-probs beside stages 2–4; the next step's generation beside stages 2–5 (async)
        self._beside = ThreadPoolExecutor(1, thread_name_prefix="old-logp")
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix="rollout-ahead")
        # streamed chunks' stages 2–4, side by side (each mostly waits on its verifier and teacher calls)
        self._chunks = ThreadPoolExecutor(4, thread_name_prefix="stream-chunk")
        self._host = threading.Lock()  # the tokenizer, used by chunk threads to build teacher contexts
        self._next: tuple[StepState, Future] | None = None  # the next step's rollouts, generating (async)
        self._cursor_before_next: dict[str, Any] | None = None  # the data cursor before they were drawn
        # the last two adapters by version: an actor teacher lags the rollout replicas by one in async mode
        self._payloads: dict[int, AdapterPayload] = {}
        # the run's last step index: no rollouts are generated ahead past it (train() sets it; a caller that
        # loops over step() itself should too, or the last step generates one batch nobody trains on)
        self.last_step: int | None = None
        self._skipped_in_row = 0
        self.pools: ServicePools | None = None
        # the run's id in the ledger and in Prometheus target labels: name + start time, unique per run
        self.run_id = f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 10000:04d}"
        self.recorder = StepRecorder(config, self.run_dir, self.run_id, log)

    @property
    def learner(self) -> Any:
        return self.pools.learner

    # ------------------------------------------------------------------------------------------ set-up
    @property
    def teacher_version(self) -> int | None:
        return None if self.teacher_payload is None else self.teacher_payload.version

    def start(self, *, resume: bool = False, overwrite: bool = False) -> None:
        """Start every service; with ``resume`` continue the run in ``run_dir`` from its latest checkpoint."""
        from transformers import AutoTokenizer

        from cepo.controller.recorder import load_checkpoint
        from cepo.data import DataCursor, from_config

        cfg = self.cfg
        check_model_path(cfg.model.path, hub=True)  # a missing model (or an unreachable Hub) fails now, once
        checkpoint = load_checkpoint(self.run_dir) if resume else None  # a damaged one fails before anything
        if checkpoint is not None:
            self.run_id = self.recorder.run_id = checkpoint.state.get("run_id", self.run_id)
        resume_step = None if checkpoint is None else checkpoint.state["step"]
        self.recorder.open(resume_step=resume_step, overwrite=overwrite)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        loaded = from_config(cfg.data)
        for skipped in loaded.skipped:
            self.log(f"skipped {skipped.describe()}")
        self._vision_setup(loaded.problems)
        self.cursor = DataCursor(loaded.problems, cfg.data.seed)
        self._probe_problem = loaded.problems[0]
        start_ray(cfg, log_dir=self.run_dir / "logs")  # the services' engine logs go to the run folder
        self.pools = ServicePools(cfg, with_teacher=self.method.scores_evidence)
        self._started = True
        base = cfg.logging.metrics_port
        if base is not None:
            endpoints = self.pools.metrics_endpoints(lambda s, i: telemetry.service_port(base, s, i))
            self.metrics_targets = self.recorder.targets(endpoints)
        if checkpoint is not None:
            self._restore(checkpoint)
        else:  # version 0: the learner's initial adapter (LoRA B = 0, exactly the base policy), served everywhere
            self._serve(self.learner.export_adapter(), include_teacher=cfg.teacher_source != "reference")

    def _serve(self, payload: AdapterPayload, *, include_teacher: bool) -> None:
        self.pools.broadcast(payload, teacher=include_teacher)
        self.version, self.checksum, self.payload = payload.version, payload.checksum, payload
        self._payloads = {v: p for v, p in self._payloads.items() if v >= payload.version - 1}
        self._payloads[payload.version] = payload
        if include_teacher and self.pools.teacher:
            self.teacher_payload = payload

    def _restore(self, checkpoint: Any) -> None:
        """The learner's training state, the adapters the replicas served, the data cursor and the step."""
        from cepo.controller.recorder import CheckpointError

        self.learner.load_training_state(checkpoint.learner_state())
        payload = self.learner.export_adapter()
        if payload.checksum != checkpoint.state["adapter_checksum"]:
            raise CheckpointError(
                f"{checkpoint.path}: the restored learner does not reproduce the saved adapter"
            )
        source = self.cfg.teacher_source
        teacher = (
            checkpoint.adapter("teacher_adapter")
            if checkpoint.state.get("teacher_version") is not None
            else None
        )
        self._serve(payload, include_teacher=source != "reference" and teacher is None)
        if teacher is not None:
            self.pools.broadcast(teacher, rollout=False, teacher=True)
            self.teacher_payload = teacher
        self.cursor.load_state_dict(checkpoint.state["cursor"])
        self.step_index = int(checkpoint.state["step"])
        self.recorder.rewind(self.step_index)
        self.log(f"resumed {self.run_id} at step {self.step_index} (adapter version {self.version})")

    # ------------------------------------------------------------------------------------------ images
    def _vision_setup(self, problems: Sequence[Problem]) -> None:
        """A VL policy's image settings; image problems for a text-only model, or images that do not decode,
        are one error naming the problem — before any service starts."""
        from cepo_services.common import vision

        self.vision = None
        self._images: dict[str, list] = {}  # problem id → its prepared images (decoded and resized once)
        if vision.is_vision_language(self.cfg.model.path):
            self.vision = vision.vision_spec(self.cfg.model.path)
        self.check_images(problems)

    def check_images(self, problems: Sequence[Problem]) -> None:
        """Every problem's images are usable by the policy: a text-only model takes none, each decodes."""
        if self.vision is None:
            bad = next((p for p in problems if p.images), None)
            if bad is not None:
                raise ValueError(
                    f"problem {bad.id} has {len(bad.images)} image(s) but model.path {self.cfg.model.path} is a "
                    "text-only model (no vision_config): use a vision-language model (Qwen2-VL, Qwen2.5-VL, "
                    "Qwen3-VL) or text problems"
                )
            return
        for p in problems:
            self._problem_images(p)

    def _problem_images(self, problem: Problem) -> list:
        from cepo_services.common.vision import IMAGE_PLACEHOLDER, prepare_image

        if problem.id not in self._images:
            count = problem.problem.count(IMAGE_PLACEHOLDER)
            if count != len(problem.images):
                raise ValueError(
                    f"problem {problem.id}: {count} {IMAGE_PLACEHOLDER} placeholder(s) but "
                    f"{len(problem.images)} image(s)"
                )
            self._images[problem.id] = [
                prepare_image(src, self.vision, where=f"problem {problem.id}, image {k}")
                for k, src in enumerate(problem.images)
            ]
        return self._images[problem.id]

    def image_refs(self, problems: Sequence[Problem]) -> tuple[ImageRefs | None, int, int]:
        """One object-store batch of the problems' prepared images, and per problem the indices of its own;
        (None, 0, 0) without images. Returns (refs, bytes put, image count)."""
        if self.vision is None or not any(p.images for p in problems):
            return None, 0, 0
        import ray

        arrays, rows = [], []
        for p in problems:
            images = self._problem_images(p)
            rows.append(list(range(len(arrays), len(arrays) + len(images))))
            arrays.extend(images)
        batch = ImageBatch(arrays=arrays)
        return ImageRefs(batch=ray.put(batch), rows=rows), batch.nbytes, len(arrays)

    def prompts(self, problems: Sequence[Problem]) -> tuple[list[str], list[list[int]]]:
        """Student prompt texts (``data.prompt_template``) and their chat-templated token ids. For a VL policy
        each ``<image>`` becomes Qwen-VL's image markup, and the ids carry its image tokens expanded."""
        from cepo_services.common.templates import chat_prompt_ids, image_prompt_text

        texts = [self.cfg.data.prompt_template.format(problem=p.problem) for p in problems]
        if getattr(self, "vision", None) is None:
            return texts, [chat_prompt_ids(self.tokenizer, t) for t in texts]
        from cepo_services.common.vision import expand_image_tokens

        texts = [image_prompt_text(t) for t in texts]
        ids = [
            expand_image_tokens(
                chat_prompt_ids(self.tokenizer, t), self._problem_images(p) if p.images else [], self.vision
            )
            for t, p in zip(texts, problems, strict=True)
        ]
        return texts, ids

    # ------------------------------------------------------------------------------------------ one step
    def step(self) -> StepReport:
        started, restarts = time.perf_counter(), dict(self.pools.restarts)
        failed = self._probe()
        # 1. prompts → G rollouts each, from adapter v (async: generated during the last step)
        s = self._rollout()
        s.probe_failures = len(failed)
        self._generate_ahead()  # async: the next step's rollouts, from adapter v, beside stages 2–5
        old = self._beside.submit(self._old_logprobs, s)  # the learner's old log-probs, beside stages 2–4
        try:
            if s.chunks is None:
                self._verify(s)  # 2. rewards
                self._advantages(s)  # 3. A (Eq. 1) and r⁻ per group
                self._teacher(s)  # 4. log P_T⁺ / log P_T⁻ → Â_t (the method's token advantages)
            else:  # streamed: stages 2–4 ran chunk by chunk during stage 1
                self._join_chunks(s)
        finally:
            self._await(s, old)  # the learner is idle again before anything else happens (on an error too)
        old.result()  # the learner's own error, if its pass failed
        update = self._update(s)  # 5. PPO-clip update → adapter v + 1
        self._sync(s, update.adapter)  # 6. adapter v + 1 on every replica, confirmed
        s.restarts = {
            role: n - restarts[role] for role, n in self.pools.restarts.items() if n > restarts[role]
        }
        return self._finish(s, update, time.perf_counter() - started)

    @contextlib.contextmanager
    def _timed(self, s: StepState, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            s.times[stage] += time.perf_counter() - start

    def _draw(self, index: int) -> StepState:
        """Step ``index``'s prompts from the data cursor, to be generated from the adapter served now."""
        alg = self.cfg.algorithm
        lam = lambda_at(index, alg.lambda_schedule, alg.lambda0, alg.warm_steps, alg.fast_steps)
        problems = self.cursor.next_batch(self.cfg.rollout.prompts_per_step)
        s = StepState(index, lam, self.version, problems, *self.prompts(problems))
        s.images, s.image_bytes, s.image_count = self.image_refs(problems)
        return s

    def _generate(self, s: StepState) -> StepState:
        with self._timed(s, "gen"):
            groups = self.pools.generate(
                s.prompt_ids, train_sampling(self.cfg, s.index), s.version, images=s.images
            )
        s.rollouts = [r for group in groups for r in group]
        return s

    def _rollout(self) -> StepState:
        """This step's rollouts: generated during the last step (async), else now (streamed: with stages 2–4
        of the groups that finish first already under way)."""
        if self._next is None:
            s = self._draw(self.step_index)
            return self._generate_streamed(s) if self.cfg.rollout.stream_groups else self._generate(s)
        s, future = self._next
        self._next = self._cursor_before_next = None
        future.result()  # done: the last step's sync waited for it
        s.overlap += s.times["gen"]  # all of it ran during the last step (whose sync counts any wait)
        return s

    def _generate_streamed(self, s: StepState) -> StepState:
        """Stage 1, handing every ``rollout.stream_groups`` finished groups to stages 2–4 (``_chunk``, in the
        chunk threads) as they arrive; returns once every group is in, the chunks still running (``s.chunks``)."""
        k = self.cfg.rollout.stream_groups
        self._teacher_ready(s)
        s.chunks, s.stream_started = [], time.perf_counter()
        arrived: dict[int, list] = {}
        pending: list[list] = []
        try:
            with self._timed(s, "gen"):
                stream = self.pools.generate_stream(
                    s.prompt_ids, train_sampling(self.cfg, s.index), s.version, images=s.images
                )
                for groups in stream:
                    for group in groups:
                        arrived[group[0].prompt_index] = group
                    pending.extend(groups)
                    while len(pending) >= k or (pending and len(arrived) == len(s.prompt_ids)):
                        s.chunks.append(self._chunks.submit(self._chunk, s, pending[:k]))
                        pending = pending[k:]
        except BaseException:
            wait(s.chunks)  # nothing keeps running for a step that failed
            raise
        s.rollouts = [r for g in sorted(arrived) for r in arrived[g]]
        return s

    def _chunk(self, s: StepState, groups: list[list]) -> tuple[list[int], StepState]:
        """Stages 2–4 (up to the teacher's scores) for some of the step's groups, as a step of its own: the
        groups' prompt indices (ascending) and their StepState, whose group g is prompt ``indices[g]``."""
        indices = sorted(group[0].prompt_index for group in groups)
        local = {g: j for j, g in enumerate(indices)}
        by_prompt = {group[0].prompt_index: group for group in groups}
        part = StepState(
            s.index,
            s.lam,
            s.version,
            [s.problems[g] for g in indices],
            [s.prompt_texts[g] for g in indices],
            [s.prompt_ids[g] for g in indices],
        )
        part.images = None if s.images is None else s.images.take(indices)
        part.teacher_version = s.teacher_version
        part.rollouts = [
            r.model_copy(update={"prompt_index": local[g]}) for g in indices for r in by_prompt[g]
        ]
        self._verify(part)
        self._advantages(part)
        self._score(part)
        return indices, part

    def _join_chunks(self, s: StepState) -> None:
        """The streamed chunks, back in prompt order: verdicts and teacher scores row by row, A and r⁻ recomputed
        over the batch (the same per group), Â_t formed over the batch; stage seconds are the chunks' sums, and
        what ran beside generation or beside another chunk counts as overlap."""
        parts = [future.result() for future in s.chunks]
        first: dict[
            int, int
        ] = {}  # prompt index → its group's first row in s.rollouts (groups are contiguous)
        for row, r in enumerate(s.rollouts):
            first.setdefault(r.prompt_index, row)
        rows: list[list[int]] = []  # per chunk: the row in s.rollouts of each of its rows
        for indices, part in parts:
            sizes = np.bincount(part.groups, minlength=len(indices))
            rows.append(
                [first[g] + k for g, n in zip(indices, sizes.tolist(), strict=True) for k in range(n)]
            )
        verdicts: list = [None] * len(s.rollouts)
        for (_, part), where in zip(parts, rows, strict=True):
            for j, row in enumerate(where):
                verdicts[row] = part.verdicts[j]
            for stage in ("verify", "adv", "teacher"):
                s.times[stage] += part.times[stage]
            s.teacher_unfit += part.teacher_unfit
        s.verdicts = verdicts
        self._advantages(s)
        if self._scores(s):
            s.logp_pos, s.logp_neg = torch.zeros_like(s.mask), torch.zeros_like(s.mask)
            for (_, part), where in zip(parts, rows, strict=True):
                width = part.mask.shape[1]
                s.logp_pos[where, :width] = part.logp_pos
                s.logp_neg[where, :width] = part.logp_neg
            self._token_advantages(s)
        ran = s.times["gen"] + sum(part.times[k] for _, part in parts for k in ("verify", "adv", "teacher"))
        s.overlap += max(0.0, ran - (time.perf_counter() - s.stream_started))
        s.stream_chunks = len(parts)

    def _generate_ahead(self) -> None:
        """With ``max_staleness`` ≥ 1: draw the next step's prompts and generate them beside this step."""
        index = self.step_index + 1
        if self.cfg.algorithm.max_staleness < 1 or (self.last_step is not None and index > self.last_step):
            return
        self._cursor_before_next = self.cursor.state_dict()
        s = self._draw(index)
        self._next = (s, self._ahead.submit(self._generate, s))

    def _generation_done(self) -> None:
        """The rollout replicas are idle: the generation ahead (if any) has finished (or failed: raised here)."""
        if self._next is not None:
            self._next[1].result()

    def _probe(self) -> list[str]:
        """Every ``resources.probe_every`` steps: each replica must reproduce the learner's log-probs of a fixed
        sequence (a problem's prompt and its boxed answer) with the adapter it says it serves."""
        res = self.cfg.resources
        backends = {self.cfg.engine_backend("rollout"), self.cfg.engine_backend("teacher")}
        if not res.probe_every or self.step_index % res.probe_every:
            return []
        if backends != {"transformers"} and self.cfg.rollout.temperature != 1.0:
            return []  # vLLM scores at temperature 1 only
        problem = self._probe_problem
        if problem.images:  # the probe is a text sequence (a VL model scores text too)
            from cepo_services.common.vision import IMAGE_PLACEHOLDER

            text = problem.problem.replace(IMAGE_PLACEHOLDER, "").strip() or "?"
            problem = problem.model_copy(update={"problem": text, "images": []})
        prompt = self.prompts([problem])[1][0]
        response = self.tokenizer.encode(f"\\boxed{{{problem.answer}}}", add_special_tokens=False)
        expected = self.learner.old_logprobs([(prompt, response)])[0, : len(response)].numpy()
        t, atol = self.cfg.rollout.temperature, res.probe_atol
        failed = self.pools.probe([([*prompt, *response], len(prompt))], [expected], temperature=t, atol=atol)
        if failed:
            self.log(
                f"step {self.step_index + 1}: {failed} did not reproduce the learner's log-probs: reloaded"
            )
        return failed

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
            scope = self.cfg.teacher.negative_scope
            s.row_negatives = row_negatives(scope, s.negatives, s.groups, answers, s.correct)
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

    def _scores(self, s: StepState) -> bool:
        """Whether the step's method scores tokens with the teacher (λ > 0 and a method that needs it)."""
        return self.method.scores_evidence and s.lam > 0

    def _teacher_ready(self, s: StepState) -> None:
        """The teacher replicas serve the version that scores these rollouts."""
        if not self._scores(s):
            return
        if self.cfg.teacher_source == "actor" and self.teacher_version != s.version:
            # async: the rollouts are a version behind the rollout replicas; the teacher scores under theirs
            with self._timed(s, "sync"):
                payload = self._payloads[s.version]
                self.pools.broadcast(payload, rollout=False, teacher=True)
                self.teacher_payload = payload
        s.teacher_version = self.teacher_version

    def _teacher(self, s: StepState) -> None:
        """Score the rows whose A ≠ 0 (A = 0 gives Â = 0 whatever Δ is) and form the method's Â_t."""
        if not self._scores(s):
            return
        self._teacher_ready(s)
        self._score(s)
        self._token_advantages(s)

    def _score(self, s: StepState) -> None:
        """log P_T⁺ and log P_T⁻ of every row whose A ≠ 0 (zeros elsewhere, and for rows too long to score)."""
        if not self._scores(s):
            return
        cfg = self.cfg
        rows = [i for i in range(len(s.rollouts)) if s.seq_adv[i] != 0]
        with self._host:
            positives, ids = self._positives(s), [r.response_ids for r in s.rollouts]
            items = [
                TeacherItem(
                    student_prompt=s.prompt_texts[s.groups[i]],
                    student_prompt_ids=s.prompt_ids[s.groups[i]],
                    response_ids=s.rollouts[i].response_ids,
                    positive=positives[i],
                    negative=negative_text(cfg.teacher.negative, s.row_negatives[i], ids, self.tokenizer)
                    if self.method.negative_context
                    else None,  # P_T⁻ := P_S (RLSD; and CEPO's rows without a usable r⁻, Theorem 1 iii)
                )
                for i in rows
            ]
        s.logp_pos, s.logp_neg = torch.zeros_like(s.mask), torch.zeros_like(s.mask)
        with self._timed(s, "teacher"):
            if items:
                expected = self.teacher_version if cfg.teacher_source != "reference" else None
                temperature, template = cfg.rollout.temperature, cfg.teacher.template
                images = None if s.images is None else s.images.take([s.groups[i] for i in rows])
                pos, neg, unfit = self.pools.score(
                    items,
                    temperature=temperature,
                    template=template,
                    version=expected,
                    images=images,
                    sees_image=cfg.teacher.sees_image,
                )
                s.teacher_unfit = len(unfit)  # their scores stay 0 = 0: Δ = 0, the row keeps A
                for i, p, q in zip(rows, pos, neg, strict=True):
                    s.logp_pos[i, : len(p)] = torch.tensor(p)
                    s.logp_neg[i, : len(q)] = torch.tensor(q)

    def _token_advantages(self, s: StepState) -> None:
        """The method's Â_t from A and the teacher's scores, and the step's evidence statistics."""
        alg = self.cfg.algorithm
        with self._timed(s, "adv"):
            s.token_adv = self.method.token_advantages(
                s.seq_adv, s.logp_pos, s.logp_neg, s.mask, s.lam, alg.eps_w
            )
            scored = s.mask * (s.seq_adv != 0).unsqueeze(1)
            s.evidence = evidence_stats(s.seq_adv, s.logp_pos, s.logp_neg, scored, s.lam, alg.eps_w)

    def _distillation(
        self, s: StepState
    ) -> tuple[DistillSpec | None, list[tuple[list[int], list[int]]] | None]:
        """The method's learner loss and, for it, every row's response after its r⁺ teacher context.

        An image problem's context holds its images, their tokens expanded as in the student prompt
        (``teacher.sees_image``; false: the text without them, the official code's blind teacher). The learner
        gives a context the images of its row (``UpdateRequest.images``) when it has image tokens, none when not.
        """
        if self.method.learner_loss is None:
            return None, None
        from cepo_services.common.templates import image_teacher_context

        template, sees_image = self.cfg.teacher.template, self.cfg.teacher.sees_image
        vision = getattr(self, "vision", None)
        contexts = []
        for g, positive in zip(s.groups, self._positives(s), strict=True):
            problem = s.problems[g]
            images = self._problem_images(problem) if vision is not None and problem.images else []
            ids, _ = image_teacher_context(
                self.tokenizer, s.prompt_texts[g], positive, template, images, vision, sees_image=sees_image
            )
            contexts.append(ids)
        samples = [(c, r.response_ids) for c, r in zip(contexts, s.rollouts, strict=True)]
        return distill_spec(self.cfg, self.method.learner_loss), samples

    @staticmethod
    def _learner_inputs(s: StepState) -> tuple[list[tuple[list[int], list[int]]], ImageRefs | None]:
        """Every rollout as the learner takes it: (prompt ids, response ids), and its images (a VL policy)."""
        samples = [(s.prompt_ids[r.prompt_index], r.response_ids) for r in s.rollouts]
        images = None if s.images is None else s.images.take([r.prompt_index for r in s.rollouts])
        return samples, images

    def _old_logprobs(self, s: StepState) -> tuple[torch.Tensor, float, float]:
        """The learner's log-probs of the rollouts under adapter v (runs beside stages 2–4); with its start and
        end times."""
        samples, images = self._learner_inputs(s)
        start = time.perf_counter()
        old = self.learner.old_logprobs(
            samples, micro_batch_size=self.cfg.learner.micro_batch_size, images=images
        )
        return old, start, time.perf_counter()

    def _await(self, s: StepState, old: Future) -> None:
        """Wait for the old log-probs; the stage records the pass's own seconds, ``overlap`` the part of them
        that stages 2–4 hid (the step's critical path is shorter by that much)."""
        waiting = time.perf_counter()
        wait([old])
        if old.exception() is None:
            s.old_logp, start, end = old.result()
            s.times["old_logp"] += end - start
            s.overlap += (end - start) - max(0.0, end - waiting)

    def _update(self, s: StepState) -> UpdateResult:
        """One PPO-clip update → adapter v + 1; a poisoned batch (non-finite advantages, or a non-finite loss or
        gradient norm on the learner) is skipped: weights and version stay v."""
        samples, images = self._learner_inputs(s)
        self._importance(s)
        bad = sorted({int(i) for i in (~torch.isfinite(s.token_adv)).nonzero()[:, 0].tolist()})
        if bad:
            self.log(f"step {s.index + 1}: non-finite advantages in rows {bad[:20]}: update skipped")
            nan = float("nan")
            return UpdateResult(
                stats=UpdateStats(nan, nan, nan, nan, nan, skipped=True), adapter=self.payload, seconds=0.0
            )
        distill, teacher_samples = self._distillation(s)
        request = UpdateRequest(
            samples=samples,
            advantages=s.token_adv,
            old_logp=s.old_logp,
            settings=update_settings(self.cfg),
            distill=distill,
            teacher_samples=teacher_samples,
            images=images,
        )
        with self._timed(s, "update"):
            result = self.learner.update(request)
        if result.stats.skipped:
            self.log(f"step {s.index + 1}: non-finite loss or gradient norm on the learner: update skipped")
        return result

    def _importance(self, s: StepState) -> None:
        """Rows generated from an older adapter than the learner's (async): Â_t ← ρ_t · Â_t, ρ the truncated
        importance weight of the learner's old log-prob against the engine's sampling log-prob."""
        s.staleness = self.learner.version - s.version
        stale = torch.tensor([self.learner.version > s.version] * len(s.rollouts))
        behaviour = torch.zeros_like(s.old_logp)
        for row, r in enumerate(s.rollouts):
            behaviour[row, : len(r.logprobs)] = torch.tensor(r.logprobs, dtype=torch.float32)
        cap = self.cfg.algorithm.is_cap
        weights = truncated_is_weights(s.old_logp, behaviour, s.mask, stale, cap)
        s.importance = importance_stats(weights, s.mask, stale, cap)
        if bool(stale.any()):
            s.token_adv = s.token_adv * weights

    def _sync(self, s: StepState, adapter: AdapterPayload) -> None:
        with self._timed(s, "sync"):
            self._generation_done()  # the rollout replicas load v + 1 after the generation ahead (from v)
            if adapter.version == self.version:  # a skipped update: every replica already serves it
                return
            source, after = self.cfg.teacher_source, s.index + 1
            every = source == "synced" and after % self.cfg.teacher_sync_every == 0
            # async: an actor teacher follows the rollouts it scores, one version behind (see _teacher)
            with_teacher = every or (source == "actor" and self.cfg.algorithm.max_staleness == 0)
            self._serve(adapter, include_teacher=with_teacher)

    def _finish(self, s: StepState, update: UpdateResult, seconds: float) -> StepReport:
        """The step's report, recorded everywhere; checkpoint every ``logging.checkpoint_every`` steps."""
        stats = update.stats
        report = s.report(self.method.name, update, seconds)
        report.image_bytes, report.images = s.image_bytes, s.image_count
        report.overlap_seconds = round(s.overlap, 4)
        report.stream_chunks = s.stream_chunks
        report.staleness, report.teacher_version = s.staleness, s.teacher_version
        imp = s.importance
        report.is_weight_mean, report.is_weight_max, report.is_weight_min = imp.mean, imp.max, imp.min
        report.is_weight_clip_frac, report.stale_rows = imp.clip_frac, imp.stale_rows
        self.recorder.dump_tokens(s, report.policy_version, self.tokenizer)
        self.recorder.record(report, s.samples(self.cfg.logging.samples_per_step))
        if s.restarts:
            self.log(
                f"step {s.index + 1}: replaced {s.restarts} replicas; each confirmed version {self.version}"
            )
            if self.cfg.logging.metrics_port is not None:
                self.recorder.targets(self.pools.targets)
        self.step_index = s.index + 1
        self._skipped_in_row = self._skipped_in_row + 1 if stats.skipped else 0
        if self._skipped_in_row > self.cfg.learner.max_skipped_steps:
            raise PoisonedRun(
                f"{self._skipped_in_row} updates in a row skipped for non-finite advantages, loss or gradient "
                f"norm (learner.max_skipped_steps = {self.cfg.learner.max_skipped_steps}); the last good "
                f"adapter is version {self.version}"
            )
        if self.step_index % self.cfg.logging.checkpoint_every == 0:
            self.checkpoint()
        if self.on_step:
            self.on_step(report)
        return report

    # ------------------------------------------------------------------------------------------ runs
    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Stop after the current step (a signal handler may call it): checkpoint, then raise RunInterrupted."""
        self._stop.set()

    def train(
        self, steps: int | None = None, *, every: int = 0, callback: Callable[[int], None] | None = None
    ) -> list[StepReport]:
        """Run ``steps`` steps; ``callback(steps_done)`` after every ``every``-th (e.g. held-out evaluation)."""
        if not self._started:
            self.start()
        reports = []
        steps = steps if steps is not None else self.cfg.algorithm.steps
        self.last_step = self.step_index + steps - 1
        for _ in range(steps):
            if self._stop.is_set():
                break
            reports.append(self.step())
            if callback is not None and every > 0 and self.step_index % every == 0:
                callback(self.step_index)
        if reports and self.step_index % self.cfg.logging.checkpoint_every != 0:
            self.checkpoint()  # the last step is always saved
        if self._stop.is_set():
            raise RunInterrupted(f"stopped after step {self.step_index}; resume with --resume {self.run_dir}")
        return reports

    def checkpoint(self) -> Path:
        """The adapter every replica serves, the learner's training state (optimizer, EMA, RNG), the teacher's
        adapter where it differs, and the controller's state (step, next λ, data cursor)."""
        alg = self.cfg.algorithm
        lam = lambda_at(self.step_index, alg.lambda_schedule, alg.lambda0, alg.warm_steps, alg.fast_steps)
        # rollouts generated ahead are not trained yet: a resumed run draws (and generates) their prompts again
        cursor = self._cursor_before_next if self._next is not None else self.cursor.state_dict()
        state = {"lambda_next": lam, "cursor": cursor}
        teacher = self.teacher_payload if self.teacher_version not in (None, self.version) else None
        learner = self.learner.training_state()
        return self.recorder.checkpoint(self.step_index, self.payload, learner, state, teacher=teacher)

    def evaluate(
        self, problems: Sequence[Problem], *, samples: int = 1, greedy: bool = False
    ) -> dict[str, float]:
        """Held-out accuracy of the adapter the replicas serve now, with the ``eval`` sampling settings.

        Returns ``sampled`` (mean over problems of the fraction of ``samples`` correct) with its standard error
        over problems, and with ``greedy`` also the greedy (temperature 0, one sample) accuracy and error.
        """
        from cepo.evaluate import heldout_accuracy

        self.check_images(problems)
        images = self.image_refs(problems)[0]

        def generate(ids: list[list[int]], spec: SamplingSpec) -> list[list[str]]:
            groups = self.pools.generate(ids, spec, self.version, images=images)
            return [[r.text for r in group] for group in groups]

        modes = eval_modes(self.cfg, greedy=greedy)
        modes[0] = ("sampled", modes[0][1].model_copy(update={"n": samples}))
        return heldout_accuracy(problems, self.prompts(problems)[1], modes, generate, self.pools.grade)

    def close(self, error: BaseException | None = None) -> None:
        """Stop every service; the ledger records how the run ended (``error``: what stopped it, if anything)."""
        self.recorder.finish(error)
        self._beside.shutdown(wait=True)
        self._ahead.shutdown(wait=True)  # a generation ahead finishes before its replicas stop
        self._chunks.shutdown(wait=True)
        if self._started:
            self.pools.close(self.log)
            self._started = False
