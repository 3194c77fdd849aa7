"""Rule-based verifier: extract the last ``\\boxed{...}`` of a response and grade it against the reference.

Public API::

    grade(response, answer, *, format_weight=0.0, timeout_s=5.0, max_chars=100_000) -> cepo_proto.Verdict
    grade_batch(responses, answers, **same options) -> list[cepo_proto.Verdict]
    Grader(**options)            # owns the worker process; .grade, .grade_batch, .close, context manager
    extract_last_boxed(text)     # the pure extractor

How an answer is graded:

1. The response is sanitised (NUL bytes dropped, lone surrogates → U+FFFD) and cut to its last
   ``max_chars`` characters (the last box is what counts, so the end is kept).
2. The answer is the content of the last brace-matched ``\\boxed{...}`` (nested and escaped braces handled,
   linear time).
3. Fast paths in the caller's process: identical text after light normalisation, or two plain numbers /
   simple fractions compared as exact rationals.
4. Otherwise cheap pre-screens (astronomic powers and factorials, deep nesting), then math-verify 0.9.0
   in a persistent worker process: LaTeX parse only (no Python ``eval`` of model text anywhere), decimals
   turned into exact rationals before ``verify`` so ``0.5 == 1/2`` but ``0.333333 != 1/3``. math-verify
   grades ``30^\\circ`` equal to ``30`` and ``x = 3`` equal to ``3``; both are kept.
5. Time bound: the caller waits for the worker's reply on a pipe with a deadline of ``timeout_s``; when it
   passes, the worker is killed (SIGKILL, reaped) and a fresh one is started, and the verdict is
   ``timeout``. No signals or alarms are used, so this works in any thread, Ray actor or Serve replica.
   A worker that is not running yet (first call, or after a restart) is waited for separately, up to the
   grader's ``startup_timeout_s``; a warm call takes at most ``timeout_s`` plus a few milliseconds.

Reward: ``(1 − w)·accuracy + w·format`` with ``w = format_weight`` (0 by default: accuracy in {0, 1}, as in
the paper; EasyR1 uses 0.1). ``format`` is 1 when the response holds a closed, non-empty last ``\\boxed{}``.

Verdict reasons:

- ``correct``: the answer equals the reference.
- ``wrong_answer``: it parses and differs.
- ``no_boxed``: no ``\\boxed{`` in the (truncated) response.
- ``unclosed_boxed``: the last ``\\boxed{`` is never closed.
- ``empty_boxed``: the last box holds only whitespace.
- ``answer_too_long``: the boxed answer exceeds ``max_answer_chars`` (1,000); not parsed, ``answer=None``.
- ``unparseable``: math-verify cannot parse the answer, it was refused by a pre-screen (e.g. a power tower
  such as ``9^{9^{9^{9}}}``), or the worker crashed on it.
- ``timeout``: grading it took longer than ``timeout_s``.
- ``bad_reference``: the reference answer itself is empty, too long or unparseable.

``answer`` is None for ``no_boxed``, ``unclosed_boxed``, ``empty_boxed`` and ``answer_too_long``, and the
extracted answer otherwise. The grader never raises on input text; it raises ``ValueError`` for bad option
values (naming the option) and :class:`WorkerStartError` if the worker process cannot start at all.
"""

from cepo_services.verifier.extract import extract_last_boxed
from cepo_services.verifier.grader import (
    REASONS,
    Grader,
    WorkerStartError,
    default_grader,
    grade,
    grade_batch,
)

__all__ = [
    "REASONS",
    "Grader",
    "WorkerStartError",
    "default_grader",
    "extract_last_boxed",
    "grade",
    "grade_batch",
]
