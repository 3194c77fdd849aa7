"""The verifier's sandboxed math-verify worker.

Run as a separate process (``python -I _worker.py MEMORY_MB``) by :class:`cepo_services.verifier.Grader`; it
imports nothing from this project, so it starts the same way in a test, a Ray actor or a Serve replica.
The parent bounds every request in wall-clock time and kills this process when it runs over: nothing in
here needs signals or timers (math-verify's own signal-based timeouts are switched off).

Protocol: one JSON object per line on stdin, one per line on the original stdout (ASCII-only JSON, so lone
surrogates cannot break it). First the worker writes ``{"ready": true, "pid": ...}``; then for each request
it answers ``{"id": n, "result": r, "detail": str}`` with ``r`` one of ``correct``, ``wrong_answer``,
``bad_reference``, ``unparseable``. Requests:

- ``{"id": n, "op": "grade", "gold": str, "pred": str}``, optionally with ``"rounded": str``: the gold is
  that long decimal, which stands for any value that rounds to it at its last digit (see ``compare``);
- ``{"id": n, "op": "grade_multi", "golds": [str], "preds": [str]}``: an answer made of several boxes, or a
  reference made of several (see ``compare_multi``).
- ``{"id": n, "op": "reward", "response": str, "reference": str}``: the user's reward function (started as
  ``python -I _worker.py MEMORY_MB REWARD_JSON`` with ``{"target": "module:function", "path": [folders]}``:
  ``path`` goes in front of ``sys.path``, the function is imported before ``ready``, and math-verify is not
  loaded). The answer is ``{"result": "reward", "reward": r}`` with r a finite float in [0, 1] (a bool is
  1.0 / 0.0), or ``bad_reward`` (it returned something else) or ``reward_error`` (it raised), with a detail.
  When the function cannot be imported the worker answers ``{"ready": false, "error": str}`` and exits.

The worker exits at end of input, and by itself when its parent process goes away.

Only math-verify's LaTeX parser (ANTLR → sympy objects) sees the text; its plain-expression extractor
(which calls sympy's ``parse_expr``, i.e. Python ``eval``) is not used, and nothing here calls
``sympify``/``eval`` on text. The user's reward function is the user's own code and runs as it is, under the
same memory limit and the parent's time bound.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import sys
import threading
import time
from functools import lru_cache

CORRECT = "correct"
WRONG = "wrong_answer"
BAD_REFERENCE = "bad_reference"
UNPARSEABLE = "unparseable"
REWARD = "reward"
BAD_REWARD = "bad_reward"
REWARD_ERROR = "reward_error"


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
            # units=False: math-verify's unit stripping drops any trailing \\text{...} and single letters
            # ("2\\mathrm{e}" -> 2, "2d" -> 2, "10\\text{ thousand}" -> 10); the grader drops units itself,
            # conservatively, before the text gets here (extract.strip_unit).
            basic_latex=True,
            units=False,
            malformed_operators=True,
            nits=True,
            boxed="all",
            equations=False,
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


def _first_expression(parsed: list):
    """The sympy object of a parse (math-verify returns [expression, text]); None when there is none."""
    from sympy import Basic, MatrixBase

    for item in parsed:
        if isinstance(item, (Basic, MatrixBase)):
            return item
    return None


def _contradictory(expr) -> bool:
    """An equation chain with two unequal numbers on the sides of one ``=`` ("x = 5 = 2", "5 = 2"):
    math-verify would take its last side as the answer."""
    from sympy import And, Eq

    relations = [expr] if isinstance(expr, Eq) else list(expr.args) if isinstance(expr, And) else []
    for relation in relations:
        if not (isinstance(relation, Eq) and relation.lhs.is_number and relation.rhs.is_number):
            continue
        if (relation.lhs - relation.rhs).is_zero is False:
            return True
    return False


def _value(expr):
    """A closed-form number from a parsed answer (an assignment ``x = v`` gives v), or None."""
    from sympy import Eq, Expr

    if isinstance(expr, Eq) and expr.lhs.is_Symbol:
        expr = expr.rhs
    if not isinstance(expr, Expr):
        return None
    try:
        expr = expr.doit()  # a percentage is X * UnevaluatedExpr(1/100)
    except Exception:
        return None
    if not isinstance(expr, Expr) or not expr.is_number:
        return None
    return expr


def _agrees_at_precision(rounded: str, expr) -> bool:
    """Whether the decimal ``rounded`` is the value of ``expr`` rounded (up or down) at the decimal's last
    digit. A rational with a terminating decimal expansion gets no tolerance (it must be equal); a
    non-terminating rational (1/12) is checked exactly; anything else (sqrt(17), pi, e) numerically, at
    30 significant digits of its difference from the decimal."""
    from decimal import Decimal
    from fractions import Fraction

    from sympy import N, Rational

    value = _value(expr)
    if value is None:
        return False
    reference = Fraction(Decimal(rounded))
    exponent = Decimal(rounded).as_tuple().exponent
    if not isinstance(exponent, int) or abs(exponent) > 10_000:
        return False
    unit = Fraction(10) ** exponent
    if value.is_Rational:
        fraction = Fraction(int(value.p), int(value.q))
        denominator = fraction.denominator
        for prime in (2, 5):
            while denominator % prime == 0:
                denominator //= prime
        return denominator != 1 and abs(fraction - reference) < unit
    if value.is_real is False or value.is_finite is False:
        return False
    scaled = N((value - Rational(reference.numerator, reference.denominator)) / Rational(unit), 30)
    if not scaled.is_real or not scaled.is_finite:
        return False
    return bool(abs(scaled) < 1)


def compare(gold: str, pred: str, rounded: str | None = None) -> tuple[str, str]:
    """Grade ``pred`` against ``gold`` (both box contents). Returns (result, detail); never raises.

    With ``rounded`` (the gold written as a long decimal), a pred that math-verify finds unequal is still
    correct when the gold is its value rounded at the gold's last digit (``_agrees_at_precision``).
    """
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
    try:
        if _contradictory(_first_expression(pred_parsed)):
            return WRONG, "contradictory equation"
    except Exception as exc:
        return WRONG, f"comparison failed: {type(exc).__name__}"
    try:
        gold_expr, pred_expr = _first_expression(gold_parsed), _first_expression(pred_parsed)
        pred_items = _tuple_items(pred_expr) or _ordered_items(pred_expr)
        ordered = _unlabelled_against_labelled(_ordered_items(gold_expr), pred_items)
        if ordered is not None:  # math-verify sorts both sets: "2, 1" would pass "x = 1, y = 2"
            return (CORRECT, "values in the order named") if ordered else (WRONG, "values in the order named")
    except Exception as exc:
        return WRONG, f"comparison failed: {type(exc).__name__}"
    _, verify, _ = _math_verify()
    try:
        same = verify(gold_parsed, pred_parsed, timeout_seconds=None)
        if not same and rounded is not None and _agrees_at_precision(rounded, _first_expression(pred_parsed)):
            return CORRECT, "agrees at the reference's precision"
    except Exception as exc:
        return WRONG, f"comparison failed: {type(exc).__name__}"
    return (CORRECT, "math-verify") if same else (WRONG, "math-verify")


MAX_ELEMENTS = 32  # elements of a multi-part answer or reference, after sets are opened up


def _tuple_items(expr) -> list | None:
    """The ordered items of a tuple-like reference: a tuple, or an open interval "(1, 2)" (math-verify reads
    a pair in parentheses as one); None for anything else."""
    from sympy import Interval, Tuple

    if isinstance(expr, Tuple):
        return list(expr.args)
    if isinstance(expr, Interval) and expr.left_open and expr.right_open:
        return [expr.start, expr.end]
    return None


def _ordered_items(expr) -> list:
    """The elements of a set in the order they were written (math-verify's sets keep it), else [expr]."""
    from sympy import FiniteSet

    if isinstance(expr, FiniteSet):
        return list(getattr(expr, "_unsorted_args", None) or expr.args)
    return [expr]


def _labelled(elements: list) -> bool:
    """Assignments to two or more different variables ("x = 1, y = 2"): the order of the values matters
    when an answer gives them without their names."""
    from sympy import Eq

    if not all(isinstance(e, Eq) and e.lhs.is_Symbol for e in elements):
        return False
    return len({e.lhs for e in elements}) > 1


def _unlabelled_against_labelled(gold_elements: list, pred_elements: list) -> bool | None:
    """Bare values against "x = 1, y = 2": True/False when compared in the order written, None when the
    rule does not apply (unlabelled reference, or the answer names its variables too)."""
    from sympy import Eq

    if not _labelled(gold_elements) or all(isinstance(p, Eq) for p in pred_elements):
        return None
    if len(gold_elements) != len(pred_elements):
        return False
    return all(_same(g, p) for g, p in zip(gold_elements, pred_elements, strict=True))


def _same(gold, pred) -> bool:
    _, verify, _ = _math_verify()
    try:
        return bool(verify([gold], [pred], timeout_seconds=None))
    except Exception:
        return False


def _max_matching(edges: list[list[int]], n_right: int) -> int:
    """Size of a maximum matching of a small bipartite graph (``edges[left]`` lists right vertices)."""
    owner = [-1] * n_right

    def augment(left: int, seen: list[bool]) -> bool:
        for right in edges[left]:
            if not seen[right]:
                seen[right] = True
                if owner[right] < 0 or augment(owner[right], seen):
                    owner[right] = left
                    return True
        return False

    return sum(augment(left, [False] * n_right) for left in range(len(edges)))


def compare_multi(golds: list[str], preds: list[str]) -> tuple[str, str]:
    """Grade an answer of several parts (boxes) against a reference of one or several parts.

    - One tuple-like reference ``(a, b)`` and as many boxes as it has items: item by item, in order.
    - A reference naming two or more variables ("x = 1, y = 2") against bare values: in the order written.
    - Otherwise both sides are opened up into elements (a set or list "1, 2" in one box counts as its
      elements) and compared as sets: every answer element must equal some reference element, and the
      reference elements must be matched one-to-one by distinct answer elements. So several boxes never
      pass a single-valued reference unless all of them equal it, a missing or extra value fails, and the
      order does not matter.
    """
    gold_exprs, pred_exprs = [], []
    for gold in golds:
        try:
            expr = _first_expression(list(_parse_gold(gold)))
        except Exception as exc:
            return BAD_REFERENCE, f"reference does not parse: {type(exc).__name__}"
        if expr is None:
            return BAD_REFERENCE, "reference does not parse"
        gold_exprs.append(expr)
    for pred in preds:
        try:
            expr = _first_expression(_sympy_parse(pred))
        except Exception as exc:
            return UNPARSEABLE, f"answer does not parse: {type(exc).__name__}"
        if expr is None:
            return UNPARSEABLE, "answer does not parse"
        try:
            if _contradictory(expr):
                return WRONG, "contradictory equation"
        except Exception as exc:
            return WRONG, f"comparison failed: {type(exc).__name__}"
        pred_exprs.append(expr)

    if len(gold_exprs) == 1 and len(pred_exprs) > 1:
        items = _tuple_items(gold_exprs[0])
        if items is not None and len(items) == len(pred_exprs):
            same = all(_same(g, p) for g, p in zip(items, pred_exprs, strict=True))
            return (CORRECT, "tuple, item by item") if same else (WRONG, "tuple, item by item")

    gold_elements = [e for expr in gold_exprs for e in _ordered_items(expr)]
    pred_elements = [e for expr in pred_exprs for e in _ordered_items(expr)]
    if len(gold_elements) > MAX_ELEMENTS or len(pred_elements) > MAX_ELEMENTS:
        return WRONG, "too many elements"
    ordered = _unlabelled_against_labelled(gold_elements, pred_elements)
    if ordered is not None:
        return (CORRECT, "values in the order named") if ordered else (WRONG, "values in the order named")
    edges = [[j for j, g in enumerate(gold_elements) if _same(g, p)] for p in pred_elements]
    if not all(edges):
        return WRONG, "an answer matches no reference element"
    if _max_matching(edges, len(gold_elements)) < len(gold_elements):
        return WRONG, "a reference element is not matched"
    return CORRECT, "same set of answers"


# ---- the user's reward function ------------------------------------------------------------------------

_reward_fn = None  # set by main() when the worker is started for a reward function
_DETAIL_CHARS = 300


def _brief(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def load_reward(spec: dict):
    """Import ``spec["target"]`` ("module:function", the function may be a dotted attribute path) with the
    folders of ``spec["path"]`` in front of ``sys.path``; the callable, or ImportError/TypeError saying why."""
    import importlib

    path = [str(p) for p in spec.get("path") or []]
    sys.path[:] = path + [p for p in sys.path if p not in path]
    target = str(spec.get("target", ""))
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ImportError(f"{target!r} is not of the form 'module:function'")
    try:
        value = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"cannot import module {module_name!r} ({type(exc).__name__}: {exc})") from None
    except BaseException as exc:  # its top-level code failed
        raise ImportError(f"importing module {module_name!r} raised {type(exc).__name__}: {exc}") from None
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise ImportError(f"module {module_name!r} has no attribute {attribute!r}")
        value = getattr(value, part)
    if not callable(value):
        raise TypeError(f"{target!r} is not callable (it is of type {type(value).__name__})")
    return value


def check_reward(value) -> tuple[str, float | None, str]:
    """(result, reward, detail) for what a reward function returned: a bool is 1.0 / 0.0; a real number must
    be finite and within [0, 1]; anything else is ``bad_reward``."""
    kind = type(value)
    if isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool")):
        return REWARD, 1.0 if value else 0.0, ""
    if not isinstance(value, numbers.Real):
        if isinstance(value, (str, bytes, type(None))):
            shown = f"{_brief(repr(value))} ({kind.__name__})"
        else:
            shown = f"a {kind.__name__}"
        return BAD_REWARD, None, f"returned {shown}, not a float in [0, 1] or a bool"
    try:
        reward = float(value)
    except Exception as exc:
        return BAD_REWARD, None, f"returned a {kind.__name__} that is not a float ({type(exc).__name__})"
    if not math.isfinite(reward):
        return BAD_REWARD, None, f"returned {reward} (not a finite number)"
    if not 0.0 <= reward <= 1.0:
        return BAD_REWARD, None, f"returned {reward:g}, outside [0, 1]"
    return REWARD, reward, ""


def _reward(response: str, reference: str) -> dict:
    if _reward_fn is None:
        return {"result": REWARD_ERROR, "detail": "this worker was started without a reward function"}
    try:
        value = _reward_fn(response, reference)
    except BaseException as exc:  # the user's code: SystemExit and KeyboardInterrupt included
        return {"result": REWARD_ERROR, "detail": _brief(f"raised {type(exc).__name__}: {exc}")}
    try:
        result, reward, detail = check_reward(value)
    except BaseException as exc:  # a number type whose comparisons raise
        result, reward, detail = BAD_REWARD, None, f"returned an unusable {type(value).__name__} ({exc!r})"
    reply: dict = {"result": result, "detail": _brief(detail)}
    if reward is not None:
        reply["reward"] = reward
    return reply


def _handle(request: dict) -> dict:
    op = request.get("op", "grade")
    if op == "grade":
        rounded = request.get("rounded")
        result, detail = compare(
            str(request.get("gold", "")),
            str(request.get("pred", "")),
            rounded if isinstance(rounded, str) else None,
        )
        return {"result": result, "detail": detail}
    if op == "grade_multi":
        golds, preds = request.get("golds"), request.get("preds")
        if not isinstance(golds, list) or not isinstance(preds, list) or not golds or not preds:
            return {"result": UNPARSEABLE, "detail": "bad request"}
        result, detail = compare_multi([str(g) for g in golds], [str(p) for p in preds])
        return {"result": result, "detail": detail}
    if op == "reward":
        return _reward(str(request.get("response", "")), str(request.get("reference", "")))
    if op == "ping":
        return {"result": "pong", "detail": str(os.getpid())}
    if op == "spin":  # test hook: a computation that never finishes (pure CPU, no sleeping)
        while True:
            pass
    return {"result": UNPARSEABLE, "detail": f"unknown op {op!r}"}


def main(argv: list[str]) -> int:
    global _reward_fn
    _exit_with_parent()
    # The protocol owns the original stdout; anything else printed (by us or a library) goes to stderr.
    channel = os.fdopen(os.dup(1), "w", encoding="ascii", errors="backslashreplace", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.disable(logging.CRITICAL)  # math-verify warns on every call about the disabled timeouts
    sys.setrecursionlimit(5000)
    _limit_memory(int(argv[1]) if len(argv) > 1 else 2048)

    if len(argv) > 2:  # a worker for the user's reward function: import it now, math-verify is not needed
        try:
            _reward_fn = load_reward(json.loads(argv[2]))
        except BaseException as exc:
            error = str(exc) if isinstance(exc, (ImportError, TypeError)) else f"{type(exc).__name__}: {exc}"
            channel.write(json.dumps({"ready": False, "error": _brief(error)}) + "\n")
            return 1
    else:
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
