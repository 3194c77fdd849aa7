"""Both engines: sampled log-probs match a transformers forward; adapter swaps are real, never silent."""

from __future__ import annotations

import gc

import pytest
import torch
from _tiny import save_random_adapter, save_tiny_model
from peft import PeftModel
from transformers import AutoModelForCausalLM

from cepo_proto.adapter import AdapterPayload
from cepo_services.common.engines import SamplingSpec, TransformersEngine, VLLMEngine
from cepo_services.common.templates import chat_prompt_ids


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    model_dir = save_tiny_model(root / "model")
    adapters = [save_random_adapter(model_dir, root / f"adapter{i}", seed=i) for i in range(2)]
    return model_dir, adapters


@pytest.fixture(scope="module")
def prompts(assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets[0])
    return [chat_prompt_ids(tok, "Compute 4+1+8."), chat_prompt_ids(tok, "Here is a sample answer: 13")]


def reference_logprobs(model_dir, adapter_dir, prompt, completion, temperature=1.0):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float() / temperature
    logp = torch.log_softmax(logits, -1)
    return torch.stack([logp[len(prompt) + i - 1, tok] for i, tok in enumerate(completion)])


def payload(version, folder):
    return AdapterPayload.from_dir(version, folder)


def check_engine(engine, assets, prompts):
    model_dir, adapters = assets
    first = payload(0, adapters[0])
    assert engine.load_adapter(first) == (0, first.checksum)

    sampled = engine.generate(prompts, SamplingSpec(n=3, temperature=1.0, max_tokens=12))
    assert [len(group) for group in sampled] == [3, 3]
    completion = sampled[0][0]
    assert 1 <= len(completion.token_ids) <= 12 and len(completion.logprobs) == len(completion.token_ids)
    assert completion.finish_reason in ("stop", "length")
    want = reference_logprobs(model_dir, adapters[0], prompts[0], completion.token_ids)
    assert torch.allclose(torch.tensor(completion.logprobs), want, atol=2e-4), (completion.logprobs, want)

    greedy = SamplingSpec(n=1, temperature=0.0, max_tokens=10)
    out_v0 = [g[0].token_ids for g in engine.generate(prompts, greedy)]
    # streamed: the same request's groups as they finish, every prompt once, the same samples
    streamed = {row: g[0].token_ids for batch in engine.generate_stream(prompts, greedy) for row, g in batch}
    assert streamed == dict(enumerate(out_v0))
    batches = list(engine.generate_stream(prompts * 3, SamplingSpec(n=2, temperature=1.0, max_tokens=12)))
    assert sorted(row for batch in batches for row, _ in batch) == list(range(6))
    assert all(len(group) == 2 for batch in batches for _, group in batch)
    second = payload(1, adapters[1])
    assert engine.load_adapter(second) == (1, second.checksum)
    assert engine.version == 1 and engine.checksum == second.checksum != first.checksum
    out_v1 = [g[0].token_ids for g in engine.generate(prompts, greedy)]
    assert out_v1 != out_v0, "loading a different adapter changed nothing: a silent no-op sync"
    # the first adapter's bytes as a new version: the old behaviour returns (no stale cache by id)
    third = AdapterPayload(version=2, files=first.files, checksum=first.checksum)
    assert engine.load_adapter(third) == (2, first.checksum)
    assert [g[0].token_ids for g in engine.generate(prompts, greedy)] == out_v0


def test_transformers_engine(assets, prompts):
    engine = TransformersEngine(str(assets[0]), dtype="float32", seed=0)
    try:
        check_engine(engine, assets, prompts)
    finally:
        engine.close()


@pytest.mark.slow
def test_vllm_engine(assets, prompts):
    engine = VLLMEngine(str(assets[0]), dtype="float32", max_model_len=256, max_lora_rank=8, seed=0)
    try:
        check_engine(engine, assets, prompts)
    finally:
        engine.close()
        gc.collect()


@pytest.mark.slow
def test_vllm_merged_engine_scores_and_swaps_like_the_adapter(assets, prompts):
    """``vllm-merged``: the adapter folded into vLLM's weights by its own loader. Swaps are real (a reload of
    an old version restores its behaviour, the prefix cache is not stale) and scores equal the fp32 forward."""
    model_dir, adapters = assets
    engine = VLLMEngine(str(model_dir), dtype="float32", max_model_len=256, seed=0, merge_adapter=True)
    hf = TransformersEngine(str(model_dir), dtype="float32")
    sequences = [([*p, 5, 9, 11, 7], len(p)) for p in prompts]
    try:
        check_engine(engine, assets, prompts)  # ends serving adapter 0's bytes as version 2
        for version, folder in ((3, adapters[1]), (4, adapters[0])):
            engine.load_adapter(payload(version, folder))
            hf.load_adapter(payload(version, folder))
            for g, w in zip(engine.score(sequences), hf.score(sequences), strict=True):
                assert torch.allclose(torch.tensor(g), torch.tensor(w), atol=1e-4), (version, g, w)
    finally:
        engine.close()
        hf.close()
        gc.collect()


@pytest.mark.slow
def test_vllm_merged_engine_keeps_the_layers_it_does_not_adapt(tmp_path, prompts):
    """An adapter on q_proj only: vLLM reloads the fused qkv layer whole, so k/v and every bias (random here,
    not zero) must come back from the base checkpoint unchanged."""
    from peft import LoraConfig, get_peft_model

    model_dir = save_tiny_model(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(model_dir)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"], init_lora_weights=False)
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(20.0)
    peft_model.save_pretrained(tmp_path / "adapter")
    engine = VLLMEngine(str(model_dir), dtype="float32", max_model_len=256, seed=0, merge_adapter=True)
    hf = TransformersEngine(str(model_dir), dtype="float32")
    sequences = [([*p, 5, 9, 11, 7], len(p)) for p in prompts]
    try:
        for e in (engine, hf):
            e.load_adapter(payload(0, tmp_path / "adapter"))
        for g, w in zip(engine.score(sequences), hf.score(sequences), strict=True):
            assert torch.allclose(torch.tensor(g), torch.tensor(w), atol=1e-4), (g, w)
    finally:
        engine.close()
        hf.close()
        gc.collect()


def test_corrupt_payload_is_refused(assets):
    good = payload(0, assets[1][0])
    files = dict(good.files)
    files["adapter_model.safetensors"] = files["adapter_model.safetensors"][:-1] + b"\x00"
    with pytest.raises(ValueError, match="checksum"):
        AdapterPayload(version=0, files=files, checksum=good.checksum)
    with pytest.raises(ValueError, match=r"lacks adapter_config\.json"):
        AdapterPayload(version=0, files={"adapter_model.safetensors": b""}, checksum="x")


@pytest.mark.slow
def test_vllm_scores_equal_transformers_forward(assets, prompts):
    """Teacher scoring through vLLM prompt log-probs equals a transformers fp32 forward (within 1e-4)."""
    model_dir, adapters = assets
    sequences = [([*p, 5, 9, 11, 7], len(p)) for p in prompts] + [([*prompts[0], 3], len(prompts[0]))]
    hf = TransformersEngine(str(model_dir), dtype="float32")
    llm = VLLMEngine(str(model_dir), dtype="float32", max_model_len=256, max_lora_rank=8, seed=0)
    try:
        for engine in (hf, llm):
            engine.load_adapter(payload(0, adapters[0]))
        want = hf.score(sequences)
        got = llm.score(sequences)
        assert [len(g) for g in got] == [4, 4, 1]
        for g, w in zip(got, want, strict=True):
            assert torch.allclose(torch.tensor(g), torch.tensor(w), atol=1e-4), (g, w)
        # vLLM prompt log-probs ignore the temperature: refused, not silently wrong
        with pytest.raises(ValueError, match=r"teacher\.backend=transformers"):
            llm.score(sequences, 0.7)
        assert not torch.allclose(torch.tensor(hf.score(sequences, 0.7)[0]), torch.tensor(want[0]))
        with pytest.raises(ValueError, match="start 0 must lie"):
            hf.score([(prompts[0], 0)])
        # the teacher replica's fit check rests on max_score_len: the longest sequence vLLM scores, exactly
        assert llm.max_score_len == 255
        longest = [*prompts[0], *([5] * (255 - len(prompts[0])))]
        assert len(llm.score([(longest, len(prompts[0]))])[0]) == 255 - len(prompts[0])
        with pytest.raises(Exception, match="longer than the maximum model length"):  # the step would fail
            llm.score([([*longest, 5], len(prompts[0]))])
    finally:
        llm.close()
        hf.close()
        gc.collect()


def test_transformers_engine_applies_the_presence_penalty(assets, prompts):
    """The paper's evaluation sampling (presence penalty 2.0) is honoured by the fallback engine, never
    dropped: a huge penalty forbids any repeated response token; without it the tiny model repeats."""
    engine = TransformersEngine(str(assets[0]), dtype="float32", seed=0)
    try:
        spec = SamplingSpec(n=4, temperature=1.0, max_tokens=24, seed=5)
        plain = [c.token_ids for g in engine.generate(prompts, spec) for c in g]
        penalised = engine.generate(prompts, spec.model_copy(update={"presence_penalty": 2.0e4}))
        assert any(len(set(ids)) < len(ids) for ids in plain)
        for completion in (c for g in penalised for c in g):
            ids = completion.token_ids
            assert len(set(ids)) == len(ids), ids
            assert all(lp > -1e3 for lp in completion.logprobs)  # sampled tokens were never penalised ones
    finally:
        engine.close()
