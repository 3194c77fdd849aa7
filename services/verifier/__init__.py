"""Rule-based verifier: extract the last ``\\boxed{...}`` of a response and grade it against the reference.

Public API::

    grade(response, answer, *, format_weight=0.0, timeout_s=5.0, max_chars=100_000) -> cepo_proto.Verdict
    grade_batch(responses, answers, **same options) -> list[cepo_proto.Verdict]
    Grader(**options)            # owns the worker process; .grade, .grade_batch, .close, context manager
    Grader(reward_fn="module:function")   # the user's reward instead of the rules below (see the end)
    extract_last_boxed(text)     # the pure extractor

How an answer is graded:

1. The response is sanitised (NUL bytes dropped, lone surrogates → U+FFFD) and cut to its last
   ``max_chars`` characters (the last box is what counts, so the end is kept).
2. The answer is the content of the last brace-matched ``\\boxed{...}`` (nested and escaped braces handled,
   linear time), together with the boxes joined to it: boxes separated by nothing but a joiner (spacing,
   ``$``, ``,``, ``;``, ``.``, ``and``, ``or``, ``\\text{ and }``, ``\\quad``...; at most 64 characters) are
   one answer of several parts (``\\boxed{1} and \\boxed{2}``). Any other text between boxes ends the run,
   so an earlier box followed by more working is not part of the answer. Parts equal as text count once;
   a run of more than 12 distinct boxes is a shotgun and is ``wrong_answer`` whatever the reference. A
   reference may be written the same way (several boxes).
3. Several parts on either side are compared as sets (``_worker.compare_multi``): every answer part must
   equal some reference element, and the reference elements must be matched one-to-one (a set or list in
   one box, ``{1, 2}``, ``1, 2``, ``\\pm 2``, counts as its elements), so the order does not matter but a
   missing or extra value fails, and several boxes pass a single-valued reference only when every one of
   them equals it (``\\boxed{1} or \\boxed{2}`` against ``2`` is wrong). Two exceptions are ordered: a tuple reference ``(a, b)`` against
   as many boxes, and a reference naming two or more variables (``x = 1, y = 2``) against bare values.
4. Each side is prepared (``extract.prepare``): ``\\mathrm{e}`` (``\\text{e}``, ``{\\rm e}``,
   ``\\operatorname{e}``) is Euler's number and ``\\mathrm{i}`` the imaginary unit, never a unit;
   ``\\text{ percent}`` is ``\\%``; ``°`` is ``^\\circ``; then a trailing unit is dropped, conservatively
   (``extract.strip_unit``): ``\\text{...}``/``\\mathrm{...}`` units (``5\\text{ cm}^2``,
   ``9.8\\,\\mathrm{m}/\\mathrm{s}^2``) and bare multi-letter unit words (``5 cm``, ``3 hours``) go, but a
   bare single letter is a variable and stays (``2d``, ``3m``), words that change the value stay (``10
   thousand``, ``5 or more``, ``3 squared``, ``2 pi``), and after anything but a plain number only known unit
   words go (``n \\text{ is even}`` stays). When both sides carry a known unit and the units differ (``5 m``
   against ``5 cm``) the answer is wrong. (math-verify's own unit stripping is switched off: it drops any
   trailing ``\\text{}`` and single letters, which graded ``2\\mathrm{e}`` and ``2d`` equal to ``2``.)
5. Fast paths in the caller's process: identical text after light normalisation, or two plain numbers /
   simple fractions compared as exact rationals.
6. A reference written as a long decimal, one of at least 8 significant digits (``0.0833333333333333``,
   ``4.123105625617661``), stands for the values that round to it at its last shown digit: an answer that
   is not a plain decimal (``\\frac{1}{12}``, ``\\sqrt{17}``, ``\\pi``) is correct when the reference is its
   value rounded down or up at that digit, i.e. within one unit of the last digit, never looser. An answer
   written as a decimal must equal the reference exactly (``0.0833`` and ``0.08333333333333333`` are wrong
   for ``0.0833333333333333``), and so must a fraction with a terminating decimal expansion (``1/8``).
   Shorter decimal references are exact values (``\\frac13`` is wrong for ``0.333``).
7. Otherwise cheap pre-screens (astronomic powers and factorials, deep nesting), then math-verify 0.9.0
   in a persistent worker process: LaTeX parse only (no Python ``eval`` of model text anywhere), decimals
   turned into exact rationals before ``verify`` so ``0.5 == 1/2`` but ``0.333333 != 1/3``. math-verify
   grades ``30^\\circ`` equal to ``30``, ``x = 3`` equal to ``3`` and ``50\\%`` equal to both ``50`` and ``0.5``;
   these are kept. An equation chain with unequal numbers on two sides (``x = 5 = 2``) is wrong (math-verify
   would take its last side).
8. Time bound: the caller waits for the worker's reply on a pipe with a deadline of ``timeout_s``; when it
   passes, the worker is killed (SIGKILL, reaped) and a fresh one is started, and the verdict is
   ``timeout``. No signals or alarms are used, so this works in any thread, Ray actor or Serve replica.
   A worker that is not running yet (first call, or after a restart) is waited for separately, up to the
   grader's ``startup_timeout_s``; a warm call takes at most ``timeout_s`` plus a few milliseconds. An
   answer of several parts is one request with one time bound.

Reward: ``(1 − w)·accuracy + w·format`` with ``w = format_weight`` (0 by default: accuracy in {0, 1}, as in
the paper; EasyR1 uses 0.1). ``format`` is 1 when the response holds a closed, non-empty last ``\\boxed{}``.

Verdict reasons:

- ``correct``: the answer equals the reference.
- ``wrong_answer``: it parses and differs.
- ``no_boxed``: no ``\\boxed{`` in the (truncated) response.
- ``unclosed_boxed``: the last ``\\boxed{`` is never closed.
- ``empty_boxed``: the last box holds only whitespace.
- ``answer_too_long``: the boxed answer (all its parts) exceeds ``max_answer_chars`` (1,000); not parsed,
  ``answer=None``.
- ``unparseable``: math-verify cannot parse the answer, it was refused by a pre-screen (e.g. a power tower
  such as ``9^{9^{9^{9}}}``), or the worker crashed on it.
- ``timeout``: grading it took longer than ``timeout_s``.
- ``bad_reference``: the reference answer itself is empty, too long or unparseable.

- ``bad_reward``, ``reward_error``: only with a custom reward function (below).

``answer`` is None for ``no_boxed``, ``unclosed_boxed``, ``empty_boxed`` and ``answer_too_long``, and the
extracted answer otherwise (the parts of an answer of several boxes joined by ", "). The grader never raises on input text; it raises ``ValueError`` for bad option
values (naming the option) and :class:`WorkerStartError` if the worker process cannot start at all.

Custom reward (``Grader(reward_fn="module:function")``; ``verifier.reward_fn`` in a run's config): the function
replaces steps 2–8. It is called as ``function(response, reference)`` — the response sanitised and cut to its
last ``max_chars`` characters as in step 1, the reference answer as a string — in the worker process, imported
there with ``reward_path`` in front of ``sys.path`` (default: the caller's ``sys.path``), under the same
``timeout_s`` and memory limit as math-verify. It returns a float in [0, 1] or a bool (1.0 / 0.0). The
verdict's reward is that value and ``correct`` is reward ≥ 0.5 (reason ``correct`` or ``wrong_answer``);
``answer`` is still the final boxed answer (step 2) or None. A call that runs over ``timeout_s`` is
``timeout`` (the worker is killed and replaced), one that raises or kills its worker is ``reward_error``, one
that returns a non-number, NaN or a value outside [0, 1] is ``bad_reward``; all three with reward 0, the
details in ``Grader.reward_problems`` and logged once each. A function that cannot be imported in the worker
is :class:`RewardLoadError` (a :class:`WorkerStartError`) on the first call. ``format_weight`` must be 0.
"""

from cepo_services.verifier.extract import extract_last_boxed
from cepo_services.verifier.grader import (
    REASONS,
    Grader,
    RewardLoadError,
    WorkerStartError,
    default_grader,
    grade,
    grade_batch,
)

__all__ = [
    "REASONS",
    "Grader",
    "RewardLoadError",
    "WorkerStartError",
    "default_grader",
    "extract_last_boxed",
    "grade",
    "grade_batch",
]
