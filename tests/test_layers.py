"""The two layers stay two layers: services import only ``cepo_proto``, their shared library
(``cepo_services.common``) and their own folder — never the control plane or another service. The messages
(``cepo_proto``) import neither layer. Imports are read from the syntax tree (inside functions too, relative
imports resolved, ``importlib.import_module("…")`` calls included), never grepped."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# folder → installed package name (pyproject.toml's package-dir)
PACKAGES = {"services": "cepo_services", "proto": "cepo_proto", "cepo": "cepo"}
FIRST_PARTY = ("cepo", "cepo_services", "cepo_proto", "services", "proto")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    parts[0] = PACKAGES.get(parts[0], parts[0])
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found += [(node.lineno, f"{base}.{alias.name}" if base else alias.name) for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def _top(name: str) -> list[str]:
    return name.split(".")


def violations(root: Path) -> list[str]:
    """Every import under ``root/services`` and ``root/proto`` that crosses a layer boundary."""
    problems = []
    for path in sorted((root / "services").rglob("*.py")):
        parts = path.relative_to(root / "services").parts
        own = (
            parts[0] if len(parts) > 1 else None
        )  # the service folder (or "common"); None: services/__init__
        for line, name in imports_of(path, root):
            top = _top(name)
            where = f"{path.relative_to(root)}:{line} imports {name}"
            if top[0] in ("cepo", "services", "proto"):
                problems.append(f"{where} (the control plane, or a package by its folder name)")
            elif top[0] == "cepo_services" and len(top) > 1 and top[1] not in ("common", own):
                problems.append(f"{where} (another service's internals)")
    for path in sorted((root / "proto").rglob("*.py")):
        for line, name in imports_of(path, root):
            if _top(name)[0] in ("cepo", "cepo_services", "services"):
                problems.append(
                    f"{path.relative_to(root)}:{line} imports {name} (messages depend on no layer)"
                )
    return problems


def test_services_never_import_the_control_plane_or_each_other():
    assert violations(REPO) == []


def test_every_service_is_a_folder_of_its_own():
    folders = {p.name for p in (REPO / "services").iterdir() if (p / "__init__.py").is_file()}
    assert folders == {"common", "learner", "rollout", "teacher", "verifier"}


@pytest.mark.parametrize(
    ("file", "source", "expected"),
    [
        ("rollout/replica.py", "from cepo import telemetry\n", "the control plane"),
        ("teacher/replica.py", "from cepo_services.rollout.replica import X\n", "another service"),
        ("learner/policy.py", "def f():\n    import cepo.config\n", "the control plane"),
        ("verifier/grader.py", "from ..learner import policy\n", "another service"),
        ("common/engines.py", "from cepo_services.teacher import replica\n", "another service"),
        (
            "rollout/replica.py",
            "import importlib\nimportlib.import_module('cepo.controller')\n",
            "control plane",
        ),
        ("rollout/replica.py", "from services.common import metrics\n", "folder name"),
    ],
)
def test_the_walk_catches_each_kind_of_crossing(tmp_path, file, source, expected):
    for folder in ("common", "learner", "rollout", "teacher", "verifier"):
        (tmp_path / "services" / folder).mkdir(parents=True)
        (tmp_path / "services" / folder / "__init__.py").write_text("")
    (tmp_path / "proto").mkdir()
    (tmp_path / "services" / file).write_text(source)
    found = violations(tmp_path)
    assert len(found) == 1 and expected in found[0] and file in found[0]


def test_allowed_imports_pass(tmp_path):
    (tmp_path / "services" / "teacher").mkdir(parents=True)
    (tmp_path / "proto").mkdir()
    (tmp_path / "services" / "teacher" / "replica.py").write_text(
        "from cepo_proto.pipeline import TeacherRequest\nfrom cepo_services.common import metrics\n"
        "from cepo_services.teacher import sequences\nfrom . import sequences as s\nimport torch\n"
    )
    assert violations(tmp_path) == []


def test_every_package_is_installed_by_a_plain_install() -> None:
    """pyproject's explicit package list names every package folder: a non-editable install (a container
    image, a wheel) would silently lack one that is missing (as `cepo serve` once was)."""
    import tomllib

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    roots = {name: REPO / folder for name, folder in setuptools["package-dir"].items() if name}
    roots["cepo"] = REPO / "cepo"
    found = set()
    for name, folder in roots.items():
        for init in folder.rglob("__init__.py"):
            parts = init.parent.relative_to(folder).parts
            found.add(".".join((name, *parts)))
    assert found - listed == set(), (
        f"package folders missing from pyproject's packages: {sorted(found - listed)}"
    )
    assert listed - found == set(), f"listed but not package folders: {sorted(listed - found)}"
