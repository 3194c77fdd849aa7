"""Learner cost per method, and the CUDA / NCCL learner path, on one device.

    python bench/learner_methods.py --device cuda --out gpu.json
    python bench/learner_methods.py --device cpu --layers 2 --hidden 128 --vocab 512 --batch 16

What it measures, for a random Qwen2 model of the given size with a LoRA adapter (rank 16):
- one learner update (old log-probs + PPO-clip step) with CEPO token advantages, and with the OPSD and SDPO
  distillation terms (a no-grad teacher forward over the r⁺ context + a full-vocabulary KL / top-k JSD);
- on CUDA, that the learner's log-probs agree with the CPU's (fp32), and that a one-rank FSDP2 group on NCCL
  takes the same step as the plain policy.
Prints one JSON object (and writes it to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _import_path() -> None:
    """Run from a checkout without installing: `cepo_proto` is the folder proto/ (see pyproject)."""
    shim = Path(tempfile.mkdtemp(prefix="cepo-shim-"))
    (shim / "cepo_proto").symlink_to(REPO / "proto")
    sys.path[:0] = [str(REPO), str(shim)]


def build_model(folder: Path, *, layers: int, hidden: int, vocab: int, seed: int = 0) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1),
        num_key_value_heads=max(hidden // 128, 1),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


def samples(n: int, vocab: int, prompt: int, response: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = torch.randint(5, vocab, (prompt,), generator=g).tolist()
        r = torch.randint(
            5, vocab, (int(torch.randint(response // 2, response + 1, (1,), generator=g)),), generator=g
        )
        out.append((p, r.tolist()))
    return out


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:] if len(times) > 1 else times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=96)
    ap.add_argument("--response", type=int, default=256)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    _import_path()
    from cepo.algorithm.advantages import cepo_token_advantages
    from cepo_proto.learner import DistillSpec, UpdateSettings
    from cepo_services.learner.policy import LoraPolicy, PolicyBatch

    result: dict = {"device": args.device, "torch": torch.__version__}
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    folder = build_model(
        Path(tempfile.mkdtemp(prefix="cepo-bench-")) / "model",
        layers=args.layers,
        hidden=args.hidden,
        vocab=args.vocab,
    )
    result["model"] = {"layers": args.layers, "hidden": args.hidden, "vocab": args.vocab}
    data = samples(args.batch, args.vocab, args.prompt, args.response)
    teacher = [([*p[:8], 3, 3, 3, *p[8:]], r) for p, r in data]  # a longer (r⁺) context, same responses
    batch, teacher_batch = PolicyBatch.build(data), PolicyBatch.build(teacher)
    tokens = int(batch.response_mask.sum())
    result["batch"] = {"sequences": args.batch, "response_tokens": tokens}
    kwargs = {"lr": 1e-4, "warmup_steps": 0, "lr_schedule": "constant", "seed": 3, "device": args.device}

    policy = LoraPolicy(str(folder), **kwargs)
    adv = torch.linspace(-1, 1, args.batch)
    logp = torch.randn(batch.response_mask.shape) * 0.1 - 2.0
    token_adv = cepo_token_advantages(adv, logp, logp + 0.3, batch.response_mask, 0.5, 0.5)

    def step(distill=None):
        old = policy.old_logprobs(batch, args.micro)
        policy.update(
            batch,
            token_adv,
            old,
            UpdateSettings(micro_batch_size=args.micro),
            teacher_batch=teacher_batch,
            distill=distill,
        )

    methods = {
        "cepo": None,
        "opsd": DistillSpec("opsd"),
        "sdpo": DistillSpec("sdpo", top_k=100),
    }
    result["update_s"] = {}
    for name, spec in methods.items():
        seconds = timed(lambda spec=spec: step(spec), args.repeats)
        result["update_s"][name] = round(seconds, 4)
        result.setdefault("tokens_per_s", {})[name] = round(tokens / seconds, 1)
    result["update_over_cepo"] = {
        k: round(v / result["update_s"]["cepo"], 3) for k, v in result["update_s"].items()
    }
    if args.device == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

        # CPU vs CUDA log-probs (fp32, same adapter)
        small = PolicyBatch.build(data[:8])
        gpu = policy.old_logprobs(small, 8).cpu()
        cpu_policy = LoraPolicy(str(folder), **{**kwargs, "device": "cpu"})
        cpu_policy.model.load_state_dict({k: v.cpu() for k, v in policy.model.state_dict().items()})
        cpu = cpu_policy.old_logprobs(small, 8)
        result["cpu_vs_cuda_logprob_max_abs_diff"] = float((gpu - cpu).abs().max())

        # one-rank FSDP2 on NCCL takes the same step as the plain policy
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", WORLD_SIZE="1")
        dist.init_process_group("nccl", rank=0, world_size=1)
        plain = LoraPolicy(str(folder), **kwargs)
        sharded = LoraPolicy(str(folder), fsdp=True, **kwargs)
        small_adv = token_adv[:8, : small.response_mask.shape[1]]
        for p in (plain, sharded):
            old = p.old_logprobs(small, 4)
            p.update(small, small_adv, old, UpdateSettings(micro_batch_size=4), num_micro_batches=2)
        a, b = plain.lora_state(), sharded.lora_state()
        result["fsdp_nccl_vs_plain_max_abs_diff"] = max(float((a[k] - b[k].to(a[k])).abs().max()) for k in a)
        payload = sharded.export_adapter()
        result["fsdp_nccl_export_files"] = sorted(payload.files)
        dist.destroy_process_group()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
