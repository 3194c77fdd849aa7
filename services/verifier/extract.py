"""Pure, linear-time text helpers of the verifier: sanitising, ``\\boxed{}`` extraction, cheap checks.

Nothing here evaluates model text, imports math-verify or sympy, or can take more than linear time: these
functions run in the caller's process, before (and often instead of) the sandboxed math-verify worker.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

BOXED = "\\boxed"

# Extraction outcomes (they double as verdict reasons).
OK = "ok"
NO_BOXED = "no_boxed"
UNCLOSED_BOXED = "unclosed_boxed"
EMPTY_BOXED = "empty_boxed"


@dataclass(frozen=True)
class Extraction:
    """The outcome of looking for the last ``\\boxed{...}``: ``status`` is ``ok`` or the failure reason."""

    status: str
    content: str | None = None


def sanitize(text: object) -> str:
    """Any object → a plain ``str`` without NUL bytes or lone surrogates (they become U+FFFD). Never raises."""
    if not isinstance(text, str):
        if text is None:
            return ""
        try:
            text = str(text)
        except Exception:
            return ""
    if "\x00" in text:
        text = text.replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone (or reversed) surrogates: well-formed pairs are joined, the rest become U+FFFD.
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def _match_braces(text: str, open_index: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_index``, or -1. Backslash escapes (``\\{``, ``\\}``) skip."""
    depth = 0
    i = open_index
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def extract_last_boxed(text: str) -> Extraction:
    """The content of the last brace-matched ``\\boxed{...}`` in ``text``.

    ``\\boxed`` may be followed by spaces before its ``{``; occurrences of the word ``\\boxed`` with no brace
    after it are skipped. Escaped braces (``\\{``, ``\\}``) do not count. The last ``\\boxed{`` decides: if
    it is never closed the result is ``unclosed_boxed`` (even when an earlier box was closed), and a box
    holding only whitespace is ``empty_boxed``. Linear time: one backward scan, one forward match.
    """
    end = len(text)
    while True:
        start = text.rfind(BOXED, 0, end)
        if start < 0:
            return Extraction(NO_BOXED)
        j = start + len(BOXED)
        while j < len(text) and text[j] in " \t\r\n":
            j += 1
        if j < len(text) and text[j] == "{":
            break
        end = start
    close = _match_braces(text, j)
    if close < 0:
        return Extraction(UNCLOSED_BOXED)
    content = text[j + 1 : close].strip()
    if not content:
        return Extraction(EMPTY_BOXED)
    return Extraction(OK, content)


_WS = re.compile(r"\s+")
_SPACING = re.compile(r"\\[,;:! ]|~")
_SIZING = re.compile(r"\\(?:left|right)(?![A-Za-z])")


def normalize(answer: str) -> str:
    """A light canonical form for the exact-match fast path: no ``$`` delimiters, no spacing, ``\\dfrac`` →
    ``\\frac``, no ``\\left``/``\\right``. Two answers equal after this are equal answers."""
    s = answer.strip()
    while len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s[1:-1].strip()
    s = _SPACING.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _SIZING.sub("", s)
    return _WS.sub("", s)


# Plain numbers only: an optional sign, digits, at most one decimal point, an optional e-notation exponent
# of at most 4 digits ("1.5e-3"; math-verify alone would read the e as Euler's number), nothing else (no
# thousands separators: "1,2" is a set to math-verify), or a fraction of two integers, a/b or \frac{a}{b}.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,4})?")
_SLASH_FRACTION = re.compile(r"([+-]?)(\d+)/(\d+)")
_LATEX_FRACTION = re.compile(r"([+-]?)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}")
_LATEX_FRACTION_SHORT = re.compile(r"([+-]?)\\frac(\d)(\d)")


def exact_number(normalized: str) -> Fraction | None:
    """The exact rational value of a normalized plain number or simple fraction, else None (leave it to
    math-verify). ``0.333333`` is 333333/1000000, never 1/3."""
    if len(normalized) > 400:
        return None
    try:
        if _NUMBER.fullmatch(normalized):
            return Fraction(normalized)
        for pattern in (_SLASH_FRACTION, _LATEX_FRACTION, _LATEX_FRACTION_SHORT):
            m = pattern.fullmatch(normalized)
            if m:
                sign, num, den = m.groups()
                value = Fraction(int(num), int(den))
                return -value if sign == "-" else value
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


# ---- pre-screens: refuse inputs that would make sympy compute astronomically large numbers ----------------

MAX_RESULT_DIGITS = 10_000  # a power or factorial whose value would need more decimal digits is refused
MAX_NESTING = 60  # brackets nested deeper than this are refused (deep recursion in the parsers)
MAX_TOWER = 6  # a chain of more powers than this (x^x^x^...) is refused

_TOWER = re.compile(r"\d+(?:\.\d+)?(?:\^-?\d+(?:\.\d+)?)+")
_NON_TERM = re.compile(r"[^\w.^\\-]+")
_FACTORIAL = re.compile(r"(\d+)!")
_LATEX_SIZING = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])")


def _flatten_powers(answer: str) -> str:
    """Rewrite ``answer`` so that numeric power chains read ``a^b^c``: ``**`` → ``^``, the bracket that opens
    an exponent and the bracket closed right before a ``^`` vanish, every other bracket becomes a space (and
    whitespace goes: merging digits only over-estimates)."""
    text = _WS.sub("", _LATEX_SIZING.sub("", answer)).replace("**", "^")
    out = []
    n = len(text)
    for i, c in enumerate(text):
        if c in "{([":
            out.append("" if i > 0 and text[i - 1] == "^" else " ")
        elif c in "})]":
            out.append("" if i + 1 < n and text[i + 1] == "^" else " ")
        else:
            out.append(c)
    return "".join(out)


def _power_digits(chain: str) -> float:
    """log10 of the value of a right-associative chain ``a^b^c`` (signs dropped: an upper bound)."""
    parts = chain.replace("-", "").split("^")
    exponent = float(parts[-1]) if len(parts[-1]) < 300 else math.inf
    digits = 0.0
    for base_text in reversed(parts[:-1]):
        base = float(base_text) if len(base_text) < 300 else math.inf
        digits = 0.0 if base <= 1.0 else exponent * math.log10(base)
        if not digits < MAX_RESULT_DIGITS * 10:  # also catches inf / nan
            return math.inf
        exponent = 10.0**digits if digits < 300 else math.inf
    return digits


def prescreen(answer: str) -> str | None:
    """Why ``answer`` must not reach sympy (a short description), or None when it may.

    Cheap, conservative, linear: brackets nested deeper than ``MAX_NESTING``, a chain of more than
    ``MAX_TOWER`` powers (``x^{x^{x^{...}}}``), a numeric power or power tower (``9^{9^{9^{9}}}``,
    ``2**2**2**100``, ``10^{10^{8}}``) or a factorial whose value would have more than ``MAX_RESULT_DIGITS``
    digits. The wall-clock timeout remains the backstop for anything this misses.
    """
    depth = 0
    for c in answer:
        if c in "{([":
            depth += 1
            if depth > MAX_NESTING:
                return "nested too deeply"
        elif c in "})]" and depth > 0:
            depth -= 1
    flat = _flatten_powers(answer)
    if "^" in flat:
        if any(piece.count("^") > MAX_TOWER for piece in _NON_TERM.split(flat)):
            return "power tower too tall"
        for m in _TOWER.finditer(flat):
            if _power_digits(m.group(0)) > MAX_RESULT_DIGITS:
                return "power too large"
    if "!" in flat:
        for m in _FACTORIAL.finditer(flat):
            n = m.group(1)
            if len(n) > 5 or int(n) > 3_000:
                return "factorial too large"
    return None
