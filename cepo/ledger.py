"""The run ledger: one record per training run in Redis, plus a stream of per-step reports.

Key layout (``prefix`` defaults to ``cepo:``)::

    cepo:runs                    ZSET    run id → started_at (unix seconds); newest first = ZREVRANGE
    cepo:run:{id}                HASH    id, name, method, status (running|finished|failed|interrupted),
                                         step (steps done), policy_version, run_dir, config (JSON),
                                         started_at, updated_at, finished_at, error, last_metrics (JSON)
    cepo:run:{id}:checkpoints    LIST    JSON {"step": int, "path": str, "at": unix seconds}, oldest first
    cepo:run:{id}:steps          STREAM  one entry per step: {"report": StepReport JSON,
                                         "samples": JSON list of {prompt, response, answer, reward, correct}},
                                         capped at about ``stream_maxlen`` entries (MAXLEN ~)

Every multi-key write is one MULTI/EXEC transaction, so a reader never sees half a step. Without Redis the
run folder is the record: :func:`list_run_folders` and :func:`read_run_folder` read ``config.yaml``,
``metrics.jsonl``, ``checkpoints/step_NNNNN`` and ``summary.json`` into the same shape, so ``cepo runs
list/show`` work either way (:func:`cli_list`, :func:`cli_show`).
"""

from __future__ import annotations

import datetime as _dt
import difflib
import json
import time
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

CONFIG_KEY = "logging.redis_url"
STATUSES = ("running", "finished", "failed", "interrupted")
FINAL_STATUSES = ("finished", "failed", "interrupted")
_INT_FIELDS = ("step", "policy_version")
_FLOAT_FIELDS = ("started_at", "updated_at", "finished_at")
_JSON_FIELDS = ("config", "last_metrics")


class LedgerError(RuntimeError):
    """The ledger cannot do what was asked: Redis unreachable, unknown run, bad run folder, …"""


# ---------------------------------------------------------------------------------------------- helpers
def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to print)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{user}:***@{host}" + (f":{port}" if port is not None else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _cause(exc: BaseException) -> str:
    """The most telling description of why a Redis call failed (the socket error when there is one)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        current = current.__cause__ or current.__context__
    text = str(exc).strip()
    return text or type(exc).__name__


def _now() -> float:
    return time.time()


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


def _close_matches(wanted: str, candidates: list[str]) -> list[str]:
    return difflib.get_close_matches(wanted, candidates, n=5, cutoff=0.4)


def _resolve_id(wanted: str, candidates: list[str], where: str) -> str:
    """Exact id, else the unique id starting with ``wanted``; LedgerError naming the id otherwise."""
    if wanted in candidates:
        return wanted
    matches = sorted(c for c in candidates if c.startswith(wanted))
    if len(matches) == 1:
        return matches[0]
    if matches:
        shown = ", ".join(matches[:20]) + (f", … ({len(matches)} in all)" if len(matches) > 20 else "")
        raise LedgerError(f"run id prefix {wanted!r} is ambiguous in {where}: matches {shown}")
    close = _close_matches(wanted, candidates)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise LedgerError(f"no run {wanted!r} in {where}{hint}")


# ---------------------------------------------------------------------------------------------- Redis
class RunLedger:
    """Run records in Redis (see the module docstring for the key layout)."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 2.0,
        prefix: str = "cepo:",
        stream_maxlen: int = 10_000,
    ) -> None:
        import redis

        self.url = url
        self.prefix = prefix
        self.stream_maxlen = stream_maxlen
        where = f"{CONFIG_KEY} {mask_url(url)}"
        try:
            self._r = redis.Redis.from_url(
                url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                decode_responses=True,
            )
        except (ValueError, TypeError, redis.RedisError) as exc:
            raise LedgerError(f"{where}: not a usable Redis URL ({_cause(exc)})") from exc
        try:
            self._r.ping()
        except (redis.RedisError, OSError) as exc:
            self._r.close()
            raise LedgerError(f"{where}: cannot reach Redis ({_cause(exc)})") from exc
        self._where = f"the Redis ledger ({mask_url(url)})"

    # ------------------------------------------------------------------------------------------ keys
    @property
    def runs_key(self) -> str:
        return f"{self.prefix}runs"

    def run_key(self, run_id: str) -> str:
        return f"{self.prefix}run:{run_id}"

    def checkpoints_key(self, run_id: str) -> str:
        return f"{self.prefix}run:{run_id}:checkpoints"

    def steps_key(self, run_id: str) -> str:
        return f"{self.prefix}run:{run_id}:steps"

    # ------------------------------------------------------------------------------------------ plumbing
    def _call(self, what: str, fn, *args, **kwargs):
        import redis

        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise LedgerError(f"{CONFIG_KEY} {mask_url(self.url)}: {what} failed ({_cause(exc)})") from exc

    def _require_run(self, run_id: str) -> None:
        if not self._call("EXISTS", self._r.exists, self.run_key(run_id)):
            raise LedgerError(f"no run {run_id!r} in {self._where}")

    @staticmethod
    def _decode(raw: dict[str, str]) -> dict[str, Any]:
        record: dict[str, Any] = dict(raw)
        for key in _INT_FIELDS:
            try:
                record[key] = int(raw[key]) if raw.get(key, "") != "" else None
            except ValueError:
                record[key] = None
        for key in _FLOAT_FIELDS:
            try:
                record[key] = float(raw[key]) if raw.get(key, "") != "" else None
            except ValueError:
                record[key] = None
        for key in _JSON_FIELDS:
            try:
                record[key] = json.loads(raw[key]) if raw.get(key, "") != "" else None
            except ValueError:
                record[key] = None
        record["error"] = raw.get("error") or None
        return record

    # ------------------------------------------------------------------------------------------ writes
    def start_run(self, run_id: str, *, name: str, method: str, config: dict, run_dir: str) -> None:
        """Create the run record (status ``running``). A finished/failed/interrupted id is overwritten (its
        checkpoints and steps dropped); a ``running`` one is refused."""
        import redis

        config_json = json.dumps(config, default=str)
        now = _now()
        key = self.run_key(run_id)
        mapping = {
            "id": run_id,
            "name": name,
            "method": method,
            "status": "running",
            "step": 0,
            "policy_version": -1,
            "run_dir": str(run_dir),
            "config": config_json,
            "started_at": repr(now),
            "updated_at": repr(now),
            "finished_at": "",
            "error": "",
            "last_metrics": "",
        }
        try:
            with self._r.pipeline(transaction=True) as pipe:
                for _ in range(10):
                    try:
                        pipe.watch(key)
                        status = pipe.hget(key, "status")
                        if status == "running":
                            pipe.unwatch()
                            raise LedgerError(
                                f"run {run_id!r} is already running in {self._where}; choose another run id "
                                f"or finish it first"
                            )
                        pipe.multi()
                        pipe.delete(key, self.checkpoints_key(run_id), self.steps_key(run_id))
                        pipe.hset(key, mapping=mapping)
                        pipe.zadd(self.runs_key, {run_id: now})
                        pipe.execute()
                        return
                    except redis.WatchError:
                        continue
                raise LedgerError(f"run {run_id!r}: concurrent updates kept interrupting start_run")
        except redis.RedisError as exc:
            raise LedgerError(f"{CONFIG_KEY} {mask_url(self.url)}: start_run failed ({_cause(exc)})") from exc

    def record_step(self, run_id: str, report: dict, samples: list[dict]) -> None:
        """One finished step: update the run hash and append ``{report, samples}`` to its stream, atomically.
        Everything is serialised before anything is sent, so a bad report changes nothing."""
        try:
            report_json = json.dumps(report, allow_nan=True)
            samples_json = json.dumps(samples, allow_nan=True)
            step_done = int(report["step"]) + 1
            version = int(report.get("policy_version", -1))
        except (TypeError, ValueError, KeyError) as exc:
            raise LedgerError(f"run {run_id!r}: step report cannot be recorded ({exc})") from exc
        self._require_run(run_id)
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(
            self.run_key(run_id),
            mapping={
                "step": step_done,
                "policy_version": version,
                "last_metrics": report_json,
                "updated_at": repr(_now()),
            },
        )
        pipe.xadd(
            self.steps_key(run_id),
            {"report": report_json, "samples": samples_json},
            maxlen=self.stream_maxlen,
            approximate=True,
        )
        self._call("record_step", pipe.execute)

    def add_checkpoint(self, run_id: str, step: int, path: str) -> None:
        """Append a checkpoint ``{step, path, at}`` to the run's list."""
        self._require_run(run_id)
        now = _now()
        pipe = self._r.pipeline(transaction=True)
        pipe.rpush(
            self.checkpoints_key(run_id), json.dumps({"step": int(step), "path": str(path), "at": now})
        )
        pipe.hset(self.run_key(run_id), "updated_at", repr(now))
        self._call("add_checkpoint", pipe.execute)

    def finish(self, run_id: str, status: str = "finished", error: str | None = None) -> None:
        """Close the run with ``status`` (finished | failed | interrupted) and an optional error text."""
        if status not in FINAL_STATUSES:
            raise LedgerError(f"run status must be one of {', '.join(FINAL_STATUSES)}, got {status!r}")
        self._require_run(run_id)
        now = repr(_now())
        self._call(
            "finish",
            self._r.hset,
            self.run_key(run_id),
            mapping={"status": status, "finished_at": now, "updated_at": now, "error": error or ""},
        )

    # ------------------------------------------------------------------------------------------ reads
    def list_runs(self, limit: int = 50) -> list[dict]:
        """The newest ``limit`` runs (without their config), newest first."""
        if limit <= 0:
            return []
        ids = self._call("ZREVRANGE", self._r.zrevrange, self.runs_key, 0, limit - 1)
        pipe = self._r.pipeline(transaction=False)
        for run_id in ids:
            pipe.hgetall(self.run_key(run_id))
        rows = []
        for raw in self._call("list_runs", pipe.execute) if ids else []:
            if not raw:
                continue  # the record was deleted behind the index's back
            row = self._decode(raw)
            row.pop("config", None)
            rows.append(row)
        return rows

    def resolve(self, run_id_or_prefix: str) -> str:
        """The full run id for an id or unique prefix of one."""
        if self._call("ZSCORE", self._r.zscore, self.runs_key, run_id_or_prefix) is not None:
            return run_id_or_prefix
        candidates = self._call("ZRANGE", self._r.zrange, self.runs_key, 0, -1)
        return _resolve_id(run_id_or_prefix, candidates, self._where)

    def get_run(self, run_id_or_prefix: str) -> dict:
        """The full record of a run (id or unique prefix): hash fields, ``config`` dict, ``checkpoints``."""
        run_id = self.resolve(run_id_or_prefix)
        pipe = self._r.pipeline(transaction=True)
        pipe.hgetall(self.run_key(run_id))
        pipe.lrange(self.checkpoints_key(run_id), 0, -1)
        raw, checkpoints = self._call("get_run", pipe.execute)
        if not raw:
            raise LedgerError(f"no run {run_id!r} in {self._where} (indexed but its record is gone)")
        record = self._decode(raw)
        record["checkpoints"] = [json.loads(c) for c in checkpoints]
        return record

    def steps(self, run_id: str, count: int | None = None) -> list[dict]:
        """``[{"report": {...}, "samples": [...]}]`` oldest first; only the last ``count`` when given."""
        key = self.steps_key(run_id)
        if count is None:
            entries = self._call("XRANGE", self._r.xrange, key)
        elif count <= 0:
            return []
        else:
            entries = list(reversed(self._call("XREVRANGE", self._r.xrevrange, key, count=count)))
        return [
            {"id": entry_id, "report": json.loads(fields["report"]), "samples": json.loads(fields["samples"])}
            for entry_id, fields in entries
        ]

    def close(self) -> None:
        self._r.close()

    def __enter__(self) -> RunLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- run folders
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
        "policy_version": last.get("policy_version") if last else None,
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


# ---------------------------------------------------------------------------------------------- rendering
_STATUS_STYLE = {
    "running": "yellow",
    "finished": "green",
    "failed": "red",
    "interrupted": "magenta",
    "incomplete": "dim",
}


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
        fields.add_row(key, _fmt_num(record.get(key)))
    for key in ("started_at", "updated_at", "finished_at"):
        fields.add_row(key, _fmt_time(record.get(key)))
    if record.get("error"):
        fields.add_row("error", Text(str(record["error"]), style="red"))
    parts.append(Panel(fields, title=f"run {record.get('id', '?')}", expand=False))

    checkpoints = record.get("checkpoints") or []
    if checkpoints:
        table = Table(title="checkpoints")
        table.add_column("step", justify="right")
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
                _fmt_num(report.get("step")),
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
                sample_step, sample = (entry.get("report") or {}).get("step"), entry["samples"][0]
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
    else:
        rows = list_run_folders(root)[: max(limit, 0)]
        where = f"run folders under {root}"
    if not rows:
        console.print(f"no runs in {where}")
        return
    console.print(runs_table(rows))


def cli_show(run: str, redis_url: str | None, root: Path, steps: int, console) -> None:
    """``cepo runs show RUN``: ``run`` is a run folder path, or a run id / unique id prefix looked up in the
    ledger (``redis_url`` set) or among the folders under ``root``. Raises LedgerError when not found."""
    path = Path(run)
    if (path / "config.yaml").is_file() or "/" in run or "\\" in run:
        record = read_run_folder(path)  # a path: LedgerError naming it when it is not a run folder
        entries = folder_steps(path, steps)
    elif redis_url:
        with RunLedger(redis_url) as ledger:
            record = ledger.get_run(run)
            entries = ledger.steps(record["id"], steps) if steps > 0 else []
    else:
        root = Path(root)
        ids = [row["id"] for row in list_run_folders(root)]
        folder = root / _resolve_id(run, ids, f"run folders under {root}")
        record = read_run_folder(folder)
        entries = folder_steps(folder, steps)
    console.print(run_details(record, entries))
