"""Adapter folders others can load: the run's ``adapter/`` and every ``checkpoints/step_NNNNN/adapter/``.

The learner's :class:`~cepo_proto.AdapterPayload` carries only what every replica needs each step
(``adapter_config.json`` and ``adapter_model.safetensors``; its checksum is what replicas confirm and what a
resume verifies, so it stays independent of where the run's folders are). When the recorder writes the payload
into the run folder, :func:`complete_adapter` makes that folder self-contained:

- ``adapter_config.json``: ``base_model_name_or_path`` resolved to an absolute path when it names a local
  folder (a Hub name such as ``Qwen/Qwen3-VL-2B-Instruct`` stays as it is), so the folder loads from anywhere
  (``AutoPeftModelForCausalLM.from_pretrained(folder)``);
- the base model's tokenizer files (``AutoTokenizer.from_pretrained(folder)``);
- ``README.md``, a model card (:func:`model_card`): base model, method, step and policy version, the LoRA
  settings and the run id; nothing in it depends on the time or on the run folder's path, so a resumed run
  writes the same bytes as an uninterrupted one of the same run.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["complete_adapter", "model_card", "resolve_base", "tokenizer_files"]


def resolve_base(name_or_path: str) -> str:
    """The absolute, resolved path when ``name_or_path`` is a local folder; otherwise unchanged (a Hub name)."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else name_or_path


def tokenizer_files(model_path: str) -> dict[str, bytes]:
    """The files ``AutoTokenizer.save_pretrained`` writes for the base model's tokenizer (local files only: the
    run has loaded it already, so it is a local folder or in the Hugging Face cache)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_base(model_path), local_files_only=True)
    with tempfile.TemporaryDirectory(prefix="cepo-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def _is_local(base: str) -> bool:
    return Path(base).is_absolute()


def model_card(
    *,
    base_model: str,
    adapter_config: Mapping[str, Any],
    method: str,
    method_display: str,
    step: int,
    version: int,
    run_id: str | None,
    run_name: str,
    settings: Mapping[str, Any] | None = None,
) -> str:
    """README.md of an adapter folder. Deterministic: the same inputs give the same bytes."""
    targets = adapter_config.get("target_modules")
    if isinstance(targets, list | tuple):
        targets = ", ".join(str(t) for t in sorted(targets))
    lines = ["---"]
    if not _is_local(base_model):
        lines.append(f"base_model: {base_model}")
    lines += [
        "library_name: peft",
        "pipeline_tag: text-generation",
        "tags:",
        "- lora",
        "- peft",
        "- rlvr",
        f"- {method}",
        "---",
        "",
        f"# {run_name}: {method_display} LoRA adapter, step {step}",
        "",
        f"A LoRA adapter for `{base_model}`, trained by reinforcement learning with verifiable rewards with "
        f"**{method_display}** (`algorithm.method: {method}`) in CEPO (Contrastive Evidence Policy "
        "Optimization).",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base_model}` |",
        f"| method | {method_display} (`{method}`) |",
        f"| training steps | {step} |",
        f"| policy version | {version} |",
        f"| run id | `{run_id or '-'}` |",
        f"| LoRA rank r | {adapter_config.get('r', '-')} |",
        f"| LoRA alpha | {adapter_config.get('lora_alpha', '-')} |",
        f"| LoRA dropout | {adapter_config.get('lora_dropout', '-')} |",
        f"| LoRA target modules | {targets or '-'} |",
    ]
    for key, value in (settings or {}).items():
        lines.append(f"| {key} | {value} |")
    lines += [
        "",
        "The folder holds the adapter (`adapter_config.json`, `adapter_model.safetensors`), the base model's "
        "tokenizer and this card.",
        "",
        "## Load",
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "from transformers import AutoTokenizer",
        "",
        'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
        "",
        "With vLLM: `LLM(model=<base model>, enable_lora=True, max_lora_rank=<r>)` and "
        '`LoRARequest("cepo", 1, "path/to/this/folder")`. With CEPO: `cepo eval --model <base model> '
        "--adapter path/to/this/folder`.",
        "",
    ]
    return "\n".join(lines)


def complete_adapter(
    folder: str | Path,
    *,
    tokenizer: Mapping[str, bytes] | None,
    card: Mapping[str, Any],
) -> dict[str, Any]:
    """Make a written adapter folder self-contained (see the module docstring); returns its adapter config.

    ``tokenizer``: files from :func:`tokenizer_files` (None: none written); ``card``: the keyword arguments of
    :func:`model_card` other than ``base_model`` and ``adapter_config``, which come from the folder."""
    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    base = config.get("base_model_name_or_path")
    if isinstance(base, str) and base:
        resolved = resolve_base(base)
        if resolved != base:
            config["base_model_name_or_path"] = resolved
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name, data in (tokenizer or {}).items():
        if not (folder / name).exists():  # never over an adapter file
            (folder / name).write_bytes(data)
    text = model_card(
        base_model=config.get("base_model_name_or_path") or "-", adapter_config=config, **dict(card)
    )
    (folder / "README.md").write_text(text)
    return config
