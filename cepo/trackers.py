"""Experiment trackers (``logging.report_to``): TensorBoard event files and Weights & Biases, under verl's names.

The run folder's ``metrics.jsonl`` and ``eval.jsonl`` stay the record; a tracker gets the same numbers, step by
step, where ML users look for them. The step recorder (:mod:`cepo.controller.recorder`) opens the trackers when
the run starts, logs every :class:`~cepo_proto.pipeline.StepReport` (:func:`step_metrics`) and every held-out
evaluation (:func:`eval_metrics`), and closes them when the run ends.

Step axis
=========

The x axis is the number of training steps done: a step report (``StepReport.step`` = s, counted from 0) is
logged at global step s + 1, an evaluation after k steps at k (the base policy's at 0), as in verl. A resumed
run (``cepo train --resume``) continues from its checkpoint's step k and redoes the steps after it:

- **TensorBoard** writes into ``<run_dir>/tensorboard/`` with ``purge_step = k + 1``, so TensorBoard drops the
  interrupted session's events at steps > k and shows every step once, with the values of the steps that count.
- **W&B** (``<run_dir>/wandb/``; ``WANDB_MODE=offline`` works without network, ``wandb sync`` uploads later)
  continues the same W&B run (id = the run id, ``resume="allow"``). W&B keeps the first value it got for a
  step, so a step redone after a crash keeps the interrupted session's value there (metrics.jsonl and
  TensorBoard have the redone one).

Names
=====

==============================  =================================  ==========================================
name                            from                               meaning
==============================  =================================  ==========================================
*verl's*
critic/score/mean               StepReport.reward_mean             mean verifier reward of the step's rollouts
critic/rewards/mean             StepReport.reward_mean             the same (no KL penalty enters the reward)
actor/pg_loss                   StepReport.loss                    the learner's loss (mean over optimizer
                                                                   steps; with OPSD/SDPO the distillation term
                                                                   included)
actor/pg_clipfrac               StepReport.ppo_clip_frac           PPO-clipped token fraction
actor/grad_norm                 StepReport.grad_norm               gradient norm before clipping
actor/lr                        StepReport.lr                      learning rate of the update
actor/ppo_kl                    StepReport.approx_kl               mean old − new log-prob over the update
actor/entropy                   StepReport entropy                 only when the report carries it
response_length/mean            tokens / (groups × group_size)     mean response tokens per rollout
timing_s/<stage>                StepReport.stage_seconds           gen, verify, adv, teacher, old_logp,
                                                                   update, sync
timing_s/step                   StepReport.step_seconds            the whole step
perf/time_per_step              StepReport.step_seconds            the whole step
perf/throughput                 StepReport.tokens_per_s            response tokens per second of the step
                                                                   (verl: all tokens per second per GPU)
val-core/<suite>/acc/mean@N     eval.jsonl ``sampled``             held-out accuracy, N samples per problem
val-aux/<suite>/acc/std_err@N   eval.jsonl ``sampled_se``          its standard error over problems
val-aux/<suite>/acc/greedy      eval.jsonl ``greedy``              greedy accuracy (eval.greedy)
val-aux/<suite>/acc/greedy_se   eval.jsonl ``greedy_se``           its standard error
*CEPO's*
cepo/accuracy                   StepReport.accuracy                fraction of correct rollouts
cepo/lambda                     StepReport.lam                     λ, the evidence mix
cepo/delta_frac/positive        StepReport.delta_pos_frac          fraction of scored tokens with Δ_t > 0
cepo/delta_frac/negative        StepReport.delta_neg_frac          fraction of scored tokens with Δ_t < 0
cepo/weight_clip_frac           StepReport.weight_clip_frac        fraction of tokens whose w_t was clipped
cepo/abs_advantage/before       StepReport.abs_adv_before          mean |A| before token reweighting
cepo/abs_advantage/after        StepReport.abs_adv_after           mean |Â_t| after it
cepo/distill_loss               StepReport.distill_loss            OPSD / SDPO distillation term
cepo/negatives_found            StepReport.negatives_found         groups with a usable wrong answer r⁻
cepo/zero_variance_groups       StepReport.zero_variance_groups    groups whose rollouts all got A = 0
cepo/groups                     StepReport.groups                  groups (prompts) in the step
cepo/response_tokens            StepReport.tokens                  response tokens of the step
cepo/policy_version             StepReport.policy_version          adapter version the rollouts came from
cepo/update_skipped             StepReport.update_skipped          1 when the update was skipped
cepo/probe_failures             StepReport.probe_failures          replicas that failed the adapter probe
cepo/replica_restarts           StepReport.replica_restarts        replicas replaced during the step (all
                                                                   roles)
cepo/<field>                    any other number in the report     e.g. a field added to StepReport later
==============================  =================================  ==========================================

The ``average`` suite (``val-core/average/acc/mean@N``, ``val-aux/average/acc/greedy``) is the mean over the
suites evaluated, as in summary.json. verl's ``critic/advantages/*`` (the signed mean of Â, about 0 for GRPO)
is not reported; the mean magnitudes are ``cepo/abs_advantage/*``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from cepo.config import ConfigError

__all__ = [
    "TRACKERS",
    "WANDB_PIN",
    "TensorBoardTracker",
    "TrackerError",
    "Trackers",
    "WandbTracker",
    "check_available",
    "eval_metrics",
    "step_metrics",
]

TRACKERS = ("tensorboard", "wandb")
TENSORBOARD_PIN = "tensorboard==2.21.0"  # a dependency of the project (pyproject.toml)
WANDB_PIN = "wandb==0.31.0"  # optional: the `wandb` extra of pyproject.toml


class TrackerError(ConfigError):
    """A tracker named in ``logging.report_to`` cannot be used (its package is not installed)."""


def _get(report: Any, key: str, default: Any = None) -> Any:
    if isinstance(report, Mapping):
        return report.get(key, default)
    value = getattr(report, key, default)
    if value is default and hasattr(report, "model_extra"):  # a StepReport's extra fields
        value = (report.model_extra or {}).get(key, default)
    return value


def _number(value: Any) -> float | None:
    """A loggable scalar: numbers and bools as float; None (a skipped update's missing stat) and others: None."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


# StepReport fields with a name above (or none: step is the x axis, adapter_version = policy_version + 1)
_MAPPED = frozenset(
    {
        "step", "adapter_version", "reward_mean", "loss", "ppo_clip_frac", "grad_norm", "lr", "approx_kl",
        "entropy", "tokens", "groups", "stage_seconds", "step_seconds", "tokens_per_s", "accuracy", "lam",
        "delta_pos_frac", "delta_neg_frac", "weight_clip_frac", "abs_adv_before", "abs_adv_after",
        "distill_loss", "negatives_found", "zero_variance_groups", "policy_version", "update_skipped",
        "probe_failures", "replica_restarts",
    }
)  # fmt: skip


def step_metrics(report: Any, *, group_size: int | None = None) -> dict[str, float]:
    """verl-named scalars of one step (a StepReport or a metrics.jsonl row); see the module's table.

    ``group_size`` (rollouts per prompt) gives ``response_length/mean``; a value the report lacks is left out."""
    pairs: list[tuple[str, Any]] = [
        ("critic/score/mean", _get(report, "reward_mean")),
        ("critic/rewards/mean", _get(report, "reward_mean")),
        ("actor/pg_loss", _get(report, "loss")),
        ("actor/pg_clipfrac", _get(report, "ppo_clip_frac")),
        ("actor/grad_norm", _get(report, "grad_norm")),
        ("actor/lr", _get(report, "lr")),
        ("actor/ppo_kl", _get(report, "approx_kl")),
        ("actor/entropy", _get(report, "entropy")),
    ]
    tokens, groups = _get(report, "tokens"), _get(report, "groups")
    if group_size and isinstance(tokens, int | float) and isinstance(groups, int) and groups > 0:
        pairs.append(("response_length/mean", tokens / (groups * group_size)))
    for stage, seconds in dict(_get(report, "stage_seconds") or {}).items():
        pairs.append((f"timing_s/{stage}", seconds))
    pairs += [
        ("timing_s/step", _get(report, "step_seconds")),
        ("perf/time_per_step", _get(report, "step_seconds")),
        ("perf/throughput", _get(report, "tokens_per_s")),
        ("cepo/accuracy", _get(report, "accuracy")),
        ("cepo/lambda", _get(report, "lam")),
        ("cepo/delta_frac/positive", _get(report, "delta_pos_frac")),
        ("cepo/delta_frac/negative", _get(report, "delta_neg_frac")),
        ("cepo/weight_clip_frac", _get(report, "weight_clip_frac")),
        ("cepo/abs_advantage/before", _get(report, "abs_adv_before")),
        ("cepo/abs_advantage/after", _get(report, "abs_adv_after")),
        ("cepo/distill_loss", _get(report, "distill_loss")),
        ("cepo/negatives_found", _get(report, "negatives_found")),
        ("cepo/zero_variance_groups", _get(report, "zero_variance_groups")),
        ("cepo/groups", groups),
        ("cepo/response_tokens", tokens),
        ("cepo/policy_version", _get(report, "policy_version")),
        ("cepo/update_skipped", bool(_get(report, "update_skipped", False))),
        ("cepo/probe_failures", _get(report, "probe_failures")),
    ]
    restarts = _get(report, "replica_restarts")
    if isinstance(restarts, Mapping):
        pairs.append(("cepo/replica_restarts", sum(int(v) for v in restarts.values())))
    fields = (
        report.items() if isinstance(report, Mapping) else iter(report)
    )  # a pydantic model: (name, value)
    for key, value in fields:  # a field added to StepReport later shows as cepo/<field>
        if key not in _MAPPED and isinstance(value, int | float):
            pairs.append((f"cepo/{key}", value))
    out = {}
    for key, value in pairs:
        number = _number(value)
        if number is not None:
            out[key] = number
    return out


def eval_metrics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """verl-named scalars of one held-out evaluation, ``{suite: {"samples", "sampled", "sampled_se",
    "greedy", "greedy_se", …}}`` (an eval.jsonl line per suite), plus the ``average`` over the suites."""
    out: dict[str, float] = {}
    sampled: dict[int, list[float]] = {}
    greedy: list[float] = []
    for suite, result in results.items():
        n = int(result.get("samples") or 1)
        for key, name in (
            ("sampled", f"val-core/{suite}/acc/mean@{n}"),
            ("sampled_se", f"val-aux/{suite}/acc/std_err@{n}"),
            ("greedy", f"val-aux/{suite}/acc/greedy"),
            ("greedy_se", f"val-aux/{suite}/acc/greedy_se"),
        ):
            number = _number(result.get(key))
            if number is not None:
                out[name] = number
                if key == "sampled":
                    sampled.setdefault(n, []).append(number)
                elif key == "greedy":
                    greedy.append(number)
    if len(results) > 1:
        for n, values in sampled.items():
            out[f"val-core/average/acc/mean@{n}"] = sum(values) / len(values)
        if greedy:
            out["val-aux/average/acc/greedy"] = sum(greedy) / len(greedy)
    return out


# ---------------------------------------------------------------------------------------------- trackers
class Tracker(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def _missing(tracker: str, pin: str) -> TrackerError:
    return TrackerError(
        f"logging.report_to includes '{tracker}', but the {tracker} package is not installed: "
        f"pip install {pin}, or take '{tracker}' out of logging.report_to"
    )


def check_available(report_to: list[str]) -> None:
    """Raise :class:`TrackerError` naming ``logging.report_to`` and the pip command when a tracker's package
    is missing (checked before the run writes anything)."""
    import importlib.util

    for tracker in report_to:
        if tracker == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise _missing("tensorboard", TENSORBOARD_PIN)
        if tracker == "wandb" and importlib.util.find_spec("wandb") is None:
            raise _missing("wandb", WANDB_PIN)
        if tracker not in TRACKERS:
            raise TrackerError(
                f"logging.report_to: unknown tracker {tracker!r}; known: {', '.join(TRACKERS)}"
            )


class TensorBoardTracker:
    """Event files in ``log_dir``; ``purge_step``: the first global step a resumed run writes again (TensorBoard
    drops earlier sessions' events from that step on)."""

    def __init__(self, log_dir: str | Path, *, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard", TENSORBOARD_PIN) from None
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a killed run keeps every step it logged

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run with its files in ``<run_dir>/wandb/``; the mode follows ``WANDB_MODE`` (``offline``: no
    network, ``wandb sync <run_dir>/wandb/offline-run-*`` later)."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        run_id: str,
        name: str,
        project: str,
        config: Mapping[str, Any],
        resume: bool,
    ) -> None:
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", WANDB_PIN) from None
        run_dir = Path(run_dir)
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=project,
                name=name,
                id=re.sub(r"[^A-Za-z0-9._-]", "-", run_id)[:128],
                dir=str(run_dir),
                config=dict(config),
                resume="allow" if resume else None,
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as exc:  # no API key, no network, …: one error line, not a traceback
            raise TrackerError(
                f"logging.report_to: wandb could not start a run ({type(exc).__name__}: {exc}); without "
                "network or a W&B login set WANDB_MODE=offline (files in the run folder's wandb/, "
                "`wandb sync` uploads them later)"
            ) from exc

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The run's trackers (none when ``logging.report_to`` is empty). ``resume_step``: the checkpoint's step a
    resumed run continues from."""

    def __init__(self, trackers: list[Tracker] | None = None, *, group_size: int | None = None) -> None:
        self.trackers = list(trackers or [])
        self.group_size = group_size

    @classmethod
    def open(
        cls,
        report_to: list[str],
        run_dir: Path,
        *,
        run_id: str,
        name: str,
        project: str = "cepo",
        config: Mapping[str, Any] | None = None,
        group_size: int | None = None,
        resume_step: int | None = None,
    ) -> Trackers:
        check_available(report_to)
        opened: list[Tracker] = []
        try:
            for tracker in report_to:
                if tracker == "tensorboard":
                    purge = None if resume_step is None else resume_step + 1
                    opened.append(TensorBoardTracker(run_dir / "tensorboard", purge_step=purge))
                elif tracker == "wandb":
                    opened.append(
                        WandbTracker(
                            run_dir,
                            run_id=run_id,
                            name=name,
                            project=project,
                            config=config or {},
                            resume=resume_step is not None,
                        )
                    )
        except BaseException:
            for tracker in opened:
                tracker.close()
            raise
        return cls(opened, group_size=group_size)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _log(self, metrics: Mapping[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(metrics, step)

    def log_step(self, report: Any) -> None:
        """One step report, at global step ``report.step + 1`` (steps done)."""
        if self.trackers:
            self._log(step_metrics(report, group_size=self.group_size), int(_get(report, "step")) + 1)

    def log_eval(self, steps_done: int, results: Mapping[str, Mapping[str, Any]]) -> None:
        """One held-out evaluation after ``steps_done`` steps."""
        if self.trackers and results:
            self._log(eval_metrics(results), steps_done)

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        errors = []
        for tracker in trackers:
            try:
                tracker.close()
            except Exception as exc:  # close every one; the first failure is raised after
                errors.append(exc)
        if errors:
            raise errors[0]
