"""``cepo train`` and ``cepo bench``: a whole run around the :class:`~cepo.controller.Trainer`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from cepo.config import RunConfig
from cepo.controller import Trainer, median_stages
from cepo_proto import Problem
from cepo_proto.pipeline import StepReport

__all__ = ["bench", "eval_problems", "train"]


def eval_problems(cfg: RunConfig) -> dict[str, list[Problem]]:
    """The held-out problems of each configured suite (disjoint from training by construction of the task)."""
    suites = list(cfg.data.eval_suites)
    if not suites:
        return {}
    seed = cfg.data.seed + 1
    if cfg.data.source == "arithmetic":
        from cepo.tasks import arithmetic

        return {s: arithmetic.generate(s, cfg.data.eval_size, seed) for s in suites}
    if cfg.data.source == "reasoning_gym":
        from cepo.tasks import reasoning_gym

        return {s: reasoning_gym.generate(s, cfg.data.eval_size, seed) for s in suites}
    from cepo.data import from_config

    return {s: from_config(cfg.data, split=s).problems[: cfg.data.eval_size] for s in suites}


def _step_line(report: StepReport) -> str:
    st = report.stage_seconds
    evidence = ""
    if report.method != "grpo":
        evidence = f" Δ+ {report.delta_pos_frac:.2f} Δ− {report.delta_neg_frac:.2f} clip {report.weight_clip_frac:.2f}"
    return (
        f"step {report.step + 1:>3}  reward {report.reward_mean:.3f}  acc {report.accuracy:.3f}  "
        f"λ {report.lam:.3f}{evidence}  v{report.policy_version}  "
        f"gen {st['gen']:.2f}s teacher {st['teacher']:.2f}s update {st['old_logp'] + st['update']:.2f}s "
        f"sync {st['sync']:.2f}s  ({report.step_seconds:.2f}s, {report.tokens_per_s:.0f} tok/s)"
    )


def _evaluate(trainer: Trainer, suites: dict[str, list[Problem]], samples: int) -> dict[str, float]:
    scores = {name: trainer.evaluate(problems, samples=samples) for name, problems in suites.items()}
    if scores:
        scores["average"] = sum(scores.values()) / len(scores)
    return scores


def train(
    cfg: RunConfig, run_dir: Path, *, steps: int | None = None, console: Console | None = None
) -> dict[str, Any]:
    """Train, evaluate base and trained policy on the held-out suites, write ``summary.json``; return it."""
    console = console or Console()
    steps = steps if steps is not None else cfg.algorithm.steps
    trainer = Trainer(
        cfg, run_dir, on_step=lambda r: console.print(_step_line(r), highlight=False), log=console.print
    )
    suites = eval_problems(cfg)
    try:
        with console.status("starting services (Ray, rollout and teacher engines, learner ranks)…"):
            started = time.perf_counter()
            trainer.start()
        console.print(f"services up in {time.perf_counter() - started:.1f}s → {run_dir}")
        with console.status("evaluating the base policy…"):
            base = _evaluate(trainer, suites, cfg.data.eval_samples)
        reports = trainer.train(steps)
        with console.status("evaluating the trained policy…"):
            trained = _evaluate(trainer, suites, cfg.data.eval_samples)
    finally:
        trainer.close()
    summary = {
        "run_dir": str(run_dir),
        "method": cfg.algorithm.method,
        "steps": len(reports),
        "policy_version": reports[-1].policy_version if reports else 0,
        "base": base,
        "trained": trained,
        "timing": median_stages(reports) if reports else {},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if suites:
        console.print("held-out accuracy (temperature 1.0):")
        for name in base:
            console.print(f"  {name:<16} base {base[name]:.3f}  →  trained {trained[name]:.3f}")
    return summary


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
            result[method] = median_stages(trainer.train(steps))
        finally:
            trainer.close()
    result["cepo_over_grpo_step"] = result["cepo"]["step_s"] / result["grpo"]["step_s"]
    return result
