"""A run ledger that survives a Redis outage: writes that cannot reach Redis are queued and replayed in order.

:class:`BufferedLedger` wraps a :class:`~cepo.ledger.store.RunLedger` and offers its write methods
(``start_run``, ``record_step``, ``add_checkpoint``, ``finish``). A write that fails because Redis is unreachable
or too slow (a connection error or timeout, or a :class:`LedgerError` wrapping one) never raises: it is queued in
memory and appended to a spool file in the run folder (``<run_dir>/ledger_spool.jsonl``, one JSON object a line,
flushed and fsynced), so a process that dies mid-outage loses nothing: the next :class:`BufferedLedger` for the
same run folder replays it. Queued writes are replayed oldest first, with their original timestamps, before the
next write once Redis answers again; :meth:`BufferedLedger.flush` replays what it can within a time limit (call it
at the end of a run). While Redis is down it is tried at most every ``retry_interval_s`` seconds; writes in
between only queue. One line is logged when Redis goes away and one when it is back.

A write that fails for any other reason (a report that cannot be serialised, an unknown status) raises at once,
as :class:`RunLedger` does. A *queued* write that Redis refuses when it is replayed (e.g. Redis came back without
its data, so the run record is gone) cannot be raised to whoever made it: it is logged, counted in ``dropped``
and kept in ``<run_dir>/ledger_rejected.jsonl``.

Files in the run folder:

- ``ledger_spool.jsonl``: the writes not yet in Redis (plus, at its head, those already replayed, see next);
  removed once everything is replayed.
- ``ledger_spool.replayed``: how many spool lines, from the top, are already in Redis (kept up to date after each
  replayed write, so a crash in the middle of a replay sends at most the write in flight twice).
- ``ledger_rejected.jsonl``: queued writes that Redis refused when replayed (normally absent).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cepo.ledger.store import (
    FINAL_STATUSES,
    LedgerError,
    RunLedger,
    _cause,
    encode_step,
    is_connection_failure,
    mask_url,
)

__all__ = ["REJECTED_NAME", "SPOOL_NAME", "BufferedLedger"]

SPOOL_NAME = "ledger_spool.jsonl"
REJECTED_NAME = "ledger_rejected.jsonl"
_OPS = ("start_run", "resume_run", "record_step", "add_checkpoint", "finish")

_log = logging.getLogger(__name__)


def _default_log(message: str) -> None:
    _log.warning("%s", message)


class BufferedLedger:
    """``RunLedger``'s writes, queued through a Redis outage and replayed in order (see the module docstring).

    ``ledger``: a connected :class:`RunLedger` (its constructor is what fails fast when Redis is unreachable at
    the start of a run). ``run_dir``: the run folder, where the spool lives. ``log``: one-line messages (Redis
    gone, Redis back, writes left by an earlier process, dropped writes). ``retry_interval_s``: while Redis is
    down, the least time between two attempts to reach it.

    Counters: ``queued`` (writes that had to wait), ``replayed`` (queued writes since stored in Redis),
    ``dropped`` (queued writes Redis refused on replay), ``pending`` (writes waiting now); ``down`` is True
    while Redis is believed unreachable. Thread-safe: one lock around every write.
    """

    def __init__(
        self,
        ledger: RunLedger,
        run_dir: str | Path,
        *,
        log: Callable[[str], None] | None = None,
        retry_interval_s: float = 5.0,
        spool_name: str = SPOOL_NAME,
    ) -> None:
        if not math.isfinite(retry_interval_s) or retry_interval_s < 0:
            raise ValueError(f"retry_interval_s must be a finite number ≥ 0, got {retry_interval_s!r}")
        self.ledger = ledger
        self.run_dir = Path(run_dir)
        self.spool_path = self.run_dir / spool_name
        self.done_path = self.spool_path.with_name(self.spool_path.name.removesuffix(".jsonl") + ".replayed")
        self.rejected_path = self.run_dir / REJECTED_NAME
        self.log = log or _default_log
        self.retry_interval_s = float(retry_interval_s)
        self.queued = 0
        self.replayed = 0
        self.dropped = 0
        self.down = False
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._spool_lines = 0  # lines in the spool file
        self._next_try = 0.0  # time.monotonic() before which Redis is not tried again while down
        self._outage_start = 0.0  # time.monotonic() when Redis went away
        self._outage_replayed = 0  # self.replayed when Redis went away
        self._lock = threading.RLock()
        with self._lock:
            self._load_spool()
            left = len(self._queue)
            if not left:
                if self.spool_path.exists():  # everything in it was replayed already (or was not a write)
                    self._spool_finished()
            elif self._drain(force=True):
                self.log(f"ledger: replayed {left} write(s) left in {self.spool_path} by an earlier process")

    # ------------------------------------------------------------------------------------------ writes
    def start_run(self, run_id: str, *, name: str, method: str, config: dict, run_dir: str) -> None:
        """:meth:`RunLedger.start_run`, queued while Redis is unreachable."""
        self._submit(
            "start_run",
            run_id,
            {"name": name, "method": method, "config": config, "run_dir": str(run_dir)},
        )

    def resume_run(
        self, run_id: str, *, step: int, name: str, method: str, config: dict, run_dir: str
    ) -> None:
        """:meth:`RunLedger.resume_run`, queued while Redis is unreachable."""
        args = {"step": int(step), "name": name, "method": method, "config": config, "run_dir": str(run_dir)}
        self._submit("resume_run", run_id, args)

    def record_step(self, run_id: str, report: dict, samples: list[dict]) -> None:
        """:meth:`RunLedger.record_step`, queued while Redis is unreachable; a bad report raises at once."""
        encode_step(run_id, report, samples)  # LedgerError now, whether or not Redis is reachable
        self._submit("record_step", run_id, {"report": report, "samples": samples})

    def add_checkpoint(self, run_id: str, step: int, path: str) -> None:
        """:meth:`RunLedger.add_checkpoint`, queued while Redis is unreachable."""
        try:
            step = int(step)
        except (TypeError, ValueError, OverflowError) as exc:
            raise LedgerError(f"run {run_id!r}: checkpoint step must be an integer ({exc})") from exc
        self._submit("add_checkpoint", run_id, {"step": step, "path": str(path)})

    def finish(self, run_id: str, status: str = "finished", error: str | None = None) -> None:
        """:meth:`RunLedger.finish`, queued while Redis is unreachable; an unknown status raises at once."""
        if status not in FINAL_STATUSES:
            raise LedgerError(f"run status must be one of {', '.join(FINAL_STATUSES)}, got {status!r}")
        self._submit("finish", run_id, {"status": status, "error": None if error is None else str(error)})

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Replay the queued writes, trying Redis again every ``retry_interval_s`` (clamped to 0.5–2 s) until all
        are stored or ``timeout_s`` has passed (always at least one attempt, whatever the retry interval). True
        when nothing is left; otherwise the rest stays queued and in the spool file, for a later write, flush or
        process."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            with self._lock:
                if self._drain(force=True):
                    return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, max(0.5, min(self.retry_interval_s, 2.0))))

    @property
    def pending(self) -> int:
        """Writes queued and not yet stored in Redis."""
        return len(self._queue)

    def close(self) -> None:
        """Close the wrapped ledger's connections (queued writes stay in the spool file)."""
        self.ledger.close()

    def __enter__(self) -> BufferedLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ plumbing
    def _submit(self, op: str, run_id: str, args: dict[str, Any]) -> None:
        entry = {"op": op, "run_id": run_id, "at": time.time(), "args": args}
        line = self._encode(entry)  # a config or report that JSON cannot hold fails here, before anything
        with self._lock:
            if self._queue:
                self._drain(force=False)  # the older writes first, when a retry is due
            if not self._queue and not (self.down and time.monotonic() < self._next_try):
                try:
                    self._apply(entry)
                    if self.down:
                        self._came_back()
                    return
                except Exception as exc:
                    if not is_connection_failure(exc):
                        raise
                    self._went_away(exc)
            self._enqueue(line)

    @staticmethod
    def _encode(entry: dict[str, Any]) -> str:
        try:
            return json.dumps(entry, allow_nan=True, default=str)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise LedgerError(
                f"run {entry['run_id']!r}: {entry['op']} cannot be recorded (not JSON-serialisable: {exc})"
            ) from exc

    def _apply(self, entry: dict[str, Any]) -> None:
        op, run_id, args, at = entry["op"], entry["run_id"], entry["args"], entry.get("at")
        if op == "start_run":
            self.ledger.start_run(run_id, at=at, **args)
        elif op == "resume_run":
            self.ledger.resume_run(run_id, at=at, **args)
        elif op == "record_step":
            self.ledger.record_step(run_id, args["report"], args["samples"], at=at)
        elif op == "add_checkpoint":
            self.ledger.add_checkpoint(run_id, args["step"], args["path"], at=at)
        elif op == "finish":
            self.ledger.finish(run_id, args["status"], args.get("error"), at=at)
        else:
            raise LedgerError(f"unknown ledger write {op!r} (expected one of {', '.join(_OPS)})")

    def _enqueue(self, line: str) -> None:
        entry = json.loads(line)  # a copy: what the caller changes later is not what gets replayed
        entry["_line"] = None  # its line in the spool file, once written there
        self._queue.append(entry)
        self.queued += 1
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not self.spool_path.exists():
                self.done_path.unlink(missing_ok=True)  # a stale count belongs to a spool that is gone
                self._spool_lines = 0
            with self.spool_path.open("a", encoding="utf-8") as fh:
                fh.write(line + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self._spool_lines += 1
            entry["_line"] = self._spool_lines
        except OSError as exc:  # the write stays queued in memory; losing the spool must not stop the run
            self.log(
                f"ledger: cannot append to {self.spool_path} ({exc}); the write is queued in memory only"
            )

    def _drain(self, *, force: bool) -> bool:
        """Replay the queue oldest first; True when it is empty. Without ``force`` only when a retry is due."""
        if not self._queue:
            return True
        if not force and self.down and time.monotonic() < self._next_try:
            return False
        while self._queue:
            entry = self._queue[0]
            try:
                self._apply(entry)
            except Exception as exc:
                if is_connection_failure(exc):
                    self._went_away(exc)
                    return False
                self._reject(entry, exc)
            else:
                self.replayed += 1
            self._queue.popleft()
            if entry.get("_line"):
                self._mark_done(entry["_line"])
        self._spool_finished()
        self._came_back()
        return True

    def _went_away(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._next_try = now + self.retry_interval_s
        if not self.down:
            self.down = True
            self._outage_start, self._outage_replayed = now, self.replayed
            self.log(
                f"ledger: Redis at {mask_url(self.ledger.url)} is unreachable ({_cause(exc)}); queueing ledger "
                f"writes (spool: {self.spool_path}), retrying at most every {self.retry_interval_s:g}s"
            )

    def _came_back(self) -> None:
        if self.down:
            self.down = False
            self.log(
                f"ledger: Redis at {mask_url(self.ledger.url)} is back after "
                f"{time.monotonic() - self._outage_start:.1f}s; replayed "
                f"{self.replayed - self._outage_replayed} queued write(s)"
            )

    def _reject(self, entry: dict[str, Any], exc: BaseException) -> None:
        self.dropped += 1
        self.log(
            f"ledger: Redis refused a queued {entry['op']} of run {entry['run_id']!r} ({exc}); "
            f"kept in {self.rejected_path}"
        )
        record = {k: v for k, v in entry.items() if k != "_line"}
        self._keep_rejected({**record, "refused": str(exc)})

    def _keep_rejected(self, record: dict[str, Any]) -> None:
        try:
            line = self._encode({"op": "?", "run_id": "?", **record})
            with self.rejected_path.open("a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        except (OSError, LedgerError) as exc:
            self.log(f"ledger: cannot write {self.rejected_path} ({exc})")

    def _mark_done(self, line: int) -> None:
        """Record that the spool's lines up to ``line`` (1-based) are in Redis."""
        if not self.spool_path.exists():
            return
        tmp = self.done_path.with_name(self.done_path.name + ".tmp")
        try:
            tmp.write_text(f"{line}\n")
            tmp.replace(self.done_path)
        except OSError as exc:
            self.log(f"ledger: cannot write {self.done_path} ({exc})")

    def _spool_finished(self) -> None:
        try:
            self.spool_path.unlink(missing_ok=True)
            self.done_path.unlink(missing_ok=True)
        except OSError as exc:
            self.log(f"ledger: cannot remove {self.spool_path} ({exc})")
        self._spool_lines = 0

    def _load_spool(self) -> None:
        """Queue the writes an earlier process left in the spool file (those not yet replayed)."""
        if not self.spool_path.is_file():
            self.done_path.unlink(missing_ok=True)
            return
        try:
            done = int(self.done_path.read_text().strip() or 0) if self.done_path.is_file() else 0
        except (OSError, ValueError):
            done = 0
        try:
            text = self.spool_path.read_bytes().decode("utf-8", errors="replace")
            if text and not text.endswith("\n"):  # cut short by a crash: end that line before appending more
                with self.spool_path.open("a", encoding="utf-8") as fh:
                    fh.write("\n")
                text += "\n"
        except OSError as exc:
            self.log(f"ledger: cannot read {self.spool_path} ({exc}); its writes are not replayed")
            return
        lines = text.split("\n")[:-1] if text else []
        self._spool_lines = len(lines)
        for number, line in enumerate(lines, start=1):
            if number <= done or not line.strip():
                continue
            try:
                entry = json.loads(line)
                if not (
                    isinstance(entry, dict)
                    and entry.get("op") in _OPS
                    and isinstance(entry.get("run_id"), str)
                    and isinstance(entry.get("args"), dict)
                ):
                    raise ValueError("not a ledger write")
            except ValueError as exc:  # a line cut short by a crash mid-write, or foreign text
                self.dropped += 1
                self.log(
                    f"ledger: {self.spool_path} line {number} is not a queued write ({exc}); "
                    f"kept in {self.rejected_path}"
                )
                self._keep_rejected({"spool_line": number, "text": line, "refused": str(exc)})
                continue
            if not isinstance(entry.get("at"), int | float):
                entry["at"] = None
            entry["_line"] = number
            self._queue.append(entry)
        self.queued += len(self._queue)
