"""A short SFT warm-up of SmolLM2-135M-Instruct (the one pretrained model available offline) to the arithmetic
task's student format, so that its sampled accuracy lands in the range where RL has groups with both right and
wrong rollouts (20–60 %), and its teacher has seen the answer-conditioned form.

    python bench/smollm2_sft.py --out models/smollm2-arith --steps 150

Demonstrations are those of the tiny policy's warm-up (``cepo.models.bootstrap``): correct chains, chains with one
wrong step (``--wrong-fraction``), and teacher-form examples (the paper's template with the right answer, or with a
wrong answer followed by a chain that reaches it), tokenised with SmolLM2's own chat template exactly as the
pipeline builds student prompts and teacher contexts. Full fine-tuning, float32, on CPU. Writes the model folder
and ``sft.json`` (settings, loss curve, sampled and greedy accuracy on 200 held-out ``test`` problems, seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cepo.config import STUDENT_PROMPT
from cepo.models.bootstrap import sft_tensors
from cepo.tasks import arithmetic
from cepo_services.common.templates import chat_prompt_ids, teacher_context_ids
from cepo_services.verifier import grade


def demonstration(problem, rng: random.Random, args) -> tuple[list[int], str, str]:
    """(prefix ids, response text, form)."""
    prompt = STUDENT_PROMPT.format(problem=problem.problem)
    roll = rng.random()
    if roll < args.teacher_fraction:
        return teacher_context_ids(TOK, prompt, problem.answer), arithmetic.solution(problem), "teacher"
    roll -= args.teacher_fraction
    if roll < args.teacher_wrong_fraction:
        wrong = arithmetic.inject_error(problem, rng)
        hint = wrong[wrong.rindex("\\boxed{") + len("\\boxed{") : -1]
        return teacher_context_ids(TOK, prompt, hint), wrong, "teacher_wrong"
    if rng.random() < args.wrong_fraction:
        return chat_prompt_ids(TOK, prompt), arithmetic.inject_error(problem, rng), "wrong"
    return chat_prompt_ids(TOK, prompt), arithmetic.solution(problem), "student"


def batch(examples):
    eos = TOK.convert_tokens_to_ids("<|im_end|>")
    rows = [(p, [*TOK.encode(r, add_special_tokens=False), eos]) for p, r, _ in examples]
    return sft_tensors(rows, TOK.pad_token_id if TOK.pad_token_id is not None else eos)


@torch.no_grad()
def accuracy(model, problems, *, temperature: float, seed: int) -> float:
    torch.manual_seed(seed)
    right = 0
    for start in range(0, len(problems), 25):
        chunk = problems[start : start + 25]
        prompts = [chat_prompt_ids(TOK, STUDENT_PROMPT.format(problem=p.problem)) for p in chunk]
        width = max(map(len, prompts))
        pad = TOK.pad_token_id if TOK.pad_token_id is not None else 0
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            attn[i, width - len(p) :] = 1
        greedy = temperature == 0
        out = model.generate(
            input_ids=ids,
            attention_mask=attn,
            do_sample=not greedy,
            temperature=None if greedy else temperature,
            top_k=None if greedy else 0,
            top_p=None if greedy else 1.0,
            max_new_tokens=48,
            pad_token_id=pad,
            eos_token_id=TOK.convert_tokens_to_ids("<|im_end|>"),
        )
        for p, seq in zip(chunk, out[:, width:], strict=True):
            right += grade(TOK.decode(seq, skip_special_tokens=True), p.answer).correct
    return right / len(problems)


def main() -> None:
    global TOK
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=Path("models/smollm2-135m-instruct"))
    ap.add_argument("--out", type=Path, default=Path("models/smollm2-arith"))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--wrong-fraction", type=float, default=0.5)
    ap.add_argument("--teacher-fraction", type=float, default=0.2)
    ap.add_argument("--teacher-wrong-fraction", type=float, default=0.2)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    started = time.monotonic()
    TOK = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    pool = arithmetic.generate("train", 3000, args.seed)
    held_out = arithmetic.generate("test", args.eval, args.seed + 1)
    before = {"sampled": accuracy(model.eval(), held_out, temperature=1.0, seed=args.seed)}
    print(f"base: sampled {before['sampled']:.3f}", flush=True)
    rng = random.Random(f"smollm2-sft/{args.seed}")
    torch.manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(args.steps):
        warm = min(1.0, (step + 1) / 10)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        ids, mask, labels = batch(
            [demonstration(rng.choice(pool), rng, args) for _ in range(args.batch_size)]
        )
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss))
        if (step + 1) % 10 == 0:
            print(f"step {step + 1}/{args.steps} loss {sum(losses[-10:]) / 10:.4f} "
                  f"{time.monotonic() - started:.0f}s", flush=True)  # fmt: skip
    model.eval()
    after = {
        "sampled": accuracy(model, held_out, temperature=1.0, seed=args.seed),
        "greedy": accuracy(model, held_out, temperature=0.0, seed=args.seed),
    }
    print(f"after SFT: sampled {after['sampled']:.3f} greedy {after['greedy']:.3f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    TOK.save_pretrained(args.out)
    record = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "losses": losses,
        "test_accuracy_before": before,
        "test_accuracy_after": after,
        "seconds": round(time.monotonic() - started, 1),
    }
    (args.out / "sft.json").write_text(json.dumps(record, indent=2))
    print(json.dumps({k: v for k, v in record.items() if k != "losses"}, indent=2))


TOK = None

if __name__ == "__main__":
    main()
