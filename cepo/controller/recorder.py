"""The step recorder: everything a run leaves behind — the run folder (config, metrics.jsonl, per-token evidence,
checkpoints, the latest adapter, made self-contained by :mod:`cepo.artifacts`), the Redis ledger, the
controller's Prometheus metrics and scrape targets, and the experiment trackers of ``logging.report_to``
(:mod:`cepo.trackers`: TensorBoard, W&B)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cepo import telemetry
from cepo.algorithm.advantages import evidence_delta, evidence_weights
from cepo.config import RunConfig, dump_config
from cepo.controller.state import StepState
from cepo.trackers import Trackers, check_available
from cepo_proto import AdapterPayload
from cepo_proto.pipeline import StepReport

__all__ = ["Checkpoint", "CheckpointError", "RunFolderError", "StepRecorder", "load_checkpoint"]

RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints")  # any of them: the folder holds a run


class RunFolderError(ValueError):
    """The run folder already holds another run (and neither resume nor overwrite was asked for)."""


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, truncated or altered; names the file."""


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: its folder and state.json (step, versions, λ, cursor, run id, file digests)."""

    path: Path
    state: dict[str, Any]

    def adapter(self, folder: str = "adapter") -> AdapterPayload:
        key = "adapter_version" if folder == "adapter" else "teacher_version"
        return AdapterPayload.from_dir(int(self.state[key]), self.path / folder)

    def learner_state(self) -> dict[str, Any]:
        return torch.load(self.path / "learner.pt", map_location="cpu", weights_only=False)


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """The run's latest checkpoint, every file checked against the digests in its state.json.

    Never a silent fresh start: no checkpoint, or a damaged one, is an error naming the folder or file."""
    folder = run_dir / "checkpoints"
    done = sorted(p for p in folder.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    if not done:
        raise CheckpointError(f"{run_dir}: no checkpoint to resume from (checkpoints/step_NNNNN/)")
    path = done[-1]
    state_file = path / "state.json"
    try:
        state = json.loads(state_file.read_text())
        files = state["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{state_file}: unreadable or incomplete ({exc})") from None
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from the checkpoint")
        if _sha256(file) != digest:
            raise CheckpointError(f"{file}: truncated or altered (its sha256 differs from state.json's)")
    return Checkpoint(path, state)


def _finite(values: torch.Tensor) -> list[float]:
    """JSON-safe floats: an impossible token's log-prob (−inf) becomes −1e4, NaN 0."""
    return torch.nan_to_num(values.float(), nan=0.0, neginf=-1e4, posinf=1e4).tolist()


class StepRecorder:
    """Writes one run's records; every write is atomic (temporary file + rename) or an append of whole lines."""

    def __init__(self, cfg: RunConfig, run_dir: Path, run_id: str, log: Callable[[str], None]) -> None:
        self.cfg, self.run_dir, self.run_id, self.log = cfg, run_dir, run_id, log
        self.ledger = None
        self._ledger_open = False  # a ledger record was started and not yet finished
        self.metrics_path = run_dir / "metrics.jsonl"
        self.trackers = Trackers()  # logging.report_to, opened by open()
        self._tokenizer: dict[str, bytes] | None = None  # the base tokenizer's files, for adapter folders

    def open(self, *, resume_step: int | None = None, overwrite: bool = False) -> None:
        """Reach the ledger first (a configured but unreachable Redis is an error before any service starts),
        then write the resolved config and start the ledger record. A folder that holds another run is refused
        unless the run is resumed there (``resume_step``: the step of the checkpoint it continues from) or
        ``overwrite`` (which removes that run's records first)."""
        cfg, resume = self.cfg, resume_step is not None
        check_available(cfg.logging.report_to)  # a tracker's package missing: an error before any write
        taken = [name for name in RUN_FILES if (self.run_dir / name).exists()]
        if taken and not resume and not overwrite:
            raise RunFolderError(
                f"{self.run_dir} already holds a run ({', '.join(taken)}): resume it with --resume, "
                "choose another folder, or pass --overwrite to replace it"
            )
        if cfg.logging.redis_url:
            from cepo.ledger import BufferedLedger, RunLedger

            # reachable now or an error now; later outages are queued (and spooled in the run folder)
            self.ledger = BufferedLedger(RunLedger(cfg.logging.redis_url), self.run_dir, log=self.log)
        if taken and overwrite and not resume:
            for name in (
                *RUN_FILES,
                "steps",
                "adapter",
                "eval.jsonl",
                "summary.json",
                "prometheus_targets.json",
                "tensorboard",
                "wandb",
            ):
                target = self.run_dir / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        if not resume:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        if self.ledger is not None:
            record = {
                "name": cfg.name,
                "method": cfg.algorithm.method,
                "config": cfg.model_dump(mode="json"),
                "run_dir": str(self.run_dir.resolve()),
            }
            if resume_step is None:
                self.ledger.start_run(self.run_id, **record)
            else:
                self.ledger.resume_run(self.run_id, step=resume_step, **record)
            self._ledger_open = True
        if cfg.logging.report_to:
            self.trackers = Trackers.open(
                cfg.logging.report_to,
                self.run_dir,
                run_id=self.run_id,
                name=cfg.name,
                project=cfg.logging.wandb_project,
                config=cfg.model_dump(mode="json"),
                group_size=cfg.rollout.group_size,
                resume_step=resume_step,
            )

    def rewind(self, step: int) -> None:
        """Forget what came after the checkpoint of ``step``: later metrics lines and token dumps (a step that
        ran but was never checkpointed is run again)."""
        if self.metrics_path.is_file():
            lines = self.metrics_path.read_text().splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] < step]
            tmp = self.metrics_path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.metrics_path)
        for dump in (self.run_dir / "steps").glob("step_*.json"):
            if int(dump.stem.removeprefix("step_")) >= step:
                dump.unlink()

    def targets(self, service_targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Serve the controller's /metrics and write every endpoint to prometheus_targets.json."""
        base = self.cfg.logging.metrics_port
        host, port = telemetry.endpoint(telemetry.service_port(base, "controller"))
        targets = [{"service": "controller", "host": host, "port": port, "replica": "controller"}]
        targets += service_targets
        for target in targets:
            target["run"] = self.run_id
        telemetry.write_prometheus_targets(self.run_dir / "prometheus_targets.json", targets)
        return targets

    def record(self, report: StepReport, samples: Sequence[dict[str, Any]]) -> None:
        """metrics.jsonl, the controller's gauges and the ledger (with a few sample rollouts)."""
        with self.metrics_path.open("a") as fh:
            fh.write(report.model_dump_json() + "\n")
        if self.cfg.logging.metrics_port is not None:
            telemetry.observe_step(report)
        if self.ledger is not None:
            self.ledger.record_step(self.run_id, report.model_dump(mode="json"), list(samples))
        self.trackers.log_step(report)

    def record_eval(self, steps_done: int, results: dict[str, dict[str, Any]]) -> None:
        """A held-out evaluation after ``steps_done`` steps ({suite: result}, as eval.jsonl has it): to the
        trackers and the ``cepo_heldout_accuracy`` gauge (eval.jsonl itself is written by
        :func:`cepo.run.train`)."""
        if self.cfg.logging.metrics_port is not None:
            telemetry.observe_eval(results)
        self.trackers.log_eval(steps_done, results)

    def dump_tokens(self, ev: StepState, policy_version: int, tokenizer: Any) -> None:
        """steps/step_NNNNN.json: per-token evidence of some of the step's rollouts (``cepo inspect``)."""
        limit = self.cfg.logging.token_dump_rollouts
        if limit <= 0:
            return
        n_rows = len(ev.rollouts)
        eps_w = self.cfg.algorithm.eps_w
        scored = torch.zeros(n_rows, dtype=torch.bool) if ev.logp_pos is None else (ev.seq_adv != 0)
        order = [i for i in range(n_rows) if scored[i]] + [i for i in range(n_rows) if not scored[i]]
        weights = {}
        if ev.logp_pos is not None:
            delta = evidence_delta(ev.logp_pos, ev.logp_neg, ev.mask)
            weights = {
                "delta": delta,
                "w_cepo": evidence_weights(ev.seq_adv, delta, eps_w),
                "w_rlsd": evidence_weights(
                    ev.seq_adv, evidence_delta(ev.logp_pos, ev.old_logp, ev.mask), eps_w
                ),
            }
        rows = []
        for i in sorted(order[:limit]):
            r = ev.rollouts[i]
            g, n = r.prompt_index, len(r.response_ids)
            choice = ev.row_negatives[i] if ev.row_negatives else ev.negatives.get(g)
            row = {
                "group": g,
                "prompt": ev.prompt_texts[g],
                "answer": ev.problems[g].answer,
                "negative": None if choice is None else choice.answer,
                "response": r.text,
                "reward": ev.verdicts[i].reward,
                "correct": ev.verdicts[i].correct,
                "advantage": float(ev.seq_adv[i]),
                "scored": bool(scored[i]),
                "tokens": [tokenizer.decode([t]) for t in r.response_ids],
                "logp_student": _finite(ev.old_logp[i, :n]),
            }
            for key, tensor in (("logp_pos", ev.logp_pos), ("logp_neg", ev.logp_neg), *weights.items()):
                row[key] = _finite(tensor[i, :n]) if tensor is not None and scored[i] else None
            rows.append(row)
        data = {
            "step": ev.index,
            "method": self.cfg.algorithm.method,
            "lam": ev.lam,
            "eps_w": eps_w,
            "policy_version": policy_version,
            "negative_scope": self.cfg.teacher.negative_scope,
            # each group's problem (id and metadata, e.g. the arithmetic task's operands), for offline analysis
            "problems": {str(g): {"id": p.id, "metadata": p.metadata} for g, p in enumerate(ev.problems)},
            "rollouts": rows,
        }
        folder = self.run_dir / "steps"
        folder.mkdir(exist_ok=True)
        path = folder / f"step_{ev.index:05d}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, allow_nan=False, default=_plain))
        tmp.replace(path)

    def checkpoint(
        self,
        step: int,
        payload: AdapterPayload,
        learner_state: dict[str, Any],
        state: dict[str, Any],
        teacher: AdapterPayload | None = None,
    ) -> Path:
        """checkpoints/step_NNNNN/: the PEFT adapter, the learner's training state (learner.pt), the teacher's
        adapter when it serves another version than the actor's, and state.json with the sha256 of every file.
        Written into a temporary folder, then renamed; adapter/ is the latest adapter."""
        final = self.run_dir / "checkpoints" / f"step_{step:05d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        payload.write_to(tmp / "adapter")
        self._complete_adapter(tmp / "adapter", step, payload.version)
        if teacher is not None:
            teacher.write_to(tmp / "teacher_adapter")
        torch.save(learner_state, tmp / "learner.pt")
        files = {str(f.relative_to(tmp)): _sha256(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
        record = {
            "step": step,
            "adapter_version": payload.version,
            "adapter_checksum": payload.checksum,
            "teacher_version": None if teacher is None else teacher.version,
            "run_id": self.run_id,
            **state,
            "files": files,
        }
        (tmp / "state.json").write_text(json.dumps(record, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        latest = self.run_dir / "adapter"
        shutil.rmtree(latest, ignore_errors=True)
        shutil.copytree(final / "adapter", latest)
        if self.ledger is not None:
            self.ledger.add_checkpoint(self.run_id, step, str(final.resolve()))
        return final

    def _complete_adapter(self, folder: Path, step: int, version: int) -> None:
        """The adapter folder loads on its own: absolute base path, tokenizer files, README.md model card."""
        from cepo.algorithm.methods import get_method
        from cepo.artifacts import complete_adapter, tokenizer_files

        cfg = self.cfg
        if self._tokenizer is None:
            try:
                self._tokenizer = tokenizer_files(cfg.model.path)
            except Exception as exc:  # the adapter itself is still complete
                self._tokenizer = {}
                self.log(f"adapter folders get no tokenizer files: {cfg.model.path}: {exc}")
        method = get_method(cfg.algorithm.method)
        settings = {"learning rate": cfg.learner.lr if cfg.learner.lr is not None else method.learning_rate}
        if method.scores_evidence:
            algo = cfg.algorithm
            settings.update(
                {"λ₀ (lambda0)": algo.lambda0, "λ schedule": algo.lambda_schedule, "ε_w": algo.eps_w}
            )
        settings.update({"seed": cfg.seed, "data": cfg.data.source})
        complete_adapter(
            folder,
            tokenizer=self._tokenizer,
            card={
                "method": method.name,
                "method_display": method.display,
                "step": step,
                "version": version,
                "run_id": self.run_id,
                "run_name": cfg.name,
                "settings": settings,
            },
        )

    def finish(self, error: BaseException | None) -> None:
        """The trackers are closed and the ledger records how the run ended (``error``: what stopped it)."""
        try:
            self.trackers.close()
        except Exception as exc:  # the run folder still holds everything
            self.log(f"trackers: could not close cleanly: {exc}")
        if not self._ledger_open:
            return
        self._ledger_open = False
        status = "finished" if error is None else "failed"
        if isinstance(error, KeyboardInterrupt):
            status = "interrupted"
        try:
            self.ledger.finish(
                self.run_id, status, None if error is None else f"{type(error).__name__}: {error}"
            )
            if not self.ledger.flush(timeout_s=10):
                self.log(f"ledger: {self.ledger.pending} writes still queued in {self.ledger.spool_path}")
        except Exception as exc:  # the run folder still holds everything
            self.log(f"ledger: could not record the end of the run: {exc}")


def _plain(value: Any) -> Any:
    """JSON for what ``json`` does not know: numbers (numpy scalars) as floats, anything else as its text."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
