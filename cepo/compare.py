"""``cepo compare``: every method × seed on one configuration, then the paper-shaped report.

Layout: ``OUT/<method>/seed<k>/`` is an ordinary run folder (``cepo train`` writes the same files). A run whose
``summary.json`` exists is finished and is never redone, so an interrupted comparison resumes where it stopped;
an unfinished folder is cleared and run again. ``OUT/compare.json`` records the command and the resolved
configuration; a second invocation with a different configuration refuses to mix results.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rich.console import Console

from cepo.algorithm.methods import method_names
from cepo.config import RunConfig, dump_config

__all__ = ["parse_methods", "run_compare"]


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in method_names()]
    if bad or not methods:
        raise ValueError(f"--methods: unknown {bad or text!r}; allowed: {', '.join(method_names())}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods lists a method twice: {text!r}")
    return methods


def run_config(cfg: RunConfig, method: str, seed: int) -> RunConfig:
    """The base configuration with this method and seed (engines, learner init and data order all follow)."""
    return cfg.model_copy(
        update={
            "name": f"{cfg.name}-{method}-seed{seed}",
            "seed": seed,
            "algorithm": cfg.algorithm.model_copy(update={"method": method}),
            "data": cfg.data.model_copy(update={"seed": seed}),
        }
    )


def run_compare(
    cfg: RunConfig,
    out: Path,
    methods: list[str],
    seeds: int,
    *,
    command: str = "",
    steps: int | None = None,
    console: Console | None = None,
) -> dict[str, Path]:
    from cepo.report import write_report
    from cepo.run import train

    console = console or Console()
    out.mkdir(parents=True, exist_ok=True)
    record = out / "compare.json"
    resolved = dump_config(cfg)
    if record.exists():
        previous = json.loads(record.read_text())
        if previous.get("config") != resolved or previous.get("steps") != steps:
            raise ValueError(
                f"{out} holds a comparison made with another configuration or step count; "
                "use another --out or delete it"
            )
    record.write_text(json.dumps({"command": command, "steps": steps, "config": resolved}, indent=2))
    todo = [(m, s) for s in range(1, seeds + 1) for m in methods]
    for k, (method, seed) in enumerate(todo, start=1):
        run_dir = out / method / f"seed{seed}"
        if (run_dir / "summary.json").exists():
            console.print(f"[{k}/{len(todo)}] {method} seed {seed}: finished earlier, kept")
            continue
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an interrupted run starts over: no half-written results
        console.rule(f"[{k}/{len(todo)}] {method} seed {seed}")
        started = time.perf_counter()
        train(run_config(cfg, method, seed), run_dir, steps=steps, console=console)
        console.print(f"{method} seed {seed} done in {time.perf_counter() - started:.0f}s")
    paths = write_report(out, methods, seeds)
    console.print((out / "table.md").read_text(), highlight=False, markup=False)
    for name, path in paths.items():
        console.print(f"{name}: {path}")
    return paths
