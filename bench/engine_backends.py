"""Rollout generation and teacher scoring on each engine backend, on one CEPO step's worth of work.

Backends: ``vllm`` (the adapter through vLLM's LoRA kernels), ``vllm-merged`` (the adapter folded into the base
weights by vLLM's own weight loader, no LoRA kernels) and ``transformers`` (peft). Each runs in a process of its
own, one after the other, on the same work:

- generate: ``rollout.prompts_per_step`` prompts × ``rollout.group_size`` samples of at most
  ``rollout.max_new_tokens`` tokens, at the config's training temperature;
- score: the teacher's P_T⁺ and P_T⁻ sequences (the paper's template, ground truth and a wrong answer) of
  those rollouts — every row, i.e. the upper bound (a step scores only rows with A ≠ 0);
- sync: one adapter load (a new version), as every step does.

    python bench/engine_backends.py                                     # configs/tiny.yaml
    python bench/engine_backends.py --model models/smollm2-arith --out bench/results/engine_backends-smollm2.json

Prints one JSON line: per backend the median seconds of each part over ``--repeats`` (after one warm-up), and
per part the fastest backend — what ``rollout.backend: auto`` / ``teacher.backend: auto`` choose on this kind
of machine (``cepo.config.AUTO_BACKENDS``).
"""

from __future__ import annotations

import argparse
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

BACKENDS = ("vllm", "vllm-merged", "transformers")


def _work(config: str, overrides: list[str]) -> tuple[Any, Any, list[list[int]], list]:
    from transformers import AutoTokenizer

    from cepo.config import load_config
    from cepo.data import from_config
    from cepo_services.common.templates import chat_prompt_ids

    cfg = load_config(config, overrides)
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    problems = from_config(cfg.data).problems[: cfg.rollout.prompts_per_step]
    texts = [cfg.data.prompt_template.format(problem=p.problem) for p in problems]
    return cfg, tok, [chat_prompt_ids(tok, t) for t in texts], list(zip(texts, problems, strict=True))


def _adapter(cfg: Any, folder: Path, seed: int) -> Any:
    """A LoRA adapter of the config's shape with random non-zero B (a trained policy's, not the B = 0 start)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from cepo_proto import AdapterPayload
    from cepo_services.common.vision import load_model

    torch.manual_seed(seed)
    model = get_peft_model(
        load_model(cfg.model.path, cfg.model.dtype),
        LoraConfig(
            r=cfg.model.lora.rank,
            lora_alpha=cfg.model.lora.alpha,
            target_modules=list(cfg.model.lora.target_modules),
            init_lora_weights=False,
        ),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)
    model.save_pretrained(folder)
    return AdapterPayload.from_dir(seed, folder)


def run_backend(backend: str, config: str, overrides: list[str], repeats: int) -> dict[str, Any]:
    from cepo.controller.cluster import engine_options, train_sampling
    from cepo_services.common.engines import make_engine
    from cepo_services.common.templates import build_teacher_sequence, teacher_context_ids

    cfg, tok, prompt_ids, texts = _work(config, overrides)
    tmp = Path(tempfile.mkdtemp(prefix="cepo-bench-engines-"))
    adapters = [_adapter(cfg, tmp / f"a{k}", k) for k in range(repeats + 1)]
    role = "teacher"  # the longer context (prompt + hint), which rollout needs no more than
    started = time.perf_counter()
    engine = make_engine(backend, cfg.model.path, **engine_options(cfg, backend, cfg.seed, role=role))
    startup = time.perf_counter() - started
    spec = train_sampling(cfg, 0)
    times: dict[str, list[float]] = {"sync": [], "generate": [], "score": []}
    tokens = scored = 0
    try:
        for k, payload in enumerate(adapters):
            t0 = time.perf_counter()
            engine.load_adapter(payload)
            t1 = time.perf_counter()
            groups = engine.generate(prompt_ids, spec)
            t2 = time.perf_counter()
            sequences = []
            for (text, problem), group in zip(texts, groups, strict=True):
                for answer in (problem.answer, f"{problem.answer}1"):  # r⁺ and a wrong r⁻
                    context = teacher_context_ids(tok, text, answer, cfg.teacher.template)
                    for c in group:
                        if c.token_ids:
                            seq = build_teacher_sequence(context, c.token_ids)
                            sequences.append((seq.input_ids, seq.response_start))
            t3 = time.perf_counter()
            engine.score(sequences, cfg.rollout.temperature)
            t4 = time.perf_counter()
            if k == 0:
                continue  # warm-up
            times["sync"].append(t1 - t0)
            times["generate"].append(t2 - t1)
            times["score"].append(t4 - t3)
            tokens = sum(len(c.token_ids) for g in groups for c in g)
            scored = sum(len(ids) - start for ids, start in sequences)
    finally:
        engine.close()
    out: dict[str, Any] = {f"{part}_s": round(statistics.median(v), 4) for part, v in times.items()}
    out.update(
        startup_s=round(startup, 1),
        generated_tokens=tokens,
        scored_sequences=len(sequences),
        scored_tokens=scored,
        runs={part: [round(x, 3) for x in v] for part, v in times.items()},
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--model", help="model.path (default: the config's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument(
        "--repeats", type=int, default=3, help="measured rounds per backend (after a warm-up)"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here (e.g. bench/results/…)")
    parser.add_argument("--only", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"model.path={args.model}"] if args.model else [])
    if args.only:  # the child process: one backend
        print(json.dumps(run_backend(args.only, args.config, overrides, args.repeats)))
        return
    results: dict[str, Any] = {}
    for backend in args.backends.split(","):
        print(f"[engine_backends] {backend} …", file=sys.stderr, flush=True)
        cmd = [
            sys.executable,
            __file__,
            "--only",
            backend,
            "--config",
            args.config,
            "--repeats",
            str(args.repeats),
        ]
        for o in overrides:
            cmd += ["--set", o]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            results[backend] = {"error": proc.stderr.strip().splitlines()[-1:]}
            continue
        results[backend] = json.loads(proc.stdout.strip().splitlines()[-1])
    from cepo.config import load_config

    cfg = load_config(args.config, overrides)
    ok = {b: r for b, r in results.items() if "error" not in r}
    fastest = (
        {
            part: min(ok, key=lambda b: ok[b][f"{part}_s"] + (ok[b]["sync_s"] if part != "sync" else 0.0))
            for part in ("generate", "score")
        }
        if ok
        else {}
    )
    report = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "model": cfg.model.path,
        "batch": {
            "prompts": cfg.rollout.prompts_per_step,
            "group_size": cfg.rollout.group_size,
            "max_new_tokens": cfg.rollout.max_new_tokens,
        },
        "backends": results,
        "fastest_with_sync": fastest,
    }
    line = json.dumps(report)
    print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
