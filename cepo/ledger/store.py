"""The run ledger's Redis store: one record per training run, plus a stream of per-step reports.

Key layout (``prefix`` defaults to ``cepo:``)::

    cepo:runs                    ZSET    run id → started_at (unix seconds); newest first = ZREVRANGE
    cepo:run:{id}                HASH    id, name, method, status (running|finished|failed|interrupted),
                                         step (steps done), policy_version (latest adapter), run_dir,
                                         config (JSON), started_at, updated_at, finished_at, error,
                                         last_metrics (JSON)
    cepo:run:{id}:checkpoints    LIST    JSON {"step": int, "path": str, "at": unix seconds}, oldest first
    cepo:run:{id}:steps          STREAM  one entry per step: {"report": StepReport JSON,
                                         "samples": JSON list of {prompt, response, answer, reward, correct}},
                                         capped at about ``stream_maxlen`` entries (MAXLEN ~)

Every multi-key write is one MULTI/EXEC transaction, so a reader never sees half a step.

The client gives up quickly on a dead or hung Redis: ``timeout_s`` per socket operation and one immediate retry
on a dropped connection (a pooled socket left over from before a Redis restart), never redis-py's default of
ten retries with back-off. :class:`cepo.ledger.buffered.BufferedLedger` turns an outage into queued writes.
"""

from __future__ import annotations

import difflib
import json
import time
import urllib.parse
from typing import Any

__all__ = [
    "CONFIG_KEY",
    "FINAL_STATUSES",
    "STATUSES",
    "LedgerError",
    "RunLedger",
    "encode_step",
    "is_connection_failure",
    "mask_url",
]

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


def is_connection_failure(exc: BaseException) -> bool:
    """True when ``exc`` (or what it wraps, e.g. a :class:`LedgerError` raised ``from`` a Redis error) means
    Redis could not be reached or did not answer in time, as opposed to a bad request."""
    import redis

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(
            current,
            redis.exceptions.ConnectionError | redis.exceptions.TimeoutError | ConnectionError | TimeoutError,
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


def encode_step(run_id: str, report: dict, samples: list[dict]) -> tuple[str, str, int, int]:
    """A step report as the ledger stores it: (report JSON, samples JSON, steps done, policy version).
    LedgerError when the report cannot be recorded (not JSON-serialisable, no integer ``step``)."""
    try:
        report_json = json.dumps(report, allow_nan=True)
        samples_json = json.dumps(samples, allow_nan=True)
        step_done = int(report["step"]) + 1
        # the run's policy version: the adapter its last step produced (older reports: policy_version)
        version = int(report.get("adapter_version", report.get("policy_version", -1)))
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
        raise LedgerError(f"run {run_id!r}: step report cannot be recorded ({exc})") from exc
    return report_json, samples_json, step_done, version


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
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = url
        self.prefix = prefix
        self.stream_maxlen = stream_maxlen
        where = f"{CONFIG_KEY} {mask_url(url)}"
        try:
            self._r = redis.Redis.from_url(
                url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                # one immediate retry on a dropped connection (a stale pooled socket after a Redis restart);
                # none on timeouts, so a dead or hung Redis costs about timeout_s per call
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
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
    def start_run(
        self, run_id: str, *, name: str, method: str, config: dict, run_dir: str, at: float | None = None
    ) -> None:
        """Create the run record (status ``running``). A finished/failed/interrupted id is overwritten (its
        checkpoints and steps dropped); a ``running`` one is refused. ``at``: when it happened (unix seconds;
        default now), for writes replayed after an outage."""
        import redis

        config_json = json.dumps(config, default=str)
        now = _now() if at is None else float(at)
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

    def resume_run(
        self,
        run_id: str,
        *,
        step: int,
        name: str,
        method: str,
        config: dict,
        run_dir: str,
        at: float | None = None,
    ) -> None:
        """A run resumed from its checkpoint of ``step``: status ``running`` again, and the steps and checkpoints
        recorded after that checkpoint (which the resumed run redoes) dropped. A run the ledger never saw (it
        was started without Redis) is created."""
        if not self._call("EXISTS", self._r.exists, self.run_key(run_id)):
            self.start_run(run_id, name=name, method=method, config=config, run_dir=run_dir, at=at)
            return
        now = repr(_now() if at is None else float(at))
        later = [
            entry_id
            for entry_id, fields in self._call("XRANGE", self._r.xrange, self.steps_key(run_id))
            if json.loads(fields.get("report", "{}")).get("step", -1) >= step
        ]
        kept = [
            raw
            for raw in self._call("LRANGE", self._r.lrange, self.checkpoints_key(run_id), 0, -1)
            if json.loads(raw).get("step", 0) <= step
        ]
        pipe = self._r.pipeline(transaction=True)
        if later:
            pipe.xdel(self.steps_key(run_id), *later)
        pipe.delete(self.checkpoints_key(run_id))
        if kept:
            pipe.rpush(self.checkpoints_key(run_id), *kept)
        pipe.hset(
            self.run_key(run_id),
            mapping={
                "status": "running",
                "step": int(step),
                "finished_at": "",
                "error": "",
                "updated_at": now,
            },
        )
        self._call("resume_run", pipe.execute)

    def record_step(self, run_id: str, report: dict, samples: list[dict], *, at: float | None = None) -> None:
        """One finished step: update the run hash and append ``{report, samples}`` to its stream, atomically.
        Everything is serialised before anything is sent, so a bad report changes nothing."""
        report_json, samples_json, step_done, version = encode_step(run_id, report, samples)
        self._require_run(run_id)
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(
            self.run_key(run_id),
            mapping={
                "step": step_done,
                "policy_version": version,
                "last_metrics": report_json,
                "updated_at": repr(_now() if at is None else float(at)),
            },
        )
        pipe.xadd(
            self.steps_key(run_id),
            {"report": report_json, "samples": samples_json},
            maxlen=self.stream_maxlen,
            approximate=True,
        )
        self._call("record_step", pipe.execute)

    def add_checkpoint(self, run_id: str, step: int, path: str, *, at: float | None = None) -> None:
        """Append a checkpoint ``{step, path, at}`` to the run's list."""
        self._require_run(run_id)
        now = _now() if at is None else float(at)
        pipe = self._r.pipeline(transaction=True)
        pipe.rpush(
            self.checkpoints_key(run_id), json.dumps({"step": int(step), "path": str(path), "at": now})
        )
        pipe.hset(self.run_key(run_id), "updated_at", repr(now))
        self._call("add_checkpoint", pipe.execute)

    def finish(
        self, run_id: str, status: str = "finished", error: str | None = None, *, at: float | None = None
    ) -> None:
        """Close the run with ``status`` (finished | failed | interrupted) and an optional error text."""
        if status not in FINAL_STATUSES:
            raise LedgerError(f"run status must be one of {', '.join(FINAL_STATUSES)}, got {status!r}")
        self._require_run(run_id)
        now = repr(_now() if at is None else float(at))
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
