"""The run's Ray cluster and the config → service settings mapping, in one place for training and ``cepo eval``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from cepo.config import RunConfig
from cepo_proto.learner import DistillSpec, UpdateSettings
from cepo_proto.pipeline import SamplingSpec

__all__ = [
    "distill_spec",
    "engine_options",
    "eval_modes",
    "local_role_resources",
    "placement",
    "policy_options",
    "role_capacity",
    "start_ray",
    "train_sampling",
    "update_settings",
]


def start_ray(cfg: RunConfig, *, log_dir: str | os.PathLike[str] | None = None) -> None:
    """Attach to ``resources.ray_address`` or start a local Ray sized for every replica and learner rank.

    With ``log_dir`` every service process of this run writes its output (engine logs) to
    ``log_dir/worker-<pid>.log``; ``logging.verbose`` also forwards it to this process's console."""
    import ray

    from cepo_services.common.logs import LOG_DIR_ENV, LOG_ECHO_ENV

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    res = cfg.resources
    needed = (
        (cfg.rollout.replicas + cfg.teacher.replicas) * res.cpus_per_replica
        + cfg.verifier.replicas
        + cfg.learner.ranks * res.cpus_per_learner_rank
    )
    ray.init(
        address=res.ray_address,
        num_cpus=None if res.ray_address else max(int(np.ceil(needed)), res.num_cpus or 1),
        num_gpus=res.num_gpus,
        resources=None if res.ray_address else local_role_resources(),
        include_dashboard=False,
        log_to_driver=cfg.logging.verbose,
        runtime_env=None
        if log_dir is None
        else {
            "env_vars": {
                LOG_DIR_ENV: str(Path(log_dir).resolve()),
                LOG_ECHO_ENV: str(int(cfg.logging.verbose)),
            },
            "worker_process_setup_hook": "cepo_services.common.logs.setup_worker",
        },
    )


# Every service asks for one unit of its role's custom resource, so a node started with
# ``ray start --resources '{"rollout": 2}'`` is where (at most two) rollout replicas land.
ROLE_RESOURCES = ("rollout", "teacher", "verifier", "learner")
LOCAL_ROLE_UNITS = 1000  # a local Ray's one node offers every role; its CPUs are what bound the replicas


def local_role_resources() -> dict[str, float]:
    """The role resources a local Ray started by :func:`start_ray` offers: every role, unbounded in practice."""
    return dict.fromkeys(ROLE_RESOURCES, float(LOCAL_ROLE_UNITS))


def placement(role: str, *, cpus: float, gpus: float = 0.0) -> dict[str, Any]:
    """Ray actor options of one ``role`` service process: its CPUs and GPUs and one unit of the role's custom
    resource where the cluster offers that resource. A role no node offers (a plain ``ray.init()``, a cluster
    whose nodes name other roles only) is placed wherever the CPUs are free, instead of waiting forever."""
    import ray

    options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus}
    if ray.cluster_resources().get(role, 0) > 0:
        options["resources"] = {role: 1}
    return options


def role_capacity(role: str) -> float | None:
    """Units of ``role`` the cluster offers in all (None: no node offers it, the role is not bounded by it)."""
    import ray

    total = ray.cluster_resources().get(role, 0)
    return float(total) if total > 0 else None


def teacher_max_len(cfg: RunConfig) -> int:
    """The teacher engines' context: prompt + response (``model.max_seq_len``) plus the hint's room
    (``teacher.max_hint_tokens``), within the model's own position limit."""
    from transformers import AutoConfig

    wanted = cfg.model.max_seq_len + cfg.teacher.max_hint_tokens
    config = AutoConfig.from_pretrained(cfg.model.path)
    config = getattr(config, "text_config", None) or config  # a vision-language model's language half
    limit = getattr(config, "max_position_embeddings", None)
    return min(wanted, limit) if limit else wanted


def engine_options(cfg: RunConfig, backend: str, seed: int, *, role: str = "rollout") -> dict[str, Any]:
    """Keyword arguments of ``make_engine`` for a rollout or teacher engine (or ``cepo eval``'s). Teacher
    engines hold the hint too (:func:`teacher_max_len`)."""
    if backend == "transformers":
        return {"dtype": cfg.model.dtype, "seed": seed}
    return {
        "dtype": cfg.model.dtype,
        "max_model_len": teacher_max_len(cfg) if role == "teacher" else cfg.model.max_seq_len,
        "max_lora_rank": max(cfg.model.lora.rank, 8),  # vLLM's smallest supported LoRA rank is 8
        "seed": seed,
        "enforce_eager": cfg.rollout.enforce_eager,
        "kv_cache_gib": cfg.rollout.kv_cache_gib,
        "gpu_memory_utilization": cfg.rollout.gpu_memory_utilization,
    }


def policy_options(cfg: RunConfig) -> dict[str, Any]:
    """Keyword arguments of the learner's ``LoraPolicy`` (model, LoRA, optimizer and schedule settings)."""
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


def update_settings(cfg: RunConfig) -> UpdateSettings:
    """The learner's PPO-clip settings (``learner`` section)."""
    lc = cfg.learner
    return UpdateSettings(
        micro_batch_size=lc.micro_batch_size,
        ppo_epochs=lc.ppo_epochs,
        mini_batches=lc.mini_batches,
        clip_low=lc.clip_low,
        clip_high=lc.clip_high,
        loss_agg=lc.loss_agg,
    )


def distill_spec(cfg: RunConfig, kind: str) -> DistillSpec:
    """The learner loss ``kind`` (a method's ``learner_loss``) with the ``algorithm`` section's settings."""
    alg = cfg.algorithm
    return DistillSpec(
        kind,
        weight=alg.distill_weight,
        alpha=alg.sdpo_alpha,
        top_k=alg.sdpo_top_k,
        ema_decay=alg.ema_decay,
        with_pg=alg.distill_with_pg,
    )


def train_sampling(cfg: RunConfig, step: int) -> SamplingSpec:
    """The rollouts' sampling: G samples per prompt at the rollout settings, seeded by (run seed, step) so that
    a resumed run samples what the uninterrupted one would have (where the engine honours request seeds)."""
    r = cfg.rollout
    seed = (cfg.seed * 1_000_003 + step * 10_007) % 2**31
    return SamplingSpec(
        n=r.group_size,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_tokens=r.max_new_tokens,
        seed=seed,
    )


def eval_modes(cfg: RunConfig, *, greedy: bool) -> list[tuple[str, SamplingSpec]]:
    """Held-out evaluation's sampling: ``sampled`` (the ``eval`` settings, ``data.eval_samples`` per problem)
    and, with ``greedy``, one greedy sample per problem."""
    ev = cfg.eval
    sampled = SamplingSpec(
        n=cfg.data.eval_samples,
        temperature=ev.temperature,
        top_p=ev.top_p,
        top_k=ev.top_k,
        presence_penalty=ev.presence_penalty,
        max_tokens=ev.max_new_tokens or cfg.rollout.max_new_tokens,
    )
    modes = [("sampled", sampled)]
    if greedy:
        modes.append(("greedy", sampled.model_copy(update={"n": 1, "temperature": 0.0})))
    return modes
