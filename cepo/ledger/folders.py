"""The run folder as the run's record when there is no Redis ledger.

:func:`list_run_folders` and :func:`read_run_folder` read ``config.yaml``, ``metrics.jsonl``,
``checkpoints/step_NNNNN`` and ``summary.json`` into the shape of the Redis records (:mod:`cepo.ledger.store`);
:func:`folder_steps` turns ``metrics.jsonl`` into ledger step entries.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from cepo.ledger.store import LedgerError

__all__ = ["folder_steps", "list_run_folders", "read_run_folder"]


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


def _folder_record(folder: Path, config: dict, reports: list[dict]) -> dict:
    last = reports[-1] if reports else None
    algorithm = config.get("algorithm") if isinstance(config.get("algorithm"), dict) else {}
    summary = folder / "summary.json"
    metrics = folder / "metrics.jsonl"
    config_path = folder / "config.yaml"
    finished = summary.is_file()
    return {
        "id": folder.name,
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
    }


def list_run_folders(root: str | Path = "runs") -> list[dict]:
    """Every sub-folder of ``root`` with a config.yaml, as ledger-shaped rows, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    rows = []
    for folder in root.iterdir():
        if not (folder / "config.yaml").is_file():
            continue
        try:
            config = _load_config(folder)
        except LedgerError:
            config = {}
        rows.append(_folder_record(folder, config, _read_metrics(folder / "metrics.jsonl")))
    return sorted(rows, key=lambda r: (r["started_at"], r["id"]), reverse=True)


def read_run_folder(path: str | Path) -> dict:
    """The full record of one run folder: the row of :func:`list_run_folders` plus ``checkpoints``,
    ``config`` (config.yaml) and ``summary`` (summary.json, or None)."""
    folder = Path(path)
    if not folder.is_dir():
        raise LedgerError(f"run folder {folder} does not exist")
    if not (folder / "config.yaml").is_file():
        raise LedgerError(f"{folder} is not a run folder: it has no config.yaml")
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
