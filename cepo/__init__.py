"""CEPO: Contrastive Evidence Policy Optimization — the control plane: the controller running Algorithm 1,
the paper's math that runs there, the method registry, config, data, ledger, reports and the command line.

The Python API (:mod:`cepo.api`, imported on first use so that ``import cepo`` stays fast)::

    cepo.load_config(path=None, overrides=[...], **settings) -> RunConfig
    cepo.train(config, run_dir=None, *, steps=None, callbacks=[...], reward_fn=None, ...) -> summary dict
    cepo.evaluate(config, adapter=None, *, suites=None, samples=None, size=None, greedy=True, ...) -> results
    cepo.StopTraining   # raise it in a step callback to end the run after that step

``cepo.evaluate`` is also the module ``cepo/evaluate.py`` (``from cepo.evaluate import heldout_suites`` works as
before): calling it calls :func:`cepo.api.evaluate`.
"""

from __future__ import annotations

import sys
import types
from typing import Any

__version__ = "0.1.0"
__all__ = ["StopTraining", "__version__", "evaluate", "load_config", "train"]

_API = ("StopTraining", "load_config", "train")


class _CallableEvaluate(types.ModuleType):
    """The class of the module ``cepo.evaluate``: calling the module is :func:`cepo.api.evaluate`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from cepo.api import evaluate

        return evaluate(*args, **kwargs)


class _Package(types.ModuleType):
    """The class of this package: when the import system binds the submodule ``cepo.evaluate`` here, the
    module is made callable, so ``cepo.evaluate(...)`` is the API function whichever was imported first."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "evaluate" and type(value) is types.ModuleType:
            value.__class__ = _CallableEvaluate
        super().__setattr__(name, value)


def __getattr__(name: str) -> Any:
    if name == "evaluate":
        import importlib

        return importlib.import_module("cepo.evaluate")  # bound (and made callable) by _Package.__setattr__
    if name in _API:
        from cepo import api

        return getattr(api, name)
    raise AttributeError(f"module 'cepo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


sys.modules[__name__].__class__ = _Package
