"""The verifier's sandboxed math-verify worker.

Run as a separate process (``python -I _worker.py MEMORY_MB``) by :class:`cepo_services.verifier.Grader`; it
imports nothing from this project, so it starts the same way in a test, a Ray actor or a Serve replica.
The parent bounds every request in wall-clock time and kills this process when it runs over: nothing in
here needs signals or timers (math-verify's own signal-based timeouts are switched off).

Protocol: one JSON object per line on stdin, one per line on the original stdout (ASCII-only JSON, so lone
surrogates cannot break it). First the worker writes ``{"ready": true, "pid": ...}``; then for each request
``{"id": n, "gold": str, "pred": str}`` it answers ``{"id": n, "result": r, "detail": str}`` with ``r`` one
of ``correct``, ``wrong_answer``, ``bad_reference``, ``unparseable``. The worker exits at end of input, and
by itself when its parent process goes away.

Only math-verify's LaTeX parser (ANTLR → sympy objects) sees the text; its plain-expression extractor
(which calls sympy's ``parse_expr``, i.e. Python ``eval``) is not used, and nothing here calls
``sympify``/``eval`` on text.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from functools import lru_cache

CORRECT = "correct"
WRONG = "wrong_answer"
BAD_REFERENCE = "bad_reference"
UNPARSEABLE = "unparseable"


def _limit_memory(megabytes: int) -> None:
    """Cap the address space so a runaway big-number computation fails with MemoryError, not the host."""
    if megabytes <= 0:
        return
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = megabytes * 2**20
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):
        pass


def _exit_with_parent() -> None:
    """Exit when the parent process goes away, even while a request is being computed.

    A polling thread, not PR_SET_PDEATHSIG: that fires when the parent *thread* that started us exits, and
    graders are used from short-lived threads (Ray actor calls, thread pools)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@lru_cache(maxsize=1)
def _math_verify():
    from latex2sympy2_extended.latex2sympy2 import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify

    config = LatexExtractionConfig(
        boxed_match_priority=0,
        normalization_config=NormalizationConfig(
            basic_latex=True, units=True, malformed_operators=True, nits=True, boxed="all", equations=False
        ),
    )
    return parse, verify, config


def _exact(value):
    """Replace every finite sympy Float in ``value`` by the exact Rational of its decimal digits.

    math-verify compares floats after rounding to 6 places (so 0.333333 would equal 1/3); with exact
    rationals a decimal equals a fraction only when it is exactly equal (0.5 == 1/2, 0.333333 != 1/3), and
    it never equals an irrational.
    """
    from sympy import Basic, Float, MatrixBase, Rational

    if not isinstance(value, (Basic, MatrixBase)):
        return value
    floats = value.atoms(Float)
    if not floats:
        return value
    mapping = {}
    for f in floats:
        if f.is_finite:
            mapping[f] = Rational(str(f))
    return value.xreplace(mapping) if mapping else value


def _sympy_parse(text: str) -> list:
    """math-verify's LaTeX parse of ``text`` (as the content of a box), exact-ified; [] when nothing parsed."""
    from sympy import Basic, MatrixBase

    parse, _, config = _math_verify()
    parsed = parse("\\boxed{" + text + "}", extraction_config=[config], parsing_timeout=None)
    if not any(isinstance(p, (Basic, MatrixBase)) for p in parsed):
        return []
    return [_exact(p) for p in parsed]


@lru_cache(maxsize=2048)
def _parse_gold(text: str) -> tuple:
    return tuple(_sympy_parse(text))


def compare(gold: str, pred: str) -> tuple[str, str]:
    """Grade ``pred`` against ``gold`` (both box contents). Returns (result, detail); never raises."""
    try:
        gold_parsed = list(_parse_gold(gold))
    except Exception as exc:
        return BAD_REFERENCE, f"reference does not parse: {type(exc).__name__}"
    if not gold_parsed:
        return BAD_REFERENCE, "reference does not parse"
    try:
        pred_parsed = _sympy_parse(pred)
    except Exception as exc:
        return UNPARSEABLE, f"answer does not parse: {type(exc).__name__}"
    if not pred_parsed:
        return UNPARSEABLE, "answer does not parse"
    _, verify, _ = _math_verify()
    try:
        same = verify(gold_parsed, pred_parsed, timeout_seconds=None)
    except Exception as exc:
        return WRONG, f"comparison failed: {type(exc).__name__}"
    return (CORRECT, "math-verify") if same else (WRONG, "math-verify")


def _handle(request: dict) -> dict:
    op = request.get("op", "grade")
    if op == "grade":
        result, detail = compare(str(request.get("gold", "")), str(request.get("pred", "")))
        return {"result": result, "detail": detail}
    if op == "ping":
        return {"result": "pong", "detail": str(os.getpid())}
    if op == "spin":  # test hook: a computation that never finishes (pure CPU, no sleeping)
        while True:
            pass
    return {"result": UNPARSEABLE, "detail": f"unknown op {op!r}"}


def main(argv: list[str]) -> int:
    _exit_with_parent()
    # The protocol owns the original stdout; anything else printed (by us or a library) goes to stderr.
    channel = os.fdopen(os.dup(1), "w", encoding="ascii", errors="backslashreplace", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.disable(logging.CRITICAL)  # math-verify warns on every call about the disabled timeouts
    sys.setrecursionlimit(5000)
    _limit_memory(int(argv[1]) if len(argv) > 1 else 2048)

    _math_verify()
    compare("1", "\\frac{2}{2}")  # warm up the ANTLR parser and sympy before announcing readiness
    channel.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")

    for line in sys.stdin:
        try:
            request = json.loads(line)
            reply = {"id": request.get("id"), **_handle(request)}
        except Exception as exc:  # a malformed request must not take the worker down
            reply = {"id": None, "result": UNPARSEABLE, "detail": f"bad request: {type(exc).__name__}"}
        channel.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
