"""Fault figures for docs/reliability.md: replicas killed by pid mid-run, a learner rank killed and the run
resumed, compared with the uninterrupted run. Prints one JSON object (and writes it with --out).

    python bench/faults.py --model models/tiny-arith --out bench/results/faults_cpu.json

The tiny policy, the transformers rollout and teacher engines (deterministic per request seed), one learner rank,
4 prompts × 4 rollouts per step, on a local Ray.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console

from cepo.config import load_config
from cepo.controller import Trainer
from cepo.run import train

REPO = Path(__file__).resolve().parents[1]


def config(model: str, steps: int, *extra: str):
    return load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"model.path={model}",
            "rollout.backend=transformers",
            "teacher.backend=transformers",
            "rollout.replicas=2",
            "teacher.replicas=1",
            "learner.ranks=1",
            "rollout.prompts_per_step=4",
            "rollout.group_size=4",
            "data.size=200",
            "data.eval_suites=[]",
            "resources.num_cpus=8",
            f"algorithm.steps={steps}",
            "logging.checkpoint_every=1",
            *extra,
        ],
    )


def graded_rows(run_dir: Path, step: int) -> int:
    return len(json.loads((run_dir / "steps" / f"step_{step:05d}.json").read_text())["rollouts"])


def replica_faults(model: str, root: Path) -> dict:
    import ray

    trainer = Trainer(config(model, 5), root / "faults", log=lambda _: None)
    kills = {1: ("rollout", "rollout-0"), 2: ("teacher", "teacher-0"), 3: ("verifier", "verifier-0")}
    reports = []
    try:
        trainer.start()
        for step in range(5):
            if step in kills:
                role, name = kills[step]
                os.kill(ray.get(trainer.pools.pools[role][name].pid.remote(), timeout=60), signal.SIGKILL)
            reports.append(trainer.step())
    finally:
        trainer.close()
    clean = [r.step_seconds for r in reports if not r.replica_restarts and r.step > 0]
    faulty = [r for r in reports if r.replica_restarts]
    expected = 4 * 4
    return {
        "faults_injected": len(kills),
        "steps_completed": len(reports),
        "replacements": {k: v for r in faulty for k, v in r.replica_restarts.items()},
        "prompts_lost": sum(expected - graded_rows(root / "faults", r.step) for r in reports),
        "clean_step_s_median": round(statistics.median(clean), 2),
        "fault_step_s": {next(iter(r.replica_restarts)): round(r.step_seconds, 2) for r in faulty},
        "recovery_s": {
            next(iter(r.replica_restarts)): round(r.step_seconds - statistics.median(clean), 2)
            for r in faulty
        },
    }


def learner_crash_and_resume(model: str, root: Path) -> dict:
    from cepo_services.learner.distributed import LearnerError

    cfg = config(model, 4, "rollout.replicas=1")
    quiet = Console(file=io.StringIO())
    train(cfg, root / "straight", console=quiet)
    trainer = Trainer(cfg, root / "resumed", log=lambda _: None)
    try:
        trainer.start()
        trainer.train(2)
        os.kill(trainer.learner.info[0]["pid"], signal.SIGKILL)
        try:
            trainer.step()
            failed = ""
        except LearnerError as exc:
            failed = str(exc).splitlines()[0][:120]
    finally:
        trainer.close()
    started = time.perf_counter()
    train(cfg, root / "resumed", console=quiet, resume=True)
    resume_s = time.perf_counter() - started
    adapter = "checkpoints/step_00004/adapter/adapter_model.safetensors"
    same = (root / "straight" / adapter).read_bytes() == (root / "resumed" / adapter).read_bytes()
    return {
        "learner_error": failed,
        "resumed_to_step": 4,
        "adapter_bytes_identical": same,
        "resume_s": round(resume_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "tiny-arith"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="cepo-faults-") as tmp:
        result = {
            "machine": f"{os.cpu_count()} CPU cores, no GPU",
            "replica_faults": replica_faults(args.model, Path(tmp)),
            "learner_crash": learner_crash_and_resume(args.model, Path(tmp)),
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
