"""``cepo eval``: held-out accuracy of a model (optionally with a LoRA adapter) outside a training run.

One in-process engine (vLLM by default, transformers as the fallback; the same engine settings as training's
replicas, ``cepo.controller.cluster``) and one grader; the paper's sampling
(§5: temperature 1.0, top-p 1.0, top-k 40, presence penalty 2.0) from the ``eval`` config section. Accuracy per
suite is the mean over problems of the fraction of ``samples`` correct; its standard error is over problems.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from cepo.config import RunConfig
from cepo.stats import problem_accuracy

__all__ = ["evaluate_model"]


def evaluate_model(
    cfg: RunConfig,
    *,
    adapter: Path | None = None,
    backend: str = "vllm",
    greedy: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Evaluate ``cfg.model.path`` (+ ``adapter``) on ``cfg.data.eval_suites``; returns per-suite results."""
    import os

    from transformers import AutoTokenizer

    from cepo.controller.cluster import engine_options, eval_modes
    from cepo.run import eval_problems
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
    try:
        if adapter is not None:
            engine.load_adapter(AdapterPayload.from_dir(0, adapter))
        for name, problems in suites.items():
            prompts = [
                chat_prompt_ids(tokenizer, cfg.data.prompt_template.format(problem=p.problem))
                for p in problems
            ]
            result: dict[str, Any] = {"n": len(problems), "samples": cfg.data.eval_samples}
            for key, spec in eval_modes(cfg, greedy=greedy):
                with console.status(f"{name}: {key}, {len(problems)} problems × {spec.n}…"):
                    groups = engine.generate(prompts, spec)
                    verdicts = grader.grade_batch(
                        [c.text for group in groups for c in group],
                        [p.answer for p, group in zip(problems, groups, strict=True) for _ in group],
                    )
                correct = iter(v.correct for v in verdicts)
                result[key], result[f"{key}_se"] = problem_accuracy(
                    [[next(correct) for _ in g] for g in groups]
                )
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
