"""The trainable policy: a transformers causal LM with a peft LoRA adapter, updated by the PPO-clip surrogate.

One rank's worth of work; the distributed learner wraps this (FSDP across ranks). The math comes from
``losses.py`` and the advantages from ``advantages.py``; this module only feeds tensors to them.

A batch is a list of (prompt ids, response ids) with a [B, T] advantage per response token. Log-probs are
those of the sampling distribution: logits divided by the rollout temperature.

With ``fsdp=True`` the policy is one rank of a torch.distributed group (``services/learner/distributed.py``
starts the group): every decoder layer and then the root are ``fully_shard``-ed (FSDP2) after peft wrapping.
Gradients are then *summed* across ranks (no division by the world size), so a loss normalised by the global
token / sequence count gives the exact global-batch gradient. FSDP2 runs collectives in every forward and
backward, so all ranks must run the same number of micro-batches: ``num_micro_batches`` pads a rank's work
with dummy micro-batches that contribute nothing.

A vision-language model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: its config has a ``vision_config``) loads with
``AutoModelForImageTextToText``; LoRA goes on the language model's projections only (the vision tower and
``lm_head`` stay frozen), and a batch row may carry images: the forward gets their pixel values, grid sizes and
``mm_token_type_ids`` and computes its own M-RoPE positions. Under FSDP only the language model's decoder layers
are sharded; the frozen vision tower stays in the root group, all-gathered by every rank at every forward, so a
rank whose micro-batch has no image runs the same collectives as one whose micro-batch has.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cepo_proto.adapter import AdapterPayload
from cepo_proto.learner import DistillSpec, MiniBatch, UpdateSettings, UpdateStats
from cepo_services.learner.losses import ema_update, opsd_loss, ppo_clip_loss, sdpo_loss
from cepo_services.learner.schedules import lr_at

__all__ = ["LoraPolicy", "PolicyBatch", "plan_update", "shard_bounds", "teacher_image_rows"]


def shard_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) per part, sizes differing by at most one (the first n % parts get one more)."""
    if parts < 1 or n < 0:
        raise ValueError(f"need parts ≥ 1 and n ≥ 0, got parts={parts}, n={n}")
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for r in range(parts):
        stop = start + base + (r < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def plan_update(
    lengths: Sequence[int], ranks: int, mini_batches: int, micro_batch_size: int
) -> list[tuple[list[int], list[MiniBatch]]]:
    """Per rank: the global row indices it holds and its :class:`MiniBatch` plan, for a batch whose response
    lengths are ``lengths``.

    The batch is first cut into ``mini_batches`` contiguous ranges (one optimizer step each), then each range
    is sharded contiguously across ``ranks``; a rank's rows are its shards of every range, in order. So the
    steps — and the global token counts that normalise them — are the same whatever the number of ranks.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be ≥ 1, got {micro_batch_size}")
    rows: list[list[int]] = [[] for _ in range(ranks)]
    plans: list[list[MiniBatch]] = [[] for _ in range(ranks)]
    for m_start, m_stop in shard_bounds(len(lengths), mini_batches):
        if m_stop == m_start:  # fewer rows than mini-batches: no empty optimizer steps
            continue
        shards = [(m_start + a, m_start + b) for a, b in shard_bounds(m_stop - m_start, ranks)]
        tokens = float(sum(lengths[m_start:m_stop]))
        micro = max(math.ceil((b - a) / micro_batch_size) for a, b in shards)
        for r, (a, b) in enumerate(shards):
            local = len(rows[r])
            rows[r].extend(range(a, b))
            plans[r].append(MiniBatch(local, local + b - a, tokens, float(m_stop - m_start), micro))
    return list(zip(rows, plans, strict=True))


def teacher_image_rows(
    samples: Sequence[tuple[Sequence[int], Sequence[int]]],
    teacher_samples: Sequence[tuple[Sequence[int], Sequence[int]]],
    images: Sequence[Sequence[Any]] | None,
    image_token_id: int,
    index: Sequence[int] | None = None,
) -> list[list[Any]] | None:
    """Per teacher sample (OPSD / SDPO's r⁺ context, row for row with ``samples``), the images its forward gets.

    A teacher context holds its sample's images — the same image tokens, expanded as in the student prompt
    (``teacher.sees_image``) — or none (the blind teacher: the markup removed from its text); its own image
    tokens say which. Any other count is refused, naming the sample (``index``: global sample indices).
    """
    if images is None:
        return None
    rows: list[list[Any]] = []
    for k, ((prompt, _), (context, _), row) in enumerate(zip(samples, teacher_samples, images, strict=True)):
        student = sum(int(t) == image_token_id for t in prompt)
        teacher = sum(int(t) == image_token_id for t in context)
        if teacher and teacher != student:
            i = k if index is None else index[k]
            raise ValueError(
                f"teacher sample {i}: {teacher} image tokens, its sample's prompt has {student}; a teacher "
                "context holds its sample's images, expanded as in the student prompt, or none"
            )
        rows.append(list(row or ()) if teacher else [])
    return rows


@dataclass
class PolicyBatch:
    """Right-padded prompt + response ids with the response mask; built by :meth:`PolicyBatch.build`."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    response_mask: torch.Tensor  # [B, T] 1 at response tokens
    response_index: torch.Tensor  # [B, T] position in input_ids of each response token (0 at padding)
    images: list[list[Any]] | None = None  # per row, its images (prepared [H, W, 3] uint8 arrays), or None

    @classmethod
    def build(
        cls,
        samples: Sequence[tuple[Sequence[int], Sequence[int]]],
        pad_id: int = 0,
        images: Sequence[Sequence[Any]] | None = None,
    ) -> PolicyBatch:
        if not samples:
            raise ValueError("a policy batch needs at least one sample")
        for i, (prompt, response) in enumerate(samples):
            if not prompt or not response:
                raise ValueError(f"sample {i}: prompt and response must both be non-empty")
        width = max(len(p) + len(r) for p, r in samples)
        t_max = max(len(r) for _, r in samples)
        ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        mask = torch.zeros((len(samples), t_max), dtype=torch.float32)
        index = torch.zeros((len(samples), t_max), dtype=torch.long)
        for row, (prompt, response) in enumerate(samples):
            seq = [*prompt, *response]
            ids[row, : len(seq)] = torch.tensor(seq)
            attention[row, : len(seq)] = 1
            mask[row, : len(response)] = 1
            index[row, : len(response)] = torch.arange(len(prompt), len(seq))
        if images is not None and len(images) != len(samples):
            raise ValueError(f"{len(images)} image lists for {len(samples)} samples")
        rows = None if images is None or not any(images) else [list(i or ()) for i in images]
        return cls(ids, attention, mask, index, rows)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, start: int, stop: int, width: int | None = None) -> PolicyBatch:
        """Rows [start, stop); with ``width`` only the first ``width`` response positions."""
        return PolicyBatch(
            self.input_ids[start:stop],
            self.attention_mask[start:stop],
            self.response_mask[start:stop, :width],
            self.response_index[start:stop, :width],
            None if self.images is None else self.images[start:stop],
        )

    @classmethod
    def empty(cls) -> PolicyBatch:
        """A batch with no rows (a distributed rank whose shard of a tiny global batch is empty)."""
        return cls(
            torch.zeros((0, 1), dtype=torch.long),
            torch.zeros((0, 1), dtype=torch.long),
            torch.zeros((0, 0), dtype=torch.float32),
            torch.zeros((0, 0), dtype=torch.long),
        )


def _dummy_batch(pad_id: int = 0) -> PolicyBatch:
    """One row, two tokens, no response token: a forward that keeps FSDP collectives in step, adds nothing."""
    return PolicyBatch(
        torch.full((1, 2), pad_id, dtype=torch.long),
        torch.ones((1, 2), dtype=torch.long),
        torch.zeros((1, 1), dtype=torch.float32),
        torch.ones((1, 1), dtype=torch.long),
    )


class LoraPolicy:
    def __init__(
        self,
        model_path: str,
        *,
        rank: int = 16,
        alpha: int = 32,
        dropout: float = 0.0,
        target_modules: Sequence[str] = (
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ),
        dtype: str = "float32",
        lr: float = 5e-6,
        total_steps: int = 50,
        warmup_steps: int = 5,
        lr_schedule: str = "cosine",
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        grad_clip: float = 1.0,
        temperature: float = 1.0,
        seed: int = 0,
        fsdp: bool = False,
        device: str = "cpu",
    ) -> None:
        from peft import LoraConfig, get_peft_model

        from cepo_services.common import vision

        targets = vision.language_lora_targets(model_path, list(target_modules))  # refuses lm_head
        torch.manual_seed(seed)
        base = vision.load_model(model_path, dtype)
        self.image_processor, self.image_token_id = None, -1
        if vision.is_vision_language(model_path):
            from transformers import AutoProcessor

            self.image_processor = AutoProcessor.from_pretrained(model_path).image_processor
            self.image_token_id = int(base.config.image_token_id)
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
        self.model = get_peft_model(base, config)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.fsdp = fsdp
        if fsdp:
            self._shard()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=betas, weight_decay=weight_decay)
        self.base_lr, self.total_steps, self.warmup_steps = lr, total_steps, warmup_steps
        self.lr_schedule, self.grad_clip, self.temperature = lr_schedule, grad_clip, temperature
        self.step = 0
        self.ema: dict[int, torch.Tensor] | None = (
            None  # SDPO's EMA teacher (trainable tensors), on first use
        )

    def _shard(self) -> None:
        """FSDP2 over the peft model: each decoder layer, then the root (embeddings, norm, lm_head)."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if not dist.is_initialized():
            raise RuntimeError("fsdp=True needs an initialised torch.distributed process group")
        mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        layer_classes = set(getattr(self.model.get_base_model(), "_no_split_modules", None) or ())
        # a VL model's vision blocks stay in the root group: a rank without an image in its micro-batch must
        # run the same collectives as one with
        layers = [
            m
            for name, m in self.model.named_modules()
            if type(m).__name__ in layer_classes and ".visual." not in f".{name}."
        ]
        if not layers:
            raise RuntimeError(f"no decoder layer of classes {sorted(layer_classes)} to shard")
        for module in [*layers, self.model]:
            fully_shard(module, mesh=mesh)
            # sum, never average, across ranks: the loss is already normalised by the global batch
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)

    # ------------------------------------------------------------------ log-probs
    def response_logits(self, batch: PolicyBatch) -> torch.Tensor:
        """[B, T, V] float32 logits predicting each response token (differentiable; raw, no temperature)."""
        from cepo_services.common.vision import vision_kwargs

        input_ids = batch.input_ids.to(self.device)
        index = batch.response_index.to(self.device)
        extra = vision_kwargs(input_ids, batch.images, self.image_processor, self.image_token_id)
        logits = self.model(
            input_ids=input_ids, attention_mask=batch.attention_mask.to(self.device), **extra
        ).logits
        # logits at position p − 1 predict the token at p
        prev = (index - 1).clamp_min(0)
        return logits.gather(1, prev.unsqueeze(-1).expand(-1, -1, logits.shape[-1])).float()

    def _token_logp(self, logits: torch.Tensor, batch: PolicyBatch) -> torch.Tensor:
        logp = F.log_softmax(logits / self.temperature, dim=-1)
        targets = batch.input_ids.to(self.device).gather(1, batch.response_index.to(self.device))
        token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return token_logp * batch.response_mask.to(self.device)

    def token_logprobs(self, batch: PolicyBatch) -> torch.Tensor:
        """[B, T] log π(y_t | x, y_<t) at the sampling temperature (differentiable; 0 at padding)."""
        return self._token_logp(self.response_logits(batch), batch)

    @torch.no_grad()
    def teacher_logits(self, batch: PolicyBatch, *, ema: bool = False) -> torch.Tensor:
        """[B, T, V] logits of the teacher at the response positions of ``batch`` (teacher-context sequences).

        The teacher is this policy's current weights (OPSD: the actor), or with ``ema`` its EMA copy (SDPO),
        swapped in for the forward and back out after it. Never differentiable.
        """
        if not ema:
            return self.response_logits(batch).detach()
        saved = [p.detach().clone() for p in self.params]
        try:
            for p, e in zip(self.params, self._ema().values(), strict=True):
                p.copy_(e)
            return self.response_logits(batch).detach()
        finally:
            for p, s in zip(self.params, saved, strict=True):
                p.copy_(s)

    @torch.no_grad()
    def old_logprobs(
        self, batch: PolicyBatch, micro_batch_size: int = 8, *, num_micro_batches: int | None = None
    ) -> torch.Tensor:
        """Old-policy log-probs recomputed by the learner itself (not the engine's), before the update.

        ``num_micro_batches`` (FSDP): run dummy forwards up to that count so every rank's collectives match.
        """
        self.model.eval()
        parts = [
            self.token_logprobs(batch.rows(i, i + micro_batch_size)).cpu()
            for i in range(0, len(batch), micro_batch_size)
        ]
        for _ in range(len(parts), num_micro_batches or 0):
            self.token_logprobs(_dummy_batch())
        width = batch.response_mask.shape[1]
        if not parts:
            return torch.zeros((0, width))
        return torch.cat([F.pad(p, (0, width - p.shape[1])) for p in parts])

    # ------------------------------------------------------------------ update
    def update(
        self,
        batch: PolicyBatch,
        advantages: torch.Tensor,
        old_logp: torch.Tensor,
        settings: UpdateSettings = UpdateSettings(),  # noqa: B008 (frozen)
        *,
        plan: Sequence[MiniBatch] | None = None,
        teacher_batch: PolicyBatch | None = None,
        distill: DistillSpec | None = None,
    ) -> UpdateStats:
        """One update over ``batch``: ``settings.ppo_epochs`` passes over its mini-batches, one optimizer step
        per mini-batch (gradient accumulated over micro-batches), the ratio taken against ``old_logp``.

        ``plan`` lists this rank's mini-batches with the counts over all ranks (:func:`plan_update`); by default
        this rank's batch is the global batch, cut into ``settings.mini_batches``. Token-mean is then exact
        whatever the micro-batch split or rank count. Under FSDP the returned loss is this rank's share,
        clip_frac / approx_kl are over this rank's tokens (0 without any) and grad_norm is the global norm.

        A non-finite loss or gradient norm at any step skips the whole update: weights, optimizer state, EMA and
        version are restored to what they were before its first step.

        With ``distill`` (OPSD / SDPO) ``teacher_batch`` holds, row for row, the same responses after the
        teacher's r⁺ context (with its images, :func:`teacher_image_rows`); the distillation term is added per
        micro-batch (see :class:`DistillSpec`), the teacher being the weights (or EMA) of the moment.
        """
        if advantages.shape != batch.response_mask.shape:
            raise ValueError(
                f"advantages must have shape {tuple(batch.response_mask.shape)}, got {tuple(advantages.shape)}"
            )
        if distill is not None:
            if teacher_batch is None or len(teacher_batch) != len(batch):
                got = "none" if teacher_batch is None else f"{len(teacher_batch)} rows"
                raise ValueError(f"{distill.kind} needs a teacher batch of {len(batch)} rows, got {got}")
            if not torch.equal(teacher_batch.response_mask, batch.response_mask):
                raise ValueError("teacher_batch responses must match the batch's row for row")
        if plan is None:
            lengths = [int(n) for n in batch.response_mask.sum(1).tolist()]
            plan = plan_update(lengths, 1, settings.mini_batches, settings.micro_batch_size)[0][1]
        self.model.train()
        lr = lr_at(self.step, self.base_lr, self.total_steps, self.warmup_steps, self.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        steps = [mini for _ in range(settings.ppo_epochs) for mini in plan]
        saved = self._snapshot() if len(steps) > 1 else None
        loss_sum = clip_sum = kl_sum = distill_sum = norm_sum = 0.0
        n_tokens = 0.0
        for k, mini in enumerate(steps):
            out = self._step(batch, advantages, old_logp, settings, mini, teacher_batch, distill)
            loss_sum += out["loss"]
            distill_sum += out["distill"]
            clip_sum += out["clip"]
            kl_sum += out["kl"]
            n_tokens += out["tokens"]
            if not self._all_finite(out["loss"], out["norm"]):
                # a poisoned update: weights, optimizer state, EMA and version stay as they were
                self.optimizer.zero_grad(set_to_none=True)
                if saved is not None and k > 0:
                    self._restore(saved)
                return UpdateStats(
                    loss_sum / (k + 1),
                    clip_sum / max(n_tokens, 1.0),
                    kl_sum / max(n_tokens, 1.0),
                    out["norm"],
                    lr,
                    distill_loss=distill_sum / (k + 1),
                    skipped=True,
                    optimizer_steps=0,
                )
            norm_sum += out["norm"]
            self.optimizer.step()
            if distill is not None and distill.kind == "sdpo":
                # SDPO: θ_T ← β·θ_T + (1 − β)·θ, after every optimizer step (Table 7)
                self.ema = ema_update(self._ema(), dict(enumerate(self.params)), distill.ema_decay)
        self.step += 1
        n = len(steps)
        return UpdateStats(
            loss_sum / n,
            clip_sum / max(n_tokens, 1.0),
            kl_sum / max(n_tokens, 1.0),
            norm_sum / n,
            lr,
            distill_loss=distill_sum / n,
            optimizer_steps=n,
        )

    def _step(
        self,
        batch: PolicyBatch,
        advantages: torch.Tensor,
        old_logp: torch.Tensor,
        settings: UpdateSettings,
        mini: MiniBatch,
        teacher_batch: PolicyBatch | None,
        distill: DistillSpec | None,
    ) -> dict[str, float]:
        """Forward and backward over one mini-batch (rows [mini.start, mini.stop)); the gradient is left in
        place, clipped, for the optimizer step. Returns its loss, gradient norm and token-weighted stats."""
        self.optimizer.zero_grad(set_to_none=True)
        micro_batch_size = settings.micro_batch_size
        starts = list(range(mini.start, mini.stop, micro_batch_size))
        total = max(len(starts), mini.micro_batches)
        ema = distill is not None and distill.kind == "sdpo"
        loss_sum = clip_sum = kl_sum = distill_sum = tokens = 0.0
        for i in range(total):
            if self.fsdp:  # reduce-scatter the accumulated gradients once, after the last backward
                self.model.set_requires_gradient_sync(i == total - 1)
            if i >= len(starts):
                if distill is not None:  # the teacher forward's collectives too
                    self.teacher_logits(_dummy_batch(), ema=ema)
                (self.token_logprobs(_dummy_batch()).sum() * 0.0).backward()
                continue
            start = starts[i]
            stop = min(start + micro_batch_size, mini.stop)
            width = int(batch.response_mask[start:stop].sum(1).max())
            micro = batch.rows(start, stop, width)
            mask = micro.response_mask.to(self.device)
            teacher_logits = None
            if distill is not None:  # first: an EMA swap must not touch weights a live graph has saved
                teacher_logits = self.teacher_logits(teacher_batch.rows(start, stop, width), ema=ema)
            logits = self.response_logits(micro)
            out = ppo_clip_loss(
                self._token_logp(logits, micro),
                old_logp[start:stop, :width].to(self.device),
                advantages[start:stop, :width].to(self.device),
                mask,
                settings.clip_low,
                settings.clip_high,
                settings.loss_agg,
                global_tokens=mini.tokens,
                global_seqs=mini.seqs,
            )
            loss = out.loss
            if distill is not None:
                d_loss = distill.weight * self._distill_loss(
                    distill, logits, teacher_logits, mask, mini.tokens
                )
                loss = d_loss + loss if distill.with_pg else d_loss
                distill_sum += float(d_loss.detach())
            loss.backward()
            n = float(micro.response_mask.sum())
            loss_sum += float(loss.detach())
            clip_sum += float(out.clip_frac) * n
            kl_sum += float(out.approx_kl) * n
            tokens += n
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP: the global norm, same on every rank
            norm = norm.full_tensor()
        return {
            "loss": loss_sum,
            "distill": distill_sum,
            "clip": clip_sum,
            "kl": kl_sum,
            "tokens": tokens,
            "norm": float(norm),
        }

    def _snapshot(self) -> dict[str, Any]:
        """The adapter weights, optimizer state and EMA (this rank's shards), to undo a poisoned update."""
        state = {
            id(p): {
                k: v.detach().clone() if torch.is_tensor(v) else v for k, v in self.optimizer.state[p].items()
            }
            for p in self.params
            if p in self.optimizer.state
        }
        ema = None if self.ema is None else {i: t.detach().clone() for i, t in self.ema.items()}
        return {"params": [p.detach().clone() for p in self.params], "optimizer": state, "ema": ema}

    @torch.no_grad()
    def _restore(self, saved: dict[str, Any]) -> None:
        for p, value in zip(self.params, saved["params"], strict=True):
            p.copy_(value)
            before = saved["optimizer"].get(id(p))
            if before is None:
                self.optimizer.state.pop(p, None)
                continue
            state = self.optimizer.state[p]
            for k, v in before.items():
                if torch.is_tensor(v) and torch.is_tensor(state.get(k)):
                    state[k].copy_(v)
                else:
                    state[k] = v
        self.ema = saved["ema"]

    def _all_finite(self, *values: float) -> bool:
        """Are this update's loss and gradient norm finite — on every rank (one all-reduce under FSDP)?"""
        ok = all(math.isfinite(v) for v in values)
        if self.fsdp:
            import torch.distributed as dist

            flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = bool(flag.item())
        return ok

    def _ema(self) -> dict[int, torch.Tensor]:
        """SDPO's EMA teacher weights, one per trainable tensor; the current weights on first use."""
        if self.ema is None:
            self.ema = {i: p.detach().clone() for i, p in enumerate(self.params)}
        return self.ema

    def _distill_loss(
        self,
        spec: DistillSpec,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        mask: torch.Tensor,
        global_tokens: float,
    ) -> torch.Tensor:
        """The OPSD / SDPO term of one micro-batch, normalised by the global token count (token-mean)."""
        if spec.kind == "opsd":
            return opsd_loss(
                student_logits,
                teacher_logits,
                mask,
                temperature=self.temperature,
                global_tokens=global_tokens,
            )
        return sdpo_loss(
            student_logits,
            teacher_logits,
            mask,
            alpha=spec.alpha,
            temperature=self.temperature,
            top_k=spec.top_k,
            global_tokens=global_tokens,
        )

    # ------------------------------------------------------------------ resume
    def training_state(self) -> dict | None:
        """Everything an exact resume needs, full-size on CPU: the adapter weights, the optimizer state (by
        parameter name), the update count (= policy version; the LR schedule is a function of it), SDPO's EMA
        teacher and the torch RNG state. Under FSDP a collective: rank 0 returns it, the others None."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        model = get_model_state_dict(self.model, options=options)
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        ema = None
        if self.ema is not None:
            ema = [
                (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()
                for t in self.ema.values()
            ]
        if self.fsdp and dist.get_rank() != 0:
            return None
        return {
            "step": self.step,
            "model": model,
            "optimizer": optimizer,
            "ema": ema,
            "rng": torch.get_rng_state(),
        }

    def load_training_state(self, state: dict) -> None:
        """Restore :meth:`training_state`'s result (every rank gets the full state and keeps its shard)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        missing = [n for n, p in self.model.named_parameters() if p.requires_grad and n not in state["model"]]
        if missing:
            raise ValueError(f"training state lacks {len(missing)} adapter tensors, e.g. {missing[0]}")
        set_model_state_dict(self.model, state["model"], options=options)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        self.step = int(state["step"])
        self.ema = None
        if state.get("ema") is not None:
            self.ema = {
                i: _like(t, p) for i, (t, p) in enumerate(zip(state["ema"], self.params, strict=True))
            }
        torch.set_rng_state(state["rng"])

    # ------------------------------------------------------------------ export
    @property
    def version(self) -> int:
        """The policy version: 0 for the initial adapter (LoRA B = 0, the base policy), + 1 per update."""
        return self.step

    def export_adapter(self, version: int | None = None) -> AdapterPayload | None:
        """The current adapter as a payload (PEFT's own file format, so PeftModel and vLLM load it), stamped
        with :attr:`version` (``version`` overrides it: a standalone policy exported under another name).

        Under FSDP this is a collective (every rank must call it); rank 0 returns the payload, the others None.
        """
        import torch.distributed as dist

        state = self._gathered_trainable() if self.fsdp else None
        if self.fsdp and dist.get_rank() != 0:
            return None
        with tempfile.TemporaryDirectory(prefix="cepo-export-") as tmp:
            self.model.save_pretrained(tmp, state_dict=state)
            _canonical_config(Path(tmp) / "adapter_config.json")
            return AdapterPayload.from_dir(self.version if version is None else version, tmp)

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The full LoRA state in PEFT's naming, on CPU (under FSDP a collective: every rank must call it)."""
        from peft import get_peft_model_state_dict

        state = self._gathered_trainable() if self.fsdp else None
        return {
            k: v.detach().cpu().clone()
            for k, v in get_peft_model_state_dict(self.model, state_dict=state).items()
        }

    def _gathered_trainable(self) -> dict[str, torch.Tensor]:
        """Every trainable (adapter) parameter, all-gathered to full size on CPU; the base stays sharded."""
        out = {}
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                full = param.full_tensor() if hasattr(param, "full_tensor") else param
                out[name] = full.detach().to("cpu", copy=True)
        return out


def _canonical_config(path: Path) -> None:
    """peft keeps ``target_modules`` as a set and writes it in the process's string-hash order: the same adapter
    would get different bytes, and a different checksum, in every process. Sort it and the keys."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``param``: this rank's shard of it for an FSDP (DTensor) parameter."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(param.device), param.device_mesh, param.placements)
    return full.to(param.device).clone()
