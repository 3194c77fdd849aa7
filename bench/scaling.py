"""Rollout scaling, adapter sync cost and memory per service, on one config.

For each rollout replica count in ``--replicas`` (default 1,2) it starts the pipeline (GRPO: no teacher, so
generation is what scales), runs ``--steps`` steps and reports, over steps 2..N:

- generation throughput: completion tokens per second of the gen stage (and the speed-up over the first count);
- adapter sync: bytes of the adapter payload, seconds of the sync stage and its share of the step;
- memory: resident set size of every service process (its vLLM EngineCore children included), by replica.

    python bench/scaling.py                                    # configs/tiny.yaml, 1 and 2 rollout replicas
    python bench/scaling.py --replicas 1,2,4 --out bench/results/scaling-tiny.json

Prints one JSON line. Each count runs in a process of its own, one after the other.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from peer_trl import machine  # noqa: E402


def _rss_by_service(trainer: Any) -> dict[str, float]:
    """MiB resident per replica / learner rank: the actor's process and its children (vLLM's EngineCore)."""
    import psutil
    import ray

    def tree_mib(pid: int, children: bool = True) -> float:
        try:
            proc = psutil.Process(pid)
            procs = [proc, *(proc.children(recursive=True) if children else [])]
        except psutil.Error:
            return 0.0
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return round(total / 2**20, 1)

    out: dict[str, float] = {}
    for pool in trainer.pools.pools.values():
        for name, actor in pool.items():
            pid = ray.get(actor.__ray_call__.remote(lambda _self: __import__("os").getpid()), timeout=60)
            out[name] = tree_mib(pid)
    for rank, actor in enumerate(trainer.learner._live()):
        pid = ray.get(actor.__ray_call__.remote(lambda _self: __import__("os").getpid()), timeout=60)
        out[f"learner-{rank}"] = tree_mib(pid)
    # the driver alone: a local Ray's GCS, raylet and workers are its children
    out["controller"] = tree_mib(__import__("os").getpid(), children=False)
    return out


def run(config: str, overrides: list[str], replicas: int, steps: int) -> dict[str, Any]:
    import ray

    from cepo.config import load_config
    from cepo.controller import Trainer

    cfg = load_config(config, [*overrides, "algorithm.method=grpo", f"rollout.replicas={replicas}"])
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as run_dir:
        trainer = Trainer(cfg, run_dir, log=lambda _m: None)
        started = time.perf_counter()
        try:
            trainer.start()
            startup = time.perf_counter() - started
            reports = trainer.train(steps)
            memory = _rss_by_service(trainer)
            adapter_bytes = sum(len(data) for data in trainer.payload.files.values())
        finally:
            trainer.close()
            ray.shutdown()
    kept = reports[1:] or reports
    gen = statistics.median(r.stage_seconds["gen"] for r in kept)
    tokens = statistics.median(r.tokens for r in kept)
    sync = statistics.median(r.stage_seconds["sync"] for r in kept)
    step = statistics.median(r.step_seconds for r in kept)
    return {
        "replicas": replicas,
        "backend": cfg.engine_backend("rollout"),
        "startup_s": round(startup, 1),
        "gen_s": round(gen, 4),
        "gen_tokens_per_s": round(tokens / gen, 1),
        "step_s": round(step, 4),
        "sync_s": round(sync, 4),
        "sync_share_of_step": round(sync / step, 4),
        "adapter_bytes": adapter_bytes,
        "memory_mib": memory,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--replicas", default="1,2")
    parser.add_argument("--steps", type=int, default=5, help="steps per count; step 1 warms up")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only:
        print(json.dumps(run(args.config, args.overrides, args.only, args.steps)))
        return
    results = []
    for n in [int(x) for x in args.replicas.split(",")]:
        print(f"[scaling] {n} rollout replica(s) …", file=sys.stderr, flush=True)
        cmd = [
            sys.executable,
            __file__,
            "--only",
            str(n),
            "--config",
            args.config,
            "--steps",
            str(args.steps),
        ]
        for o in args.overrides:
            cmd += ["--set", o]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"{n} replicas failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first = results[0]["gen_tokens_per_s"]
    for r in results:
        r["speedup_over_first"] = round(r["gen_tokens_per_s"] / first, 3)
    report = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "config": args.config,
        "overrides": args.overrides,
        "results": results,
    }
    print(json.dumps(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
