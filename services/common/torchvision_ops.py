"""Lets PyPI's torchvision import next to a CPU build of torch (what vision-language models need on CPU).

torchvision 0.28.0 from PyPI (the match for torch 2.13) is a CUDA build: its ``_C`` extension needs
``libtorch_cuda.so``, does not load with torch 2.13.0+cpu, and ``import torchvision`` then dies on
``operator torchvision::nms does not exist`` (its Python side registers fake kernels for ops the extension would
have defined). Qwen2-VL's processor and vLLM's Qwen2-VL module need torchvision's pure-torch transforms (resize,
normalize), not its compiled detection ops, so defining the two op schemas before torchvision is first imported
is enough.

:func:`install` (run by ``make setup``) writes a ``.pth`` hook into the virtual environment's site-packages, so the
fix happens at interpreter start in every process — vLLM's spawned engine processes and Ray workers included. The
hook only adds a finder to ``sys.meta_path``: nothing is imported until something imports torchvision, and then,
if torchvision's own extension loads (a matching CPU or CUDA build), it is left alone.

This file imports nothing but the standard library at module level (it runs at every interpreter start).
"""

from __future__ import annotations

import contextlib
import sys
from importlib.abc import MetaPathFinder

__all__ = ["define_ops", "install", "install_hook"]

HOOK_MODULE = "cepo_torchvision_ops"
_libraries: list = []  # a torch.library.Library is unregistered when garbage-collected: keep it alive


def define_ops() -> bool:
    """Define ``torchvision::nms`` and ``torchvision::qnms`` if torchvision's extension cannot; True if defined."""
    import glob
    import os
    from importlib.util import find_spec

    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018 — already defined (the extension loaded, or we ran before)
        return False
    except (AttributeError, RuntimeError):
        pass
    spec = find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for folder in spec.submodule_search_locations:
        for library in glob.glob(os.path.join(folder, "_C*.so")):
            try:
                torch.ops.load_library(library)  # a matching build: it defines its own ops
                return False
            except OSError:
                pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold, float scale, int zero_point) -> Tensor")
    _libraries.append(lib)
    return True


class _Finder(MetaPathFinder):
    """Runs :func:`define_ops` once, just before the first ``import torchvision``, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            # never break an import over this; torchvision's own error will then say why
            with contextlib.suppress(Exception):
                define_ops()
        return None


def install_hook() -> None:
    """Put the finder on ``sys.meta_path`` (what the ``.pth`` line calls)."""
    if "torchvision" in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())


def install(site_packages: str | None = None) -> list[str]:
    """Write ``cepo_torchvision_ops.py`` (this file) and its ``.pth`` into ``site_packages`` (default: this
    interpreter's purelib); returns the paths written."""
    import shutil
    import sysconfig
    from pathlib import Path

    target = Path(site_packages or sysconfig.get_paths()["purelib"])
    module = target / f"{HOOK_MODULE}.py"
    shutil.copyfile(__file__, module)
    pth = target / f"{HOOK_MODULE}.pth"
    pth.write_text(f"import {HOOK_MODULE}; {HOOK_MODULE}.install_hook()\n")
    return [str(module), str(pth)]


if __name__ == "__main__":
    for written in install(sys.argv[1] if len(sys.argv) > 1 else None):
        print(f"wrote {written}")
