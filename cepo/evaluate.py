"""``cepo eval``: held-out accuracy of a model (optionally with a LoRA adapter) outside a training run.

One in-process engine (vLLM by default, transformers as the fallback; the same engine settings as training's
replicas, ``cepo.controller.cluster``) and one grader; the paper's sampling
(§5: temperature 1.0, top-p 1.0, top-k 40, presence penalty 2.0) from the ``eval`` config section. Accuracy per
suite is the mean over problems of the fraction of ``samples`` correct; its standard error is over problems.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from cepo.config import RunConfig
from cepo.stats import problem_accuracy
from cepo_proto import Problem, Verdict
from cepo_proto.pipeline import SamplingSpec

__all__ = ["eval_problems", "evaluate_model", "heldout_accuracy"]

# (prompt ids, sampling) → per prompt, the texts of its samples
Generate = Callable[[list[list[int]], SamplingSpec], list[list[str]]]
# (responses, reference answers) → verdicts
Grade = Callable[[list[str], list[str]], list[Verdict]]


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
) -> dict[str, Any]:
    """Evaluate ``cfg.model.path`` (+ ``adapter``) on ``cfg.data.eval_suites``; returns per-suite results."""
    from cepo.config import check_model_path

    check_model_path(cfg.model.path)  # before the slow imports, and before any loader asks the Hub
    import os

    from transformers import AutoTokenizer

    from cepo.controller.cluster import engine_options, eval_modes
    from cepo_proto import AdapterPayload
    from cepo_services.common.engines import make_engine
    from cepo_services.common.templates import chat_prompt_ids
    from cepo_services.verifier.grader import Grader

    console = console or Console(stderr=True)
    if not cfg.data.eval_suites:
        raise ValueError("no suites to evaluate: pass --suites or set data.eval_suites")
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--adapter {adapter}: no adapter_config.json there (a PEFT adapter folder)")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.rollout.kv_cache_gib))
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries only the results
    suites = eval_problems(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    with console.status(f"loading {cfg.model.path} ({backend})…"):
        engine = make_engine(backend, cfg.model.path, **engine_options(cfg, backend, cfg.seed))
    grader = Grader(timeout_s=cfg.verifier.timeout_s, max_chars=cfg.verifier.max_response_chars)
    results: dict[str, Any] = {}

    def generate(ids: list[list[int]], spec: SamplingSpec) -> list[list[str]]:
        with console.status(f"{len(ids)} problems × {spec.n} at temperature {spec.temperature}…"):
            return [[c.text for c in group] for group in engine.generate(ids, spec)]

    try:
        if adapter is not None:
            engine.load_adapter(AdapterPayload.from_dir(0, adapter))
        for name, problems in suites.items():
            prompts = [
                chat_prompt_ids(tokenizer, cfg.data.prompt_template.format(problem=p.problem))
                for p in problems
            ]
            modes = eval_modes(cfg, greedy=greedy)
            result = heldout_accuracy(problems, prompts, modes, generate, grader.grade_batch)
            results[name] = result
            line = f"{name:<16} {result['sampled']:.3f} ± {result['sampled_se']:.3f}"
            if greedy:
                line += f"   greedy {result['greedy']:.3f} ± {result['greedy_se']:.3f}"
            console.print(line, highlight=False)
    finally:
        engine.close()
        grader.close()
    per_suite = list(results.values())
    results["average"] = {
        key: sum(r[key] for r in per_suite) / len(per_suite)
        for key in (("sampled", "greedy") if greedy else ("sampled",))
    }
    return results
