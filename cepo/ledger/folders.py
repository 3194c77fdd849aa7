"""The run folder as the run's record when there is no Redis ledger.

:func:`list_run_folders` and :func:`read_run_folder` read ``config.yaml``, ``metrics.jsonl``,
``checkpoints/step_NNNNN``, ``summary.json`` and ``eval.jsonl`` into the shape of the Redis records
(:mod:`cepo.ledger.store`), plus ``heldout`` (:func:`folder_heldout`); :func:`folder_steps` turns
``metrics.jsonl`` into ledger step entries. Run folders are found at any depth under the root
(``runs/cmp/cepo/seed0`` from ``cepo compare``), and a run's id is its path relative to the root.
:func:`resolve_run` turns what a user typed for a run — a folder path, or an id (or unique id prefix) under the
root — into its folder: every command that names a run goes through it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from cepo.ledger.store import LedgerError, _close_matches

__all__ = [
    "find_run_folders",
    "folder_heldout",
    "folder_steps",
    "list_run_folders",
    "read_run_folder",
    "resolve_run",
]

MAX_DEPTH = 6  # folders below the root searched for runs


def _read_metrics(path: Path) -> list[dict]:
    """The parseable lines of metrics.jsonl (a torn last line from a crash is skipped)."""
    if not path.is_file():
        return []
    reports = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            reports.append(value)
    return reports


def _folder_checkpoints(folder: Path) -> list[dict]:
    root = folder / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        name = child.name
        if not child.is_dir() or not name.startswith("step_") or not name[5:].isdigit():
            continue  # step_00010.tmp is a checkpoint being written
        found.append({"step": int(name[5:]), "path": str(child), "at": child.stat().st_mtime})
    return sorted(found, key=lambda c: c["step"])


def _load_config(folder: Path) -> dict:
    path = folder / "config.yaml"
    try:
        config = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise LedgerError(f"run folder {folder}: cannot read config.yaml ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise LedgerError(f"run folder {folder}: config.yaml is not valid YAML ({exc})") from exc
    if not isinstance(config, dict):
        raise LedgerError(f"run folder {folder}: config.yaml is not a mapping")
    return config


def _average(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _read_eval(path: Path) -> dict[int, list[dict]]:
    """eval.jsonl by step (a torn or foreign line is skipped)."""
    by_step: dict[int, list[dict]] = {}
    for row in _read_metrics(path):
        if isinstance(row.get("step"), int) and not isinstance(row.get("step"), bool):
            by_step.setdefault(row["step"], []).append(row)
    return by_step


def _suite_average(rows: list[dict], key: str) -> float | None:
    values = [
        float(r[key]) for r in rows if isinstance(r.get(key), int | float) and not isinstance(r[key], bool)
    ]
    return _average(values)


def folder_heldout(folder: str | Path) -> dict | None:
    """Held-out accuracy of a run folder: ``{"accuracy", "base", "greedy", "base_greedy", "step"}`` — the
    average over the evaluated suites (sampled; greedy where evaluated) of the latest evaluation and of the
    base policy's (step 0). From summary.json when the run finished, else from eval.jsonl; None without any."""
    folder = Path(folder)
    summary = None
    if (folder / "summary.json").is_file():
        try:
            summary = json.loads((folder / "summary.json").read_text())
        except (OSError, ValueError):
            summary = None

    def average(block: object) -> float | None:
        if not isinstance(block, dict) or not block:
            return None
        value = block.get("average")
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        return _average([float(v) for v in block.values() if isinstance(v, int | float)])

    if isinstance(summary, dict) and average(summary.get("trained")) is not None:
        steps = summary.get("steps")
        return {
            "accuracy": average(summary.get("trained")),
            "base": average(summary.get("base")),
            "greedy": average(summary.get("trained_greedy")),
            "base_greedy": average(summary.get("base_greedy")),
            "step": steps if isinstance(steps, int) else None,
        }
    by_step = _read_eval(folder / "eval.jsonl")
    if not by_step:
        return None
    last = max(by_step)
    base = by_step.get(0, [])
    return {
        "accuracy": _suite_average(by_step[last], "sampled"),
        "base": _suite_average(base, "sampled"),
        "greedy": _suite_average(by_step[last], "greedy"),
        "base_greedy": _suite_average(base, "greedy"),
        "step": last,
    }


def _folder_record(folder: Path, config: dict, reports: list[dict], run_id: str | None = None) -> dict:
    last = reports[-1] if reports else None
    algorithm = config.get("algorithm") if isinstance(config.get("algorithm"), dict) else {}
    summary = folder / "summary.json"
    metrics = folder / "metrics.jsonl"
    config_path = folder / "config.yaml"
    finished = summary.is_file()
    return {
        "id": run_id or folder.name,
        "name": config.get("name", folder.name),
        "method": algorithm.get("method", last.get("method") if last else None),
        "status": "finished" if finished else "incomplete",
        "step": len(reports),
        "policy_version": last.get("adapter_version", last.get("policy_version")) if last else None,
        "run_dir": str(folder),
        "started_at": config_path.stat().st_mtime,
        "updated_at": metrics.stat().st_mtime if metrics.is_file() else config_path.stat().st_mtime,
        "finished_at": summary.stat().st_mtime if finished else None,
        "error": None,
        "last_metrics": last,
        "heldout": folder_heldout(folder),
    }


def find_run_folders(root: str | Path = "runs", max_depth: int = MAX_DEPTH) -> list[Path]:
    """Every folder under ``root`` (not ``root`` itself) holding a config.yaml, at most ``max_depth`` levels
    down; a run folder's own sub-folders (checkpoints, steps, …) and hidden folders are not searched."""
    root = Path(root)
    found = []
    for current, dirs, _files in os.walk(root):  # symbolic links to folders are not followed
        here = Path(current)
        depth = len(here.relative_to(root).parts)
        if depth > 0 and (here / "config.yaml").is_file():
            found.append(here)
            dirs.clear()
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < max_depth else []
    return found


def list_run_folders(root: str | Path = "runs") -> list[dict]:
    """Every run folder under ``root`` (nested ones too), as ledger-shaped rows, newest first; a row's id is
    the folder's path relative to ``root`` (``tiny-20250101-120000``, ``cmp/cepo/seed0``)."""
    root = Path(root)
    if not root.is_dir():
        return []
    rows = []
    for folder in find_run_folders(root):
        try:
            config = _load_config(folder)
        except LedgerError:
            config = {}
        run_id = folder.relative_to(root).as_posix()
        rows.append(_folder_record(folder, config, _read_metrics(folder / "metrics.jsonl"), run_id))
    return sorted(rows, key=lambda r: (r["started_at"], r["id"]), reverse=True)


def read_run_folder(path: str | Path) -> dict:
    """The full record of one run folder: the row of :func:`list_run_folders` plus ``checkpoints``,
    ``config`` (config.yaml) and ``summary`` (summary.json, or None)."""
    folder = Path(path)
    if not folder.is_dir():
        raise LedgerError(f"run folder {folder} does not exist")
    if not (folder / "config.yaml").is_file():
        below = [f.relative_to(folder).as_posix() for f in find_run_folders(folder)]
        hint = f" (run folders below it: {_shown(below)})" if below else ""
        raise LedgerError(f"{folder} is not a run folder: it has no config.yaml{hint}")
    config = _load_config(folder)
    record = _folder_record(folder, config, _read_metrics(folder / "metrics.jsonl"))
    record["config"] = config
    record["checkpoints"] = _folder_checkpoints(folder)
    summary = None
    if (folder / "summary.json").is_file():
        try:
            summary = json.loads((folder / "summary.json").read_text())
        except ValueError:
            summary = None
    record["summary"] = summary
    return record


def folder_steps(path: str | Path, count: int | None = None) -> list[dict]:
    """metrics.jsonl as ledger step entries ``{"report", "samples"}`` (samples only where a line has them)."""
    reports = _read_metrics(Path(path) / "metrics.jsonl")
    if count is not None:
        reports = reports[-count:] if count > 0 else []
    out = []
    for report in reports:
        report = dict(report)
        samples = report.pop("samples", None)
        out.append({"report": report, "samples": samples if isinstance(samples, list) else []})
    return out


def _shown(ids: list[str], limit: int = 10) -> str:
    return ", ".join(ids[:limit]) + (f", … ({len(ids)} in all)" if len(ids) > limit else "")


def _redis_run_dir(run: str, redis_url: str) -> Path:
    """The folder of the Redis ledger's run ``run`` (id or unique prefix), when it is on this machine."""
    from cepo.ledger.store import RunLedger

    with RunLedger(redis_url) as ledger:
        record = ledger.get_run(run)
    run_dir = record.get("run_dir")
    if not run_dir:
        raise LedgerError(f"run {record.get('id', run)!r} of the Redis ledger records no run folder")
    folder = Path(str(run_dir))
    if not folder.is_dir():
        raise LedgerError(f"run {record.get('id', run)!r}: its run folder {folder} is not on this machine")
    return folder


def resolve_run(run: str | Path, root: str | Path = "runs", redis_url: str | None = None) -> Path:
    """The run folder a user named, given as a path or as a run id — the one place every command resolves it.

    In order: ``run`` as a path to a run folder (holding config.yaml); ``ROOT/run`` (an id, nested ones too:
    ``cmp/cepo/seed0``); any other existing folder ``run`` as it is (the command then says what it lacks). An
    absolute or ``./``-relative ``run`` is a path only; anything else is then looked up as an id: the run
    folder under ``root`` whose id is ``run`` (without a leading ``ROOT/``), starts with it (a unique prefix)
    or ends with ``/run`` (a unique tail: ``cepo/seed0``); with ``redis_url``, the Redis ledger's run of that
    id (or unique prefix), when its folder is on this machine. Raises :class:`LedgerError` otherwise, listing
    the close matches among the ids under ``root`` (or the ids there, when there are few)."""
    text = str(run)
    path = Path(text).expanduser()
    root = Path(root)
    if (path / "config.yaml").is_file():
        return path
    if not path.is_absolute() and (root / path / "config.yaml").is_file():
        return root / path
    if path.is_dir():
        return path
    if path.exists():
        raise LedgerError(f"{path} is a file, not a run folder")
    if path.is_absolute() or text.startswith(("./", "../", "~", ".\\", "..\\")):
        raise LedgerError(f"no run folder {path}: no such folder")  # a path, not an id
    ids = [f.relative_to(root).as_posix() for f in find_run_folders(root)] if root.is_dir() else []
    wanted = text.replace("\\", "/").strip("/")
    prefix = root.as_posix().rstrip("/") + "/"
    if wanted.startswith(prefix):  # runs/<id prefix>: the id is what follows the root
        wanted = wanted[len(prefix) :]
    if wanted:
        matches = sorted(i for i in ids if i.startswith(wanted) or i.endswith("/" + wanted))
        if len(matches) == 1:
            return root / matches[0]
        if matches:
            raise LedgerError(
                f"run {text!r} is ambiguous among the run folders under {root}: {_shown(matches)}"
            )
    problem = f"no run {text!r}: no such folder, and no run id under {root} matches it"
    if redis_url:
        try:
            return _redis_run_dir(text, redis_url)
        except LedgerError as exc:
            problem += f"; {exc}"
    close = _close_matches(wanted, ids) if wanted else []
    if close:
        problem += f"; close matches: {', '.join(close)}"
    elif ids and len(ids) <= 10:
        problem += f"; runs there: {', '.join(ids)}"
    elif not ids:
        problem += f" ({root} holds no run folders)"
    raise LedgerError(problem)
