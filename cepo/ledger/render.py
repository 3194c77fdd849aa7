"""``cepo runs list/show``: rich tables of ledger records, from Redis or from run folders.

:func:`cli_list` and :func:`cli_show` read the Redis ledger (:class:`~cepo.ledger.store.RunLedger`) when a URL
is given, else the run folders (:mod:`cepo.ledger.folders`); both give records of the same shape, drawn by
:func:`runs_table` and :func:`run_details`.

Steps are shown as the user names them: step k is the k-th training step (a step report's ``step`` field,
counted from 0 in ``metrics.jsonl`` and the Redis stream, is shown as ``step + 1``), a checkpoint and a held-out
evaluation are labelled by the steps done before them (``@k``: after k steps; 0: the base policy).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from cepo.ledger.folders import folder_heldout, folder_steps, list_run_folders, read_run_folder, resolve_run
from cepo.ledger.store import RunLedger, mask_url

__all__ = ["cli_list", "cli_show", "run_details", "runs_table"]


def _fmt_time(value: Any) -> str:
    if value in (None, ""):
        return "-"
    try:
        return _dt.datetime.fromtimestamp(float(value)).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError, OSError):
        return str(value)


def _fmt_num(value: Any, digits: int = 3) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


_STATUS_STYLE = {
    "running": "yellow",
    "finished": "green",
    "failed": "red",
    "interrupted": "magenta",
    "incomplete": "dim",
}


def _report_step(report: dict) -> Any:
    """A step report's step as shown: the k-th step (its ``step`` field, counted from 0, plus one)."""
    step = report.get("step")
    return step + 1 if isinstance(step, int) and not isinstance(step, bool) else step


def _fmt_heldout(heldout: Any) -> str:
    """``base → latest @step`` of a row's ``heldout`` (sampled accuracy averaged over the held-out suites)."""
    if not isinstance(heldout, dict) or heldout.get("accuracy") is None:
        return "-"
    text = _fmt_num(heldout["accuracy"])
    if heldout.get("base") is not None:
        text = f"{_fmt_num(heldout['base'])} → {text}"
    if heldout.get("step") is not None:
        text += f" @{heldout['step']}"
    return text


def runs_table(rows: list[dict]):
    """A rich Table of run rows (from :meth:`RunLedger.list_runs` or :func:`list_run_folders`)."""
    from rich.table import Table

    table = Table(title="runs", show_lines=False)
    for column, justify in (
        ("id", "left"),
        ("name", "left"),
        ("method", "left"),
        ("status", "left"),
        ("steps", "right"),
        ("version", "right"),
        ("reward", "right"),
        ("accuracy", "right"),
        ("held-out", "right"),
        ("started", "left"),
        ("run dir", "left"),
    ):
        table.add_column(column, justify=justify, overflow="fold")
    for row in rows:
        metrics = row.get("last_metrics") or {}
        status = str(row.get("status") or "-")
        style = _STATUS_STYLE.get(status, "")
        table.add_row(
            str(row.get("id", "-")),
            str(row.get("name") or "-"),
            str(row.get("method") or "-"),
            f"[{style}]{status}[/]" if style else status,
            _fmt_num(row.get("step")),
            _fmt_num(row.get("policy_version")),
            _fmt_num(metrics.get("reward_mean")),
            _fmt_num(metrics.get("accuracy")),
            _fmt_heldout(row.get("heldout")),
            _fmt_time(row.get("started_at")),
            str(row.get("run_dir") or "-"),
        )
    return table


def _truncate(text: Any, limit: int = 400) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_details(record: dict, steps: list[dict] | None = None):
    """A rich renderable: the record's fields, checkpoints, last metrics, the last step reports and one
    sample rollout."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold")
    fields.add_column(overflow="fold")
    for key in ("id", "name", "method", "status", "step", "policy_version", "run_dir"):
        fields.add_row("steps done" if key == "step" else key, _fmt_num(record.get(key)))
    for key in ("started_at", "updated_at", "finished_at"):
        fields.add_row(key, _fmt_time(record.get(key)))
    heldout = record.get("heldout")
    if isinstance(heldout, dict) and heldout.get("accuracy") is not None:
        fields.add_row("held-out (sampled)", _fmt_heldout(heldout))
        if heldout.get("greedy") is not None:
            greedy = {
                "accuracy": heldout["greedy"],
                "base": heldout.get("base_greedy"),
                "step": heldout.get("step"),
            }
            fields.add_row("held-out (greedy)", _fmt_heldout(greedy))
    if record.get("error"):
        fields.add_row("error", Text(str(record["error"]), style="red"))
    parts.append(Panel(fields, title=f"run {record.get('id', '?')}", expand=False))

    checkpoints = record.get("checkpoints") or []
    if checkpoints:
        table = Table(title="checkpoints")
        table.add_column("after step", justify="right")
        table.add_column("path", overflow="fold")
        table.add_column("at")
        for ckpt in checkpoints:
            table.add_row(_fmt_num(ckpt.get("step")), str(ckpt.get("path")), _fmt_time(ckpt.get("at")))
        parts.append(table)
    else:
        parts.append(Text("no checkpoints", style="dim"))

    metrics = record.get("last_metrics") or {}
    if metrics:
        table = Table(title="last metrics")
        table.add_column("metric")
        table.add_column("value", justify="right", overflow="fold")
        for key, value in metrics.items():
            if key == "step":
                value = _report_step(metrics)
            if isinstance(value, dict):
                value = ", ".join(f"{k}={_fmt_num(v)}" for k, v in value.items())
            table.add_row(str(key), _fmt_num(value, 4) if not isinstance(value, str) else value)
        parts.append(table)

    if steps:
        table = Table(title=f"last {len(steps)} steps")
        for column in ("step", "reward", "accuracy", "λ", "Δ+ frac", "Δ− frac", "step s"):
            table.add_column(column, justify="right")
        for entry in steps:
            report = entry.get("report") or {}
            table.add_row(
                _fmt_num(_report_step(report)),
                _fmt_num(report.get("reward_mean")),
                _fmt_num(report.get("accuracy")),
                _fmt_num(report.get("lam")),
                _fmt_num(report.get("delta_pos_frac")),
                _fmt_num(report.get("delta_neg_frac")),
                _fmt_num(report.get("step_seconds"), 2),
            )
        parts.append(table)
        sample_step, sample = None, None
        for entry in reversed(steps):
            if entry.get("samples"):
                sample_step, sample = _report_step(entry.get("report") or {}), entry["samples"][0]
                break
        if sample is not None:
            body = Table.grid(padding=(0, 2))
            body.add_column(style="bold")
            body.add_column(overflow="fold")
            body.add_row("prompt", _truncate(sample.get("prompt", "")))
            body.add_row("response", _truncate(sample.get("response", "")))
            body.add_row("answer", str(sample.get("answer", "")))
            body.add_row("reward", _fmt_num(sample.get("reward")))
            body.add_row("correct", str(sample.get("correct", "")))
            parts.append(Panel(body, title=f"sample rollout (step {_fmt_num(sample_step)})", expand=False))
    return Group(*parts)


# ---------------------------------------------------------------------------------------------- CLI
def cli_list(redis_url: str | None, root: Path, limit: int, console) -> None:
    """``cepo runs list``: the ledger's runs when ``redis_url`` is set, else the run folders under ``root``.
    Raises LedgerError (the CLI prints it) when Redis cannot be reached."""
    if redis_url:
        with RunLedger(redis_url) as ledger:
            rows = ledger.list_runs(limit)
        where = f"Redis ledger {mask_url(redis_url)}"
        for row in rows:  # held-out accuracy lives in the run folder, when it is on this machine
            row.setdefault("heldout", _local_heldout(row.get("run_dir")))
    else:
        rows = list_run_folders(root)[: max(limit, 0)]
        where = f"run folders under {root}"
    if not rows:
        console.print(f"no runs in {where}")
        return
    console.print(runs_table(rows))


def _local_heldout(run_dir: Any) -> dict | None:
    try:
        return folder_heldout(run_dir) if run_dir and Path(run_dir).is_dir() else None
    except OSError:
        return None


def cli_show(run: str, redis_url: str | None, root: Path, steps: int, console) -> None:
    """``cepo runs show RUN``: ``run`` is a run folder path, or a run id / unique id prefix looked up in the
    ledger (``redis_url`` set) or among the folders under ``root`` (a nested run's id is its path below
    ``root``, e.g. ``cmp/cepo/seed0``) — :func:`~cepo.ledger.folders.resolve_run`. Raises LedgerError when
    not found."""
    path = Path(run).expanduser()
    if redis_url and not path.is_dir() and not (Path(root) / run / "config.yaml").is_file():
        with RunLedger(redis_url) as ledger:
            record = ledger.get_run(run)
            entries = ledger.steps(record["id"], steps) if steps > 0 else []
        record.setdefault("heldout", _local_heldout(record.get("run_dir")))
    else:
        folder = resolve_run(run, root)
        record = read_run_folder(folder)  # LedgerError naming it when it is not a run folder
        entries = folder_steps(folder, steps)
        if folder.resolve().is_relative_to(Path(root).resolve()):  # the id `runs list` shows
            record["id"] = folder.resolve().relative_to(Path(root).resolve()).as_posix()
    console.print(run_details(record, entries))
