"""The grader: cheap checks in the caller's process, math-verify (or the user's reward function) in a
persistent, killable worker process."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import selectors
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cepo_proto import Verdict
from cepo_services.verifier import extract

WORKER_SCRIPT = Path(__file__).with_name("_worker.py")

# Verdict reasons (documented in the package docstring).
CORRECT = "correct"
WRONG_ANSWER = "wrong_answer"
NO_BOXED = extract.NO_BOXED
UNCLOSED_BOXED = extract.UNCLOSED_BOXED
EMPTY_BOXED = extract.EMPTY_BOXED
ANSWER_TOO_LONG = "answer_too_long"
UNPARSEABLE = "unparseable"
TIMEOUT = "timeout"
BAD_REFERENCE = "bad_reference"
BAD_REWARD = "bad_reward"  # the user's reward function returned a non-number, NaN or a value outside [0, 1]
REWARD_ERROR = "reward_error"  # the user's reward function raised (or its worker died)
REASONS = (
    CORRECT,
    WRONG_ANSWER,
    NO_BOXED,
    UNCLOSED_BOXED,
    EMPTY_BOXED,
    ANSWER_TOO_LONG,
    UNPARSEABLE,
    TIMEOUT,
    BAD_REFERENCE,
    BAD_REWARD,
    REWARD_ERROR,
)

DEFAULT_FORMAT_WEIGHT = 0.0
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MAX_CHARS = 100_000
DEFAULT_MAX_ANSWER_CHARS = 1_000
MAX_ANSWER_BOXES = extract.MAX_ANSWER_BOXES

_WORKER_RESULTS = {CORRECT, WRONG_ANSWER, UNPARSEABLE, BAD_REFERENCE}
REWARD_THRESHOLD = 0.5  # a custom reward counts as correct at or above this

log = logging.getLogger(__name__)


class WorkerStartError(RuntimeError):
    """The math-verify worker process could not be started (an environment problem, not an input one)."""


class RewardLoadError(WorkerStartError):
    """The worker could not import the user's reward function (``reward_fn``)."""


# ---- option validation ---------------------------------------------------------------------------------


def _check_format_weight(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"format_weight must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_target(value: Any) -> str:
    """A reward function's "module:function" path (the function may be a dotted attribute path)."""
    module, _, attribute = value.partition(":") if isinstance(value, str) else ("", "", "")
    parts = [*module.split("."), *attribute.split(".")]
    if not module or not attribute or not all(part.isidentifier() for part in parts):
        raise ValueError(f"reward_fn must be an importable 'module:function' path, got {value!r}")
    return value


def import_path() -> list[str]:
    """This process's ``sys.path`` as absolute folders (``''`` is the current directory): what a reward
    function is imported with in the worker unless the caller gives the path."""
    path: list[str] = []
    for entry in sys.path:
        folder = os.path.abspath(entry or os.curdir)
        if folder not in path:
            path.append(folder)
    return path


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


# ---- the worker process --------------------------------------------------------------------------------


class _Worker:
    """One ``_worker.py`` process and a line reader over its stdout. Not thread-safe (the Grader locks)."""

    def __init__(self, memory_limit_mb: int, reward: dict | None = None) -> None:
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        argv = [sys.executable, "-I", str(WORKER_SCRIPT), str(memory_limit_mb)]
        if reward is not None:
            argv.append(json.dumps(reward))
        self.reward_target = None if reward is None else reward["target"]
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=env,
                close_fds=True,
            )
        except OSError as exc:
            raise WorkerStartError(f"cannot start the verifier worker: {exc}") from exc
        self.owner_pid = os.getpid()
        self.ready = False
        self._buffer = bytearray()
        self._selector = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, message: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode("ascii"))
        self.proc.stdin.flush()

    def receive(self, deadline: float) -> dict | str:
        """The next message, or "timeout" when ``deadline`` (time.monotonic) passes, or "eof"."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[: newline + 1]
                try:
                    message = json.loads(line)
                except ValueError:
                    continue  # never happens with our worker; skip rather than fail
                if isinstance(message, dict):
                    return message
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            if not self._selector.select(remaining):
                continue  # re-checks the deadline
            chunk = os.read(fd, 65536)
            if not chunk:
                return "eof"
            self._buffer += chunk

    def wait_ready(self, timeout_s: float) -> None:
        if self.ready:
            return
        message = self.receive(time.monotonic() + timeout_s)
        if isinstance(message, dict) and message.get("ready") is False and self.reward_target is not None:
            self.kill()
            raise RewardLoadError(
                f"the reward function {self.reward_target!r} cannot be loaded in the verifier's worker process: "
                f"{message.get('error', 'unknown error')}"
            )
        if not isinstance(message, dict) or not message.get("ready"):
            self.kill()
            what = "timed out" if message == "timeout" else "exited"
            raise WorkerStartError(f"the verifier worker {what} before it was ready ({timeout_s:.0f} s)")
        self.ready = True

    def kill(self) -> None:
        """Stop the process now and reap it (no zombie)."""
        if os.getpid() != self.owner_pid:  # a forked copy of the parent: the process is not ours
            return
        with contextlib.suppress(OSError):
            self.proc.kill()
        self._reap()

    def stop(self, grace_s: float = 1.0) -> None:
        """Close its input (it exits at EOF); kill it if it is still running after ``grace_s``."""
        if os.getpid() != self.owner_pid:
            return
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._reap()

    def _reap(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._selector.close()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass


_LIVE_GRADERS: weakref.WeakSet[Grader] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for grader in list(_LIVE_GRADERS):
        grader.close()


class Grader:
    """Grades responses against reference answers; owns one math-verify worker process, reused across calls.

    Thread-safe (calls are serialised on one worker); usable from any thread, a Ray actor or a Serve
    replica, since the time bound is a pipe read with a deadline plus ``kill``, never a signal. The options
    given here are defaults that every ``grade``/``grade_batch`` call may override. Close it (``close()``,
    a ``with`` block, or at interpreter exit) to stop the worker.

    Args:
        format_weight: w in reward = (1 − w)·accuracy + w·format; 0 (the paper) gives accuracy only.
        timeout_s: wall-clock bound on one answer's math-verify work; on expiry the worker is killed and
            restarted and the verdict is ``timeout``.
        max_chars: only the last ``max_chars`` characters of a response are looked at.
        max_answer_chars: a longer extracted answer is ``answer_too_long`` (and a longer reference answer
            ``bad_reference``) without being parsed.
        startup_timeout_s: how long to wait for a (re)started worker to import math-verify; not part of
            ``timeout_s``.
        memory_limit_mb: address-space limit of the worker process (0: none).
        prescreen: refuse astronomically large powers/factorials and deep nesting before parsing (on by
            default; tests switch it off to exercise the timeout backstop).
        reward_fn: ``"module:function"`` of a reward function to use instead of the built-in grading (see
            :meth:`_reward_one`); it is imported in the worker process, with ``timeout_s`` and
            ``memory_limit_mb`` as for math-verify. ``format_weight`` must then be 0.
        reward_path: the folders in front of the worker's ``sys.path`` when it imports ``reward_fn``
            (default: this process's ``sys.path``, :func:`import_path`).
    """

    def __init__(
        self,
        *,
        format_weight: float = DEFAULT_FORMAT_WEIGHT,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_chars: int = DEFAULT_MAX_CHARS,
        max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
        startup_timeout_s: float = 60.0,
        memory_limit_mb: int = 2048,
        prescreen: bool = True,
        reward_fn: str | None = None,
        reward_path: Sequence[str] | None = None,
    ) -> None:
        self.format_weight = _check_format_weight(format_weight)
        self.timeout_s = _check_positive("timeout_s", timeout_s)
        self.max_chars = _check_count("max_chars", max_chars)
        self.max_answer_chars = _check_count("max_answer_chars", max_answer_chars)
        self.startup_timeout_s = _check_positive("startup_timeout_s", startup_timeout_s)
        if isinstance(memory_limit_mb, bool) or not isinstance(memory_limit_mb, int) or memory_limit_mb < 0:
            raise ValueError(f"memory_limit_mb must be an integer >= 0, got {memory_limit_mb!r}")
        self.memory_limit_mb = memory_limit_mb
        self.prescreen = bool(prescreen)
        self.reward_fn = None if reward_fn is None else _check_target(reward_fn)
        if self.reward_fn is not None and self.format_weight != 0.0:
            raise ValueError(
                "format_weight must be 0 with reward_fn: the reward function gives the whole reward"
            )
        path = import_path() if reward_path is None else [str(p) for p in reward_path]
        self._reward = None if self.reward_fn is None else {"target": self.reward_fn, "path": path}
        # what went wrong in the reward function lately: "reason: detail" (the verdict carries only the reason)
        self.reward_problems: deque[str] = deque(maxlen=20)
        self._logged_problems: set[str] = set()
        self._lock = threading.RLock()
        self._worker: _Worker | None = None
        self._next_id = 0
        self.restarts = 0  # workers killed after a timeout or a crash
        _LIVE_GRADERS.add(self)

    # ---- public API -----------------------------------------------------------------------------------

    def grade(
        self,
        response: str,
        answer: str,
        *,
        format_weight: float | None = None,
        timeout_s: float | None = None,
        max_chars: int | None = None,
    ) -> Verdict:
        """Grade one response against the reference ``answer``. Never raises on any input string."""
        return self.grade_batch(
            [response], [answer], format_weight=format_weight, timeout_s=timeout_s, max_chars=max_chars
        )[0]

    def grade_batch(
        self,
        responses: Sequence[str],
        answers: Sequence[str],
        *,
        format_weight: float | None = None,
        timeout_s: float | None = None,
        max_chars: int | None = None,
    ) -> list[Verdict]:
        """Grade ``responses[i]`` against ``answers[i]`` on one worker; each answer gets its own time bound."""
        w = self.format_weight if format_weight is None else _check_format_weight(format_weight)
        limit = self.timeout_s if timeout_s is None else _check_positive("timeout_s", timeout_s)
        cap = self.max_chars if max_chars is None else _check_count("max_chars", max_chars)
        responses, answers = list(responses), list(answers)
        if len(responses) != len(answers):
            raise ValueError(f"responses and answers differ in length: {len(responses)} != {len(answers)}")
        return [self._grade_one(r, a, w, limit, cap) for r, a in zip(responses, answers, strict=True)]

    def warm_up(self) -> None:
        """Start the worker now (and wait until it is ready) instead of on the first call that needs it."""
        with self._lock:
            self._ready_worker()

    @property
    def worker_pid(self) -> int | None:
        """The worker's process id, None while none is running."""
        worker = self._worker
        return None if worker is None else worker.pid

    def close(self) -> None:
        """Stop the worker process. The grader may still be used: a new worker starts on demand."""
        with self._lock:
            worker, self._worker = self._worker, None
            if worker is not None:
                worker.stop()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            worker = self._worker
            if worker is not None:
                worker.kill()
        except Exception:
            pass

    # ---- internals --------------------------------------------------------------------------------------

    def _grade_one(self, response: Any, answer: Any, w: float, timeout_s: float, max_chars: int) -> Verdict:
        text = extract.sanitize(response)
        if len(text) > max_chars:
            text = text[-max_chars:]  # the last box is what counts: keep the end
        if self._reward is not None:
            return self._reward_one(text, extract.sanitize(answer), timeout_s)
        found = extract.extract_final_boxes(text, MAX_ANSWER_BOXES)
        if found.status != extract.OK or not found.contents:
            return _verdict(False, found.status, None, 0.0, w)
        preds = list(found.contents)
        pred = ", ".join(preds)  # the answer as reported: one box's content, or the boxes' joined
        fmt = 1.0
        if len(pred) > self.max_answer_chars:
            return _verdict(False, ANSWER_TOO_LONG, None, fmt, w)

        golds = self._reference_parts(answer)
        if golds is None:
            return _verdict(False, BAD_REFERENCE, pred, fmt, w)
        if found.overflow:  # a shotgun of boxes: never graded, whatever the reference
            return _verdict(False, WRONG_ANSWER, pred, fmt, w)
        if len(golds) == 1 and len(preds) == 1:
            result = self._compare_one(golds[0], preds[0], timeout_s)
        else:
            result = self._compare_parts(golds, preds, timeout_s)
        return _verdict(result == CORRECT, result, pred, fmt, w)

    def _reference_parts(self, answer: Any) -> list[str] | None:
        """The reference's answer: one text, or the parts of a reference written as several joined boxes;
        None when it is unusable (empty, too long, a shotgun of boxes)."""
        gold = extract.sanitize(answer).strip()
        golds = [gold]
        if extract.BOXED in gold:  # a reference written as a boxed solution: grade against its final boxes
            boxes = extract.extract_final_boxes(gold, MAX_ANSWER_BOXES)
            if boxes.status == extract.OK and boxes.contents:
                if boxes.overflow:
                    return None
                golds = list(boxes.contents)
        if not all(golds) or sum(len(g) for g in golds) > self.max_answer_chars:
            return None
        return golds

    def _reward_one(self, response: str, reference: str, timeout_s: float) -> Verdict:
        """The user's reward function on one (sanitised, truncated) response and its reference, in the worker.

        reward = what it returned (a bool: 1.0 / 0.0), ``correct`` = reward >= 0.5 (reason ``correct`` or
        ``wrong_answer``); ``timeout`` when it runs over ``timeout_s`` (the worker is killed and replaced),
        ``reward_error`` when it raises or its worker dies, ``bad_reward`` when it returns a non-number, NaN or a
        value outside [0, 1]; those three have reward 0. ``answer`` is still the response's final boxed answer
        (CEPO's r⁻ is taken from it), None without one."""
        found = extract.extract_final_boxes(response, MAX_ANSWER_BOXES)
        answer = None
        if found.status == extract.OK and found.contents:
            joined = ", ".join(found.contents)
            answer = joined if len(joined) <= self.max_answer_chars else None
        reply = self._call({"op": "reward", "response": response, "reference": reference}, timeout_s)
        if reply is None:
            self._reward_problem(TIMEOUT, f"took longer than {timeout_s:g} s")
            return Verdict(correct=False, reward=0.0, answer=answer, reason=TIMEOUT)
        result, detail = reply.get("result"), str(reply.get("detail", ""))
        reward = reply.get("reward")
        if result == "reward":
            valid = isinstance(reward, (int, float)) and not isinstance(reward, bool)
            if valid and 0.0 <= reward <= 1.0:  # NaN fails the comparison
                correct = reward >= REWARD_THRESHOLD
                reason = CORRECT if correct else WRONG_ANSWER
                return Verdict(correct=correct, reward=float(reward), answer=answer, reason=reason)
            result, detail = BAD_REWARD, f"returned {reward!r}"
        elif result not in (BAD_REWARD, REWARD_ERROR):  # the worker died on it (memory, os._exit, a crash)
            result, detail = REWARD_ERROR, f"its worker process died ({detail or result})"
        self._reward_problem(result, detail)
        return Verdict(correct=False, reward=0.0, answer=answer, reason=result)

    def _reward_problem(self, reason: str, detail: str) -> None:
        """Keep (and log once) what went wrong in the reward function: the verdict only has room for the reason."""
        problem = f"{reason}: {self.reward_fn} {detail}"
        self.reward_problems.append(problem)
        if problem not in self._logged_problems and len(self._logged_problems) < 100:
            self._logged_problems.add(problem)
            log.warning("reward function %s", problem)

    def _compare_one(self, gold_text: str, pred_text: str, timeout_s: float) -> str:
        """One reference answer against one response answer: the verdict reason."""
        gold, pred = extract.prepare(gold_text), extract.prepare(pred_text)
        if extract.units_conflict(gold, pred):  # "5 m" against "5 cm": dropping the units would hide it
            return WRONG_ANSWER
        # Fast paths, exact by construction: identical text, or two plain numbers compared as rationals.
        gold_norm, pred_norm = extract.normalize(gold.text), extract.normalize(pred.text)
        if gold_norm == pred_norm:
            return CORRECT
        rounded = extract.rounded_reference(gold_norm)
        gold_value = extract.exact_number(gold_norm)
        pred_value = extract.exact_number(pred_norm)
        if gold_value is not None and pred_value is not None:
            if gold_value == pred_value:
                return CORRECT
            # A long decimal reference stands for the values that round to it; a decimal answer must still
            # equal it exactly (0.0833 is not 0.0833333333333333), a fraction may round to it (1/12).
            fraction = rounded is not None and not extract.is_plain_decimal(pred_norm)
            if fraction and extract.agrees_at_precision(rounded, pred_value):
                return CORRECT
            return WRONG_ANSWER

        if self.prescreen:
            if extract.prescreen(gold.text) is not None:
                return BAD_REFERENCE
            if extract.prescreen(pred.text) is not None:
                return UNPARSEABLE

        message: dict[str, Any] = {"op": "grade", "gold": gold.text, "pred": pred.text}
        if rounded is not None:
            message["rounded"] = gold_norm
        return self._worker_result(message, timeout_s)

    def _compare_parts(self, golds: list[str], preds: list[str], timeout_s: float) -> str:
        """Several boxes on either side (see ``_worker.compare_multi``): the verdict reason."""
        gold_texts = [extract.prepare(g).text for g in golds]
        pred_texts = [extract.prepare(p).text for p in preds]
        if self.prescreen:
            if any(extract.prescreen(g) is not None for g in gold_texts):
                return BAD_REFERENCE
            if any(extract.prescreen(p) is not None for p in pred_texts):
                return UNPARSEABLE
        return self._worker_result({"op": "grade_multi", "golds": gold_texts, "preds": pred_texts}, timeout_s)

    def _worker_result(self, message: dict, timeout_s: float) -> str:
        reply = self._call(message, timeout_s)
        if reply is None:
            return TIMEOUT
        result = reply.get("result")
        return result if result in _WORKER_RESULTS else UNPARSEABLE

    def _ready_worker(self) -> _Worker:
        worker = self._worker
        if worker is not None and worker.owner_pid != os.getpid():
            worker = self._worker = None  # inherited through fork: leave the parent's process alone
        if worker is None:
            worker = self._worker = _Worker(self.memory_limit_mb, self._reward)
        try:
            worker.wait_ready(self.startup_timeout_s)
        except WorkerStartError:
            self._worker = None
            raise
        return worker

    def _restart(self) -> None:
        """Kill the current worker and start its replacement at once (it imports while the caller goes on)."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.kill()
        self.restarts += 1
        self._worker = _Worker(self.memory_limit_mb, self._reward)

    def _call(self, message: dict, timeout_s: float) -> dict | None:
        """Send one request and wait at most ``timeout_s`` for its reply. None on timeout; a crashed worker
        yields an ``unparseable`` reply. The worker is replaced in both cases."""
        with self._lock:
            for attempt in range(2):
                worker = self._ready_worker()
                if worker.proc.poll() is not None:  # died while idle (killed from outside)
                    self._restart()
                    worker = self._ready_worker()
                self._next_id += 1
                request_id = self._next_id
                try:
                    worker.send({**message, "id": request_id})
                except OSError:  # it died while idle (killed from outside): replace it and resend once
                    self._restart()
                    if attempt == 0:
                        continue
                    return {"result": UNPARSEABLE, "detail": "worker unavailable"}
                deadline = time.monotonic() + timeout_s
                while True:
                    reply = worker.receive(deadline)
                    if reply == "timeout":
                        self._restart()
                        return None
                    if reply == "eof":  # crashed on this input (e.g. out of memory, stack overflow)
                        self._restart()
                        return {"result": UNPARSEABLE, "detail": "worker crashed"}
                    assert isinstance(reply, dict)
                    if reply.get("id") == request_id:
                        return reply
            return {"result": UNPARSEABLE, "detail": "worker unavailable"}


def _verdict(correct: bool, reason: str, answer: str | None, fmt: float, w: float) -> Verdict:
    accuracy = 1.0 if correct else 0.0
    return Verdict(correct=correct, reward=(1.0 - w) * accuracy + w * fmt, answer=answer, reason=reason)


# ---- module-level convenience: one shared grader per process --------------------------------------------

_default: Grader | None = None
_default_lock = threading.Lock()


def default_grader() -> Grader:
    """The process-wide grader behind :func:`grade` and :func:`grade_batch` (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Grader()
        return _default


def grade(
    response: str,
    answer: str,
    *,
    format_weight: float = DEFAULT_FORMAT_WEIGHT,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> Verdict:
    """Grade one response against a reference answer (see the package docstring)."""
    return default_grader().grade(
        response, answer, format_weight=format_weight, timeout_s=timeout_s, max_chars=max_chars
    )


def grade_batch(
    responses: Sequence[str],
    answers: Sequence[str],
    *,
    format_weight: float = DEFAULT_FORMAT_WEIGHT,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> list[Verdict]:
    """Grade many responses with one worker process (start-up paid once)."""
    return default_grader().grade_batch(
        responses, answers, format_weight=format_weight, timeout_s=timeout_s, max_chars=max_chars
    )
