"""One run of the control API: a Ray actor that drives the :class:`~cepo.controller.Trainer` over the services.

The actor is threaded: the training loop runs in a thread of its own, so status, stop and scale calls are
answered while a step is under way. Scaling requests are applied between steps (the latest count asked for a
role wins); a stop request finishes the current step, checkpoints and ends the run (the ledger records it as
interrupted, the API as ``stopped``). After every step and every change of replica counts the actor asks each
rollout and teacher replica what it serves, keeps that for the status, and appends it to the run folder's
``replicas.jsonl`` (one line per step: the learner's version and checksum, and each replica's).
"""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Any

__all__ = ["STATES", "RunActor"]

STATES = ("starting", "running", "finished", "failed", "stopped")
SCALABLE = ("rollout", "teacher")
METRIC_KEYS = (
    "step",
    "reward_mean",
    "accuracy",
    "lam",
    "policy_version",
    "adapter_version",
    "adapter_checksum",
    "loss",
    "grad_norm",
    "tokens",
    "tokens_per_s",
    "step_seconds",
    "stage_seconds",
    "replica_restarts",
)


class RunActor:
    """Use as ``ray.remote(max_concurrency=8, num_cpus=0)(RunActor).remote(run_id, config, run_dir, steps, cwd)``.

    ``config`` is a validated ``RunConfig`` as a plain dict; ``cwd`` is the API's working directory (relative
    paths in the config mean the same there and here)."""

    def __init__(
        self, run_id: str, config: dict[str, Any], run_dir: str, steps: int | None, cwd: str | None = None
    ) -> None:
        from cepo.config import RunConfig

        if cwd and os.path.isdir(cwd):  # relative paths of the config mean what they meant to the API
            os.chdir(cwd)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.run_id, self.run_dir = run_id, Path(run_dir)
        self.cfg = RunConfig.model_validate(config)
        self.steps = steps if steps is not None else self.cfg.algorithm.steps
        self.state = "starting"
        self.error: str | None = None
        self.step = 0
        self.version: int | None = None
        self.checksum: str | None = None
        self.last_metrics: dict[str, Any] = {}
        self.replicas: dict[str, list[dict[str, Any]]] = {role: [] for role in SCALABLE}
        self.scale_error: str | None = None
        self._pending: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.trainer: Any = None
        self._thread = threading.Thread(target=self._run, name=f"run-{run_id}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ API
    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "run_id": self.run_id,
                "run_dir": str(self.run_dir),
                "state": self.state,
                "step": self.step,
                "steps": self.steps,
                "version": self.version,
                "replicas": {role: [dict(r) for r in rows] for role, rows in self.replicas.items()},
                "last_metrics": dict(self.last_metrics),
                "error": self.error,
                "pending_scale": dict(self._pending),
                "scale_error": self.scale_error,
            }

    def stop(self) -> dict[str, Any]:
        """Finish the current step, checkpoint, stop (the state becomes ``stopped``)."""
        self._stop.set()
        if self.trainer is not None:
            self.trainer.request_stop()
        return self.status()

    def check_scale(self, counts: dict[str, int]) -> str | None:
        """Why ``counts`` cannot be had (None: it can): a role the run has no replicas of, or more than the
        cluster offers."""
        from cepo.algorithm.methods import get_method
        from cepo.controller.cluster import role_capacity

        if self.state in ("finished", "failed", "stopped"):
            return f"the run is {self.state}"
        for role, count in counts.items():
            if role == "teacher" and not get_method(self.cfg.algorithm.method).scores_evidence:
                return f"teacher: method {self.cfg.algorithm.method} uses no teacher replicas"
            capacity = role_capacity(role)
            if capacity is not None and count > capacity:
                return f"{role}: {count} replicas asked, the cluster offers {capacity:g} {role!r} units"
        return None

    def scale(self, counts: dict[str, int]) -> dict[str, Any]:
        """Ask for ``counts`` replicas per role; applied before the next step."""
        with self._lock:
            self._pending.update({r: int(n) for r, n in counts.items() if r in SCALABLE})
            self.scale_error = None
        return self.status()

    def wait(self, timeout_s: float | None = None) -> str:
        """Block until the run ends (or ``timeout_s``); its state."""
        self._thread.join(timeout_s)
        return self.state

    # ------------------------------------------------------------------ the loop
    def _set(self, **values: Any) -> None:
        with self._lock:
            for key, value in values.items():
                setattr(self, key, value)

    def _run(self) -> None:
        from cepo.controller import RunInterrupted, Trainer

        error: BaseException | None = None
        trainer = None
        try:
            trainer = Trainer(self.cfg, self.run_dir, log=self._log)
            trainer.run_id = trainer.recorder.run_id = self.run_id
            trainer.last_step = self.steps - 1  # async mode generates nothing ahead past it
            self.trainer = trainer
            trainer.start()
            self._set(state="running", version=trainer.version, checksum=trainer.checksum)
            self._observe(trainer, None)
            while trainer.step_index < self.steps and not self._stop.is_set():
                self._apply_scaling(trainer)
                if self._stop.is_set():
                    break
                report = trainer.step()
                self._set(
                    step=trainer.step_index,
                    version=trainer.version,
                    checksum=trainer.checksum,
                    last_metrics={k: report.model_dump().get(k) for k in METRIC_KEYS},
                )
                self._observe(trainer, report.step)
            if trainer.step_index % self.cfg.logging.checkpoint_every != 0 and trainer.step_index > 0:
                trainer.checkpoint()  # the last step is always saved
            if self._stop.is_set() and trainer.step_index < self.steps:
                error = RunInterrupted(f"stopped through the API after step {trainer.step_index}")
        except BaseException as exc:
            error = exc
            self._log("".join(traceback.format_exception(exc)))
        finally:
            if trainer is not None:
                try:
                    trainer.close(error)
                except Exception as exc:
                    self._log(f"close failed: {exc}")
            if error is None:
                state = "finished"
            elif isinstance(error, RunInterrupted):
                state = "stopped"
            else:
                state = "failed"
            message = None if error is None or state == "stopped" else f"{type(error).__name__}: {error}"
            self._set(state=state, error=message)

    def _apply_scaling(self, trainer: Any) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        changed = False
        for role, count in pending.items():
            if len(trainer.pools.pools[role]) == count:
                continue
            try:
                trainer.pools.scale(role, count)
                changed = True
                self._log(f"scaled {role} to {count} replicas before step {trainer.step_index + 1}")
            except Exception as exc:
                self._set(scale_error=f"{role} → {count}: {type(exc).__name__}: {exc}")
                self._log(f"scaling {role} to {count} failed: {exc}")
        if changed and self.cfg.logging.metrics_port is not None:
            trainer.recorder.targets(trainer.pools.targets)  # prometheus_targets.json follows the replicas
        if changed:
            self._observe(trainer, None)

    def _observe(self, trainer: Any, step: int | None) -> None:
        """Ask every rollout and teacher replica what it serves; keep it for the status; with ``step``, append
        it to replicas.jsonl."""
        replicas = trainer.pools.replicas()
        payload = trainer.pools.serving
        for role, rows in replicas.items():
            served = payload.get(role)
            for row in rows:
                row["healthy"] = bool(
                    row["healthy"]
                    and served is not None
                    and (row["version"], row["checksum"]) == (served.version, served.checksum)
                )
        self._set(replicas=replicas)
        if step is None:
            return
        line = {
            "step": step,
            "time": time.time(),
            "learner": {"version": trainer.version, "checksum": trainer.checksum},
            "teacher_serves": None
            if payload.get("teacher") is None
            else {"version": payload["teacher"].version, "checksum": payload["teacher"].checksum},
            "counts": {role: len(rows) for role, rows in replicas.items()},
            "replicas": replicas,
        }
        with (self.run_dir / "replicas.jsonl").open("a") as fh:
            fh.write(json.dumps(line) + "\n")

    def _log(self, text: str) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with (self.run_dir / "api.log").open("a") as fh:
                fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        except OSError:
            pass
