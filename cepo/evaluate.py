"""``cepo eval``: held-out accuracy of a model (optionally with a LoRA adapter) outside a training run.

One in-process engine (vLLM by default, transformers as the fallback; the same engine settings as training's
replicas, ``cepo.controller.cluster``) and one grader; the paper's sampling
(§5: temperature 1.0, top-p 1.0, top-k 40, presence penalty 2.0) from the ``eval`` config section. Accuracy per
suite is the mean over problems of the fraction of ``samples`` correct; its standard error is over problems.

Held-out data (:func:`heldout_suites`): the built-in tasks generate each suite (arithmetic's are disjoint from
training by text hash; reasoning_gym's suites are task names, drawn with another seed); file sources read each
suite from ``data.eval_paths`` or from the training file's rows whose split column names it
(:func:`cepo.data.loaders.load_heldout`), never from the training rows. Every suite is compared with the
training problems by normalised text hash: the count is ``train_overlap`` in the results (and a warning), and
a suite made only of training problems is refused.

Without ``--config``, a model folder built for a task (``cepo bootstrap``: its ``manifest.json`` names the
task) is evaluated on that task with the settings of its shipped config (:data:`TASK_SETTINGS`), so
``cepo eval --model models/tiny-arith --suites test`` runs offline as written.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from cepo.config import RunConfig
from cepo.progress import Progress, ticking
from cepo.stats import problem_accuracy
from cepo_proto import Problem, Verdict
from cepo_proto.pipeline import SamplingSpec

__all__ = [
    "TASK_SETTINGS",
    "HeldOutSuite",
    "eval_problems",
    "evaluate_model",
    "heldout_accuracy",
    "heldout_suites",
    "model_task",
    "task_overrides",
]

log = logging.getLogger(__name__)

# What `cepo eval` without --config assumes for a model folder built for a task: the settings of that task's
# shipped config that evaluation reads (configs/tiny.yaml for arithmetic; tests/test_eval_heldout.py keeps
# them equal to it).
TASK_SETTINGS: dict[str, tuple[str, ...]] = {
    "arithmetic": (
        "data.source=arithmetic",
        "data.path=null",
        "model.dtype=float32",
        "model.max_seq_len=256",
        "rollout.max_new_tokens=48",
        "eval.presence_penalty=0.0",
    ),
}
_TASK_VERSION = re.compile(r"^([a-z_]+)-v\d+$")  # a manifest's task_version, e.g. arithmetic-v1

# (prompt ids, sampling) → per prompt, the texts of its samples
Generate = Callable[[list[list[int]], SamplingSpec], list[list[str]]]
# (responses, reference answers) → verdicts
Grade = Callable[[list[str], list[str]], list[Verdict]]


def model_task(model_path: str | Path) -> str | None:
    """The task a model folder was built for (its ``manifest.json``'s ``task_version``, written by
    ``cepo bootstrap``) when :data:`TASK_SETTINGS` knows it, else None."""
    try:
        manifest = json.loads((Path(model_path).expanduser() / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    version = manifest.get("task_version") if isinstance(manifest, dict) else None
    match = _TASK_VERSION.match(version) if isinstance(version, str) else None
    return match.group(1) if match and match.group(1) in TASK_SETTINGS else None


def task_overrides(model_path: str | Path) -> tuple[str | None, list[str]]:
    """(task, ``--set`` overrides) for evaluating a model folder built for a task without a config file."""
    task = model_task(model_path)
    return task, list(TASK_SETTINGS[task]) if task else []


@dataclass(frozen=True)
class HeldOutSuite:
    """One held-out suite: its problems, how many of them are also training problems (by normalised text)
    and where they came from."""

    problems: list[Problem]
    train_overlap: int
    origin: str


def _suite_problems(cfg: RunConfig, suite: str) -> tuple[list[Problem], str]:
    data = cfg.data
    seed = data.seed + 1
    if data.source == "arithmetic":
        from cepo.tasks import arithmetic

        return arithmetic.generate(suite, data.eval_size, seed), f"arithmetic {suite} (seed {seed})"
    if data.source == "reasoning_gym":
        from cepo.tasks import reasoning_gym

        return reasoning_gym.generate(suite, data.eval_size, seed), f"reasoning_gym {suite} (seed {seed})"
    from cepo.data.loaders import load_heldout

    result, origin = load_heldout(data, suite)
    return result.problems[: data.eval_size], origin


def heldout_suites(cfg: RunConfig, *, training: Sequence[Problem] | None = None) -> dict[str, HeldOutSuite]:
    """Every configured held-out suite, compared with the training problems (``training``, else loaded from
    ``cfg.data`` as a run would). A suite whose problems are all training problems is refused
    (:class:`~cepo.errors.DataError`); a partial overlap is counted and logged as a warning."""
    from cepo.data.loaders import from_config, problem_key
    from cepo.errors import DataError

    if not cfg.data.eval_suites:
        return {}
    loaded = {suite: _suite_problems(cfg, suite) for suite in cfg.data.eval_suites}
    if training is None:
        training = from_config(cfg.data).problems
    seen = {problem_key(p.problem) for p in training}
    suites: dict[str, HeldOutSuite] = {}
    for suite, (problems, origin) in loaded.items():
        overlap = sum(problem_key(p.problem) in seen for p in problems)
        if problems and overlap == len(problems):
            raise DataError(
                f"data.eval_suites: suite {suite!r} ({origin}) is not held out: all {overlap} of its problems "
                "are training problems (same normalised text); give it data of its own (data.eval_paths."
                f"{suite}, or rows of another split)"
            )
        if overlap:
            log.warning(
                "held-out suite %r (%s): %d of its %d problems are also training problems (same normalised "
                "text); reported as train_overlap",
                suite,
                origin,
                overlap,
                len(problems),
            )
        suites[suite] = HeldOutSuite(problems, overlap, origin)
    return suites


def eval_problems(cfg: RunConfig) -> dict[str, list[Problem]]:
    """The held-out problems of each configured suite (see :func:`heldout_suites`)."""
    return {name: suite.problems for name, suite in heldout_suites(cfg).items()}


def heldout_accuracy(
    problems: Sequence[Problem],
    prompt_ids: list[list[int]],
    modes: Sequence[tuple[str, SamplingSpec]],
    generate: Generate,
    grade: Grade,
) -> dict[str, Any]:
    """Accuracy per mode (``sampled``, ``greedy``): the mean over problems of the fraction of samples correct,
    with its standard error over problems. Both evaluators use it: a training run's (through the replicas) and
    ``cepo eval``'s (one in-process engine)."""
    result: dict[str, Any] = {"n": len(problems), "samples": modes[0][1].n}
    for key, spec in modes:
        groups = generate(prompt_ids, spec)
        answers = [p.answer for p, group in zip(problems, groups, strict=True) for _ in group]
        correct = iter(v.correct for v in grade([t for group in groups for t in group], answers))
        result[key], result[f"{key}_se"] = problem_accuracy([[next(correct) for _ in g] for g in groups])
    return result


def evaluate_model(
    cfg: RunConfig,
    *,
    adapter: Path | None = None,
    backend: str = "vllm",
    greedy: bool = False,
    console: Console | None = None,
    images: str = "keep",
) -> dict[str, Any]:
    """Evaluate ``cfg.model.path`` (+ ``adapter``) on ``cfg.data.eval_suites``; returns per-suite results.

    ``images`` (image problems): ``keep`` them; ``grey`` (the image-blind baseline: the same prompt tokens, every
    figure a uniform grey one of its size) or ``none`` (the text alone, images and ``<image>`` removed) — see
    :func:`cepo.data.vision_inputs.student_inputs`."""
    from cepo.config import check_model_path
    from cepo.data.vision_inputs import IMAGE_MODES

    if not cfg.data.eval_suites:
        raise ValueError("no suites to evaluate: pass --suites or set data.eval_suites")
    if images not in IMAGE_MODES:
        raise ValueError(f"--images {images!r}; allowed: {', '.join(IMAGE_MODES)}")
    check_model_path(cfg.model.path, hub=True)  # before the slow imports, and before any loader asks the Hub
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--adapter {adapter}: no adapter_config.json there (a PEFT adapter folder)")
    suites = heldout_suites(cfg)  # data errors before the engine starts
    import os

    from transformers import AutoTokenizer

    from cepo.controller.cluster import engine_options, eval_modes
    from cepo.data.vision_inputs import student_inputs
    from cepo_proto import AdapterPayload
    from cepo_services.common.engines import make_engine
    from cepo_services.verifier.grader import Grader

    console = console or Console(stderr=True)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.rollout.kv_cache_gib))
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries only the results
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    with ticking(console, f"loading {cfg.model.path} ({backend})"):
        engine = make_engine(backend, cfg.model.path, **engine_options(cfg, backend, cfg.seed))
    from cepo.hooks import import_path

    reward_fn = cfg.verifier.reward_fn  # the user's reward grades evaluation as it graded training
    grader = Grader(
        timeout_s=cfg.verifier.timeout_s,
        max_chars=cfg.verifier.max_response_chars,
        reward_fn=reward_fn,
        reward_path=import_path() if reward_fn is not None else None,
    )
    results: dict[str, Any] = {}
    modes = eval_modes(cfg, greedy=greedy)
    progress = Progress(len(suites) * len(modes))
    suite_name = [""]
    suite_images: list = [None]  # a VL model: per prompt of the suite, its prepared images

    def generate(ids: list[list[int]], spec: SamplingSpec) -> list[list[str]]:
        mode = "greedy" if spec.temperature == 0 else f"T={spec.temperature:g}"
        with ticking(
            console, f"eval {suite_name[0]} ({mode}, {len(ids)} problems × {spec.n}) · {progress} done"
        ):
            out = [[c.text for c in group] for group in engine.generate(ids, spec, images=suite_images[0])]
        progress.advance()
        return out

    try:
        if adapter is not None:
            engine.load_adapter(AdapterPayload.from_dir(0, adapter))
        progress.start()
        for name, suite in suites.items():
            suite_name[0] = name
            problems = suite.problems
            prompts, suite_images[0] = student_inputs(
                problems, tokenizer, cfg.model.path, cfg.data.prompt_template, images=images
            )
            result = heldout_accuracy(problems, prompts, modes, generate, grader.grade_batch)
            result["train_overlap"] = suite.train_overlap
            results[name] = result
            line = f"{name:<16} {result['sampled']:.3f} ± {result['sampled_se']:.3f}"
            if greedy:
                line += f"   greedy {result['greedy']:.3f} ± {result['greedy_se']:.3f}"
            if suite.train_overlap:
                line += f"   ({suite.train_overlap} of {len(problems)} problems are also training problems)"
            console.print(line, highlight=False)
    finally:
        engine.close()
        grader.close()
    per_suite = list(results.values())
    results["average"] = {
        key: sum(r[key] for r in per_suite) / len(per_suite)
        for key in (("sampled", "greedy") if greedy else ("sampled",))
    }
    results["settings"] = {  # what produced these numbers, so that a results file stands on its own
        "model": str(Path(cfg.model.path).resolve()) if Path(cfg.model.path).exists() else cfg.model.path,
        "adapter": None if adapter is None else str(Path(adapter).resolve()),
        "backend": backend,
        "dtype": cfg.model.dtype,
        "seed": cfg.seed,
        "suites": list(suites),
        "problems_per_suite": {name: len(suite.problems) for name, suite in suites.items()},
        "prompt_template": cfg.data.prompt_template,
        "images": images,
        "sampling": {mode: spec.model_dump() for mode, spec in modes},
        "verifier": {"reward_fn": reward_fn, "timeout_s": cfg.verifier.timeout_s},
    }
    return results
