"""Your code in a run, named in its configuration by an importable ``"module:function"`` path.

- ``verifier.reward_fn``: your reward instead of the built-in grader, run by every verifier replica in its
  killable worker process (``cepo_services.verifier``: ``function(response, reference)`` → float in [0, 1]
  or bool, with ``verifier.timeout_s``).
- ``data.loader`` (with ``data.source: python``): your problems, ``function(split, size)`` → a list of
  ``cepo_proto.Problem`` or dicts, called on the controller (:func:`cepo.data.loaders.load_python`).

A path is found the way ``python -m`` and uvicorn's ``module:app`` find theirs: on ``sys.path``, then in the
current directory (the ``cepo`` command is a script, not started from it). The function part may be a dotted
attribute path (``module:Class.method``). Configuration loading imports the module and checks the attribute
is callable, so a typo fails before anything starts, naming the field.

The verifier replicas are other processes: their worker imports the reward function with the controller's
:func:`import_path` in front of its ``sys.path``, so a module the controller can import (a file next to your
script or notebook included) is found there too. On a Ray cluster of several machines, install the module on
every node (or ship it with Ray's ``runtime_env``).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["check_target", "import_path", "resolve", "target_of"]

_TARGET = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")
_HINT = (
    "use a module-level function: define it at the top level of a module (a .py file on sys.path or in the "
    "current directory) and pass that function, or its 'module:function' path"
)


def check_target(value: Any) -> str:
    """``value`` if it is a ``"module:function"`` path (ValueError otherwise)."""
    if not isinstance(value, str) or not _TARGET.match(value):
        raise ValueError(f"expected an importable 'module:function' path, got {value!r}")
    return value


def _cwd() -> str:
    return os.path.abspath(os.curdir)


def _on_sys_path(folder: str) -> bool:
    return any(os.path.abspath(entry or os.curdir) == folder for entry in sys.path)


def _import(module_name: str) -> Any:
    """``importlib.import_module``, retried with the current directory appended to ``sys.path`` when the
    top-level package is not found and the current directory is not on it."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = module_name.partition(".")[0]
        if exc.name != top or _on_sys_path(_cwd()):
            raise
    sys.path.append(_cwd())
    importlib.invalidate_caches()
    return importlib.import_module(module_name)


def resolve(target: str) -> Callable[..., Any]:
    """The callable ``target`` names, imported now; ValueError saying what is wrong (the caller names the
    field)."""
    module_name, _, attribute = check_target(target).partition(":")
    try:
        value = _import(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise ValueError(
                f"cannot import module {module_name!r}: no module named {missing!r} on sys.path or in the "
                f"current directory ({_cwd()}); put its folder on PYTHONPATH, or install it"
            ) from None
        raise ValueError(f"importing module {module_name!r} failed: ModuleNotFoundError: {exc}") from None
    except (Exception, SystemExit) as exc:  # its top-level code failed
        raise ValueError(f"importing module {module_name!r} raised {type(exc).__name__}: {exc}") from None
    for depth, part in enumerate(attribute.split(".")):
        if not hasattr(value, part):
            owner = module_name if depth == 0 else f"{module_name}:{'.'.join(attribute.split('.')[:depth])}"
            raise ValueError(f"{owner!r} has no attribute {part!r}")
        value = getattr(value, part)
    if not callable(value):
        raise ValueError(f"{target!r} is not callable (it is of type {type(value).__name__})")
    return value


def import_path() -> list[str]:
    """``sys.path`` as absolute folders (``''`` is the current directory), with the current directory at the
    end if it is not on it: the folders the verifier's worker imports a reward function with."""
    path: list[str] = []
    for entry in [*sys.path, os.curdir]:
        folder = os.path.abspath(entry or os.curdir)
        if folder not in path:
            path.append(folder)
    return path


def target_of(function: Any, field: str) -> str:
    """The ``"module:function"`` path of ``function`` (a string is checked and returned as it is), for a field
    such as ``verifier.reward_fn``. Only a function that other processes can import by that name will do: a
    lambda, a nested function, a function of ``__main__`` (a script or notebook) or a callable object without
    a name is a ValueError that says what to do instead."""
    if isinstance(function, str):
        try:
            return check_target(function)
        except ValueError as exc:
            raise ValueError(f"{field}: {exc}") from None
    if not callable(function):
        raise ValueError(
            f"{field}: expected a function or a 'module:function' path, got {type(function).__name__}"
        )
    module = getattr(function, "__module__", None)
    qualname = getattr(function, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise ValueError(
            f"{field}: {function!r} has no importable name (a partial or a callable object?); {_HINT}"
        )
    if "<lambda>" in qualname:
        raise ValueError(f"{field}: a lambda cannot be imported by other processes; {_HINT}")
    if "<locals>" in qualname:
        raise ValueError(
            f"{field}: {qualname} is defined inside a function, so it cannot be imported; {_HINT}"
        )
    if module == "__main__":
        raise ValueError(
            f"{field}: {qualname} is defined in __main__ (your script or notebook), which other processes cannot "
            "import; move it into a module file (e.g. next to the script) and import it from there"
        )
    target = f"{module}:{qualname}"
    try:
        found = resolve(target)
    except ValueError as exc:
        raise ValueError(f"{field}: {target}: {exc}") from None
    if found is not function:
        raise ValueError(f"{field}: {target} imports as another object than the function given; {_HINT}")
    return target
