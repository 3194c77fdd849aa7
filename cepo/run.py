"""``cepo train`` and ``cepo bench``: a whole run around the :class:`~cepo.controller.Trainer`."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from cepo.algorithm.methods import get_method
from cepo.config import RunConfig
from cepo.controller import RunInterrupted, Trainer
from cepo.evaluate import eval_problems
from cepo.plots import eval_by_step, load_eval, load_metrics
from cepo.progress import Progress, duration, ticking
from cepo.stats import median_stages
from cepo_proto import Problem
from cepo_proto.pipeline import StepReport

__all__ = ["bench", "train"]


def _step_line(report: StepReport, progress: str | None = None) -> str:
    """One step on the console; ``progress`` (``12/30 · ETA 3m05s``) replaces the bare step number."""
    st = report.stage_seconds
    method, entry = "", get_method(report.method)
    if entry.scores_evidence:
        method = (
            f"λ {report.lam:.3f} Δ+ {report.delta_pos_frac:.2f} Δ− {report.delta_neg_frac:.2f} "
            f"clip {report.weight_clip_frac:.2f}  "
        )
    elif entry.learner_loss is not None:
        method = f"distill {report.distill_loss:.4f}  "
    return (
        f"step {progress or f'{report.step + 1:>3}'}  reward {report.reward_mean:.3f}  acc {report.accuracy:.3f}  "
        f"{method}v{report.policy_version}→{report.adapter_version}  "
        f"gen {st['gen']:.2f}s teacher {st['teacher']:.2f}s update {st['old_logp'] + st['update']:.2f}s "
        f"sync {st['sync']:.2f}s  ({report.step_seconds:.2f}s, {report.tokens_per_s:.0f} tok/s)"
    )


def _evaluate(
    trainer: Trainer, suites: dict[str, list[Problem]], cfg: RunConfig, run_dir: Path, steps_done: int
) -> dict[str, dict[str, float]]:
    """Evaluate every suite, append one eval.jsonl line per suite, return {suite: result}."""
    results = {
        name: trainer.evaluate(problems, samples=cfg.data.eval_samples, greedy=cfg.eval.greedy)
        for name, problems in suites.items()
    }
    with (run_dir / "eval.jsonl").open("a") as fh:
        for name, result in results.items():
            line = {"step": steps_done, "policy_version": trainer.version, "suite": name, **result}
            fh.write(json.dumps(line) + "\n")
    trainer.recorder.record_eval(steps_done, results)  # logging.report_to: TensorBoard, W&B
    return results


def _averaged(results: dict[str, dict[str, float]], key: str) -> dict[str, float]:
    scores = {name: r[key] for name, r in results.items() if key in r}
    if scores:
        scores["average"] = sum(scores.values()) / len(scores)
    return scores


def _previous_evaluations(run_dir: Path, upto: int) -> dict[int, dict[str, dict[str, float]]]:
    """A resumed run's eval.jsonl, cut after step ``upto`` (later lines came from steps that are redone)."""
    kept = [row for row in load_eval(run_dir) if row["step"] <= upto]
    if kept:
        (run_dir / "eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in kept))
    return eval_by_step(kept)


@contextlib.contextmanager
def _stop_on_signals(trainer: Trainer, console: Console) -> Iterator[Callable[[], None]]:
    """SIGINT / SIGTERM: finish the current step, checkpoint, record the run as interrupted; a second signal
    interrupts at once. Yields ``arm``, which (re)installs the handlers: call it again after Ray has started,
    since Ray's core worker installs its own SIGTERM handler (which aborts the process)."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    def handler(signum: int, _frame: Any) -> None:
        if trainer.stop_requested:
            raise KeyboardInterrupt
        console.print(f"{signal.Signals(signum).name}: stopping after the current step (again: at once)")
        trainer.request_stop()

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def arm() -> None:
        for sig in previous:
            signal.signal(sig, handler)

    arm()
    try:
        yield arm
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def train(
    cfg: RunConfig,
    run_dir: Path,
    *,
    steps: int | None = None,
    console: Console | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[StepReport], bool | None] | None = None,
) -> dict[str, Any]:
    """Train ``steps`` steps in all (default ``algorithm.steps``; a resumed run continues to that total),
    evaluating the held-out suites before, every ``eval.every`` steps and after (eval.jsonl); write
    ``summary.json`` and return it.

    ``on_step(report)`` is called after each step (after its console line); when it returns False the run
    ends after that step as if it had been its last: checkpointed, evaluated and summarised."""
    console = console or Console()
    total = steps if steps is not None else cfg.algorithm.steps
    ended_early = threading.Event()
    progress = Progress(total)
    began = time.perf_counter()

    def step_done(report: StepReport) -> None:
        progress.done = report.step  # steps done before this one (a resumed run starts past 0)
        console.print(_step_line(report, progress.advance()), highlight=False)
        if on_step is not None and on_step(report) is False:
            ended_early.set()
            trainer.request_stop()

    from cepo.models.tiny_vl import ensure_tiny_vl

    ensure_tiny_vl(cfg.model.path, log=console.print)  # configs/tiny-vl.yaml's model and data, on first use
    trainer = Trainer(cfg, run_dir, on_step=step_done, log=console.print)
    suites = eval_problems(cfg)
    evaluated: dict[int, dict[str, dict[str, float]]] = {}  # steps done → results

    def evaluate(steps_done: int) -> dict[str, dict[str, float]]:
        if steps_done not in evaluated:
            with ticking(console, f"evaluating the policy after {steps_done} steps on {', '.join(suites)}"):
                evaluated[steps_done] = _evaluate(trainer, suites, cfg, run_dir, steps_done)
            if suites:
                line = "  ".join(
                    f"{k} {v:.3f}" for k, v in _averaged(evaluated[steps_done], "sampled").items()
                )
                console.print(f"held-out after {steps_done} steps: {line}", highlight=False)
        return evaluated[steps_done]

    error: BaseException | None = None
    try:
        with _stop_on_signals(trainer, console) as arm:
            with ticking(console, "starting services (Ray, rollout and teacher engines, learner ranks)"):
                started = time.perf_counter()
                trainer.start(resume=resume, overwrite=overwrite)
            arm()
            console.print(
                f"services up in {time.perf_counter() - started:.1f}s → {run_dir} (engine logs: {run_dir}/logs/)",
                highlight=False,
            )
            if resume:
                evaluated.update(_previous_evaluations(run_dir, trainer.step_index))
            else:
                (run_dir / "eval.jsonl").unlink(missing_ok=True)
            base = evaluated.get(0, {}) if resume else evaluate(0)  # never the resumed adapter as "base"
            every = cfg.eval.every if suites else 0
            todo = max(0, total - trainer.step_index)
            progress.done = trainer.step_index
            progress.start()
            try:
                trainer.train(todo, every=every, callback=evaluate if every else None)
            except RunInterrupted:
                if not ended_early.is_set():
                    raise
            trained = evaluate(trainer.step_index)  # already done when the last step was an evaluation step
    except BaseException as exc:
        error = exc
        raise
    finally:
        trainer.close(error)
    reports = load_metrics(run_dir)  # every step of the run, a resumed run's earlier ones too
    summary = {
        "run_dir": str(run_dir),
        "run_id": trainer.run_id,
        "method": cfg.algorithm.method,
        "seed": cfg.seed,
        "steps": len(reports),
        "policy_version": reports[-1]["adapter_version"] if reports else 0,
        "eval_samples": cfg.data.eval_samples,
        "base": _averaged(base, "sampled"),
        "trained": _averaged(trained, "sampled"),
        "base_greedy": _averaged(base, "greedy"),
        "trained_greedy": _averaged(trained, "greedy"),
        "timing": median_stages(reports) if reports else {},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if suites:
        console.print(f"held-out accuracy (temperature {cfg.eval.temperature}; greedy in brackets):")
        for name in summary["base"]:
            b, t = summary["base"][name], summary["trained"][name]
            bg, tg = summary["base_greedy"].get(name), summary["trained_greedy"].get(name)
            greedy = f"  [{bg:.3f} → {tg:.3f}]" if bg is not None else ""
            console.print(f"  {name:<16} base {b:.3f}  →  trained {t:.3f}{greedy}", highlight=False)
    _print_summary(console, summary, run_dir, time.perf_counter() - began)
    return summary


def _print_summary(console: Console, summary: dict[str, Any], run_dir: Path, seconds: float) -> None:
    """Where everything of the finished run is, in a few lines."""
    timing = summary.get("timing") or {}
    step_s = f", median step {timing['step_s']:.1f}s" if "step_s" in timing else ""
    console.print(
        f"done: {summary['steps']} steps ({summary['method']}, policy v{summary['policy_version']}) in "
        f"{duration(seconds)}{step_s}",
        highlight=False,
    )
    for label, path in (
        ("run", run_dir),
        ("adapter", run_dir / "adapter"),
        ("summary", run_dir / "summary.json"),
        ("logs", run_dir / "logs"),
    ):
        if path.exists():
            console.print(f"  {label:<8} {path}", highlight=False, soft_wrap=True)
    console.print(f"  inspect: cepo runs show {run_dir}", highlight=False, soft_wrap=True)


def bench(cfg: RunConfig, run_root: Path, *, steps: int, console: Console | None = None) -> dict[str, Any]:
    """CEPO and GRPO on the same config: medians over the steps after a warm-up step."""
    console = console or Console(stderr=True)
    result: dict[str, Any] = {}
    for method in ("cepo", "grpo"):
        method_cfg = cfg.model_copy(update={"algorithm": cfg.algorithm.model_copy(update={"method": method})})
        trainer = Trainer(
            method_cfg, run_root / method, on_step=lambda r: console.print(_step_line(r), highlight=False)
        )
        try:
            trainer.start()
            result[method] = median_stages([r.model_dump() for r in trainer.train(steps)])
        finally:
            trainer.close()
    result["cepo_over_grpo_step"] = result["cepo"]["step_s"] / result["grpo"]["step_s"]
    return result
