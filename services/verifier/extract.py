"""Pure, linear-time text helpers of the verifier: sanitising, ``\\boxed{}`` extraction, cheap checks.

Nothing here evaluates model text, imports math-verify or sympy, or can take more than linear time: these
functions run in the caller's process, before (and often instead of) the sandboxed math-verify worker.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
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


def _match_braces(text: str, open_index: int, limit: int | None = None) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_index`` (before ``limit``), or -1. Backslash escapes
    (``\\{``, ``\\}``) skip."""
    depth = 0
    i = open_index
    n = len(text) if limit is None else limit
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
    found, _ = _last_box(text)
    return found


def _box_brace(text: str, start: int) -> int:
    """Index of the ``{`` that opens the ``\\boxed`` at ``start`` (spaces allowed before it), or -1."""
    j = start + len(BOXED)
    n = len(text)
    while j < n and text[j] in " \t\r\n":
        j += 1
    return j if j < n and text[j] == "{" else -1


def _last_box(text: str) -> tuple[Extraction, int]:
    """:func:`extract_last_boxed` and the index where that last ``\\boxed`` starts (-1 without one)."""
    end = len(text)
    while True:
        start = text.rfind(BOXED, 0, end)
        if start < 0:
            return Extraction(NO_BOXED), -1
        j = _box_brace(text, start)
        if j >= 0:
            break
        end = start
    close = _match_braces(text, j)
    if close < 0:
        return Extraction(UNCLOSED_BOXED), start
    content = text[j + 1 : close].strip()
    if not content:
        return Extraction(EMPTY_BOXED), start
    return Extraction(OK, content), start


# ---- several final boxes: one answer made of several boxes ----------------------------------------------

MAX_ANSWER_BOXES = 12  # a final run of more distinct boxes is a shotgun: wrong, whatever the reference
MAX_JOIN_GAP = 64  # the text between two boxes of one answer is at most this long

# What may stand between two boxes of one answer: spacing, math delimiters, markdown emphasis, punctuation
# (, ; . &), line breaks, "and"/"or" (plain or in \text{}). Each alternative starts differently, so a failed
# match backtracks in linear time.
_JOINER = re.compile(
    r"(?:\s|\$|\*|[,;.&~]|\\[()\[\],;:! ]|\\\\|\\q?quad(?![A-Za-z])"
    r"|(?<![A-Za-z])(?:and|or)(?![A-Za-z])"
    r"|\\(?:text|textrm|textnormal|mathrm|mbox)\s*\{\s*(?:and|or|,|;)?\s*\})*"
)


@dataclass(frozen=True)
class Boxes:
    """The final answer of a text: the distinct contents of its last run of joined boxes, oldest first.

    ``status`` is ``ok`` or the reason the *last* box is unusable (as :func:`extract_last_boxed`);
    ``overflow`` is True when the run holds more than ``max_boxes`` distinct boxes (only the last
    ``max_boxes + 1`` are in ``contents`` then)."""

    status: str
    contents: tuple[str, ...] = ()
    overflow: bool = False


def extract_final_boxes(text: str, max_boxes: int = MAX_ANSWER_BOXES) -> Boxes:
    """The last box of ``text`` and the boxes joined to it: a run of boxes belongs to one answer when
    nothing but a joiner (spacing, ``$``, ``,``, ``;``, ``.``, ``and``, ``or``, ``\\text{ and }``,
    ``\\quad``...; at most ``MAX_JOIN_GAP`` characters) stands between consecutive boxes. Any other text
    ends the run, so an earlier box followed by more working is not part of the answer.

    Contents that are equal after :func:`normalize` count once. Linear time: every character is scanned a
    bounded number of times, and the walk stops after ``max_boxes + 1`` distinct boxes.
    """
    last, start = _last_box(text)
    if last.status != OK or last.content is None:
        return Boxes(last.status)
    contents = [last.content]
    seen = {normalize(last.content)}
    while len(contents) <= max_boxes:
        previous = text.rfind(BOXED, 0, start)
        if previous < 0:
            break
        j = _box_brace(text, previous)
        if j < 0 or j >= start:
            break
        close = _match_braces(text, j, start)
        if close < 0:
            break
        gap = text[close + 1 : start]
        if len(gap) > MAX_JOIN_GAP or not _JOINER.fullmatch(gap):
            break
        content = text[j + 1 : close].strip()
        if not content:
            break
        key = normalize(content)
        if key not in seen:
            seen.add(key)
            contents.append(content)
        start = previous
    contents.reverse()
    return Boxes(OK, tuple(contents), overflow=len(contents) > max_boxes)


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


# ---- answer preparation: constants in roman type, degrees, units -----------------------------------------


def _words(text: str) -> list[str]:
    return text.split()


def _unit_table(text: str) -> dict[str, str]:
    """One line per unit: its canonical name, then the other spellings of it."""
    table = {}
    for line in text.strip().splitlines():
        names = line.split()
        for name in names:
            table[name] = names[0]
    return table


# \mathrm{e} / \text{e} / {\rm e} / \operatorname{e} is Euler's number and \mathrm{i} the imaginary unit, never
# a unit to drop: they become the plain letter, written as the reference would write it ("2\mathrm{i}" ->
# "2i": math-verify gives symbols a different assumption when the text has a standalone i), with a space
# after a command ("\cdot\mathrm{e}" -> "\cdot e", not "\cdote").
_ROMAN_CONSTANT = re.compile(
    r"(?:(\\[A-Za-z]+)\s*)?"
    r"(?:\\(?:mathrm|mathit|mathup|mathnormal|text|textrm|textit|textnormal|textup|operatorname|rm)\s*"
    r"\{\s*([ei])\s*\}|\{\s*\\rm\s+([ei])\s*\})"
)


_DIGIT_AHEAD = re.compile(r"\s*[+-]?\s*\d")


def _plain_constant(m: re.Match) -> str:
    letter = m.group(2) or m.group(3)
    if letter == "e" and _DIGIT_AHEAD.match(m.string, m.end()):
        letter = "{e}"  # "2\mathrm{e}-3" is 2e - 3, not the e-notation 2e-3
    return f"{m.group(1)} {letter}" if m.group(1) else letter


_PERCENT_TEXT = re.compile(
    r"\\(?:text|textrm|textnormal|mathrm|mbox)\s*\{\s*(?:percent|per\s*cent|pct)\s*\}|\s*\\text\s*\{\s*\\%\s*\}"
)
_UPRIGHT_PI = re.compile(r"\\(?:uppi|textpi)(?![A-Za-z])")
_DEGREE_SIGN = re.compile(r"\s*(?:°|\\degree(?![A-Za-z]))(?:\s*[CF](?![A-Za-z]))?")

# Words that change the value or the meaning of what comes before them: a trailing \text{...} holding one of
# them is never dropped as a unit ("10 thousand", "5 or more", "3 squared", "2 pi", "5 percent").
_NOT_UNIT_WORDS = frozenset(
    _words(
        """
        zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
        sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred
        thousand million billion trillion quadrillion dozen score gross lakh crore mil mill mn bn tn grand
        half halve third fourth fifth sixth seventh eighth ninth tenth hundredth thousandth millionth
        quarter times power percent percentage pct permille plus minus over divided and or
        not no nor none neither never impossible undefined infinity infinite inf than more less fewer least
        most greater smaller larger bigger higher lower above below under negative positive root sqrt pi e i
        mod modulo factorial log ln exp sin cos tan east west north south left right up down increase
        increased decrease decreased gain loss profit older younger earlier later before after ago faster
        slower ahead behind remainder is are was were be even odd true false yes
        """
    )
)
# Multi-letter words that may stand bare (not in \text{}) after a value as a unit. Single letters never do
# ("2d", "3m", "2t" keep their variable), nor words that read as products of variables ("ab", "bc").
_BARE_UNITS = _words(
    """
    centimeters centimetres millimeters millimetres kilometers kilometres meters metres inches inch feet
    foot yards yard miles mile cm mm km kg mg ml mL ft yd grams gram kilograms kilogram liters liter litres
    litre seconds second secs sec minutes minute mins min hours hour hrs hr days day weeks week months month
    years year yrs yr mph kph kmph kmh dollars dollar cents cent degrees degree deg radians radian rad units
    unit acres acre gallons gallon gal lbs lb pounds pound ounces ounce oz tonnes tonne tons ton apples
    apple students student people persons person men women man woman children child toys toy coins coin
    tiles tile edges edge digits digit meals meal soldiers soldier tickets ticket marbles marble books book
    cookies cookie candies candy pages page ways
    """
)
_BARE_UNIT_SET = frozenset(word.lower() for word in _BARE_UNITS)
# One-letter units allowed in \text{}/\mathrm{} (case-sensitive): never e or i, never K (thousand) or M.
_SINGLE_LETTER_UNITS = frozenset(_words("m g s h l L J W V N C F"))

# Canonical names of common units, to tell "5 m" from "5 cm" when both sides carry one.
_UNIT_NAMES = _unit_table(
    """
    mm millimeter millimetre
    cm centimeter centimetre
    m meter metre mtr
    km kilometer kilometre
    in inch inche
    ft foot feet
    yd yard
    mi mile
    mg milligram
    g gram gm
    kg kilogram
    lb lbs pound
    oz ounce
    t ton tonne
    s sec secs second
    min mins minute
    h hr hrs hour
    day
    week
    month
    year yr yrs
    ml milliliter millilitre
    l liter litre
    gal gallon
    mph
    km/h kph kmh kmph
    $ dollar
    cent
    deg degree
    rad radian
    acre
    ha hectare
    """
)
_POWER_PREFIX = {"square": 2, "sq": 2, "cubic": 3, "cu": 3}
_POWER_SUFFIX = {"squared": 2, "cubed": 3}


def _unit_atom(capture: bool) -> str:
    """A regex for one unit: ``\\text{...}`` (or ``\\mathrm``...), ``{\\rm ...}``, or a bare unit word, each
    with an optional small exponent; with named groups when ``capture``."""

    def group(name: str, pattern: str) -> str:
        return f"(?P<{name}>{pattern})" if capture else f"(?:{pattern})"

    exponent = group("exp", r"\s*\^\s*(?:\{\s*-?[1-3]\s*\}|-?[1-3])")
    text = r"\\(?:text|textrm|textnormal|textup|mathrm|mbox|rm)\s*\{" + group("text", r"[^{}]{1,40}") + r"\}"
    rm = r"\{\s*\\rm\s+" + group("rm", r"[^{}]{1,40}") + r"\}"
    bare = r"(?<![A-Za-z\\_^{])" + group("bare", "|".join(_BARE_UNITS)) + r"(?![A-Za-z])"
    return f"(?:{text}|{rm}|{bare})(?:{exponent})?"


_UNIT_SPACE = r"(?:\s|~|\\[,;:! ]|\\q?quad(?![A-Za-z]))*"
_UNIT_JOIN = _UNIT_SPACE + r"(?:(?:/|\\cdot(?![A-Za-z]))" + _UNIT_SPACE + ")?"
_UNIT_TAIL = re.compile(f"{_UNIT_SPACE}{_unit_atom(False)}(?:{_UNIT_JOIN}{_unit_atom(False)})*{_UNIT_SPACE}$")
_UNIT_TOKEN = re.compile(f"{_unit_atom(True)}|(?P<per>/)")
_UNIT_WINDOW = 160  # a unit tail is looked for in the last this-many characters only (bounded work)
# A plain number, possibly signed, with a dollar sign, thousands separators, a fraction or a percent sign.
_NUMERIC_VALUE = re.compile(
    r"[+-]?\s*(?:\\\$\s*)?(?:(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:\s*/\s*\d+)?|\\[dt]?frac\{\d+\}\{\d+\})(?:\s*\\%)?"
)
_TRAILING_SPACE = re.compile(r"(?:\s|~|\\[,;:! ]|\\q?quad)+$")
# What the value left of a unit may not end with (an operator waiting for its operand: "x + \text{cm}").
_OPEN_END = re.compile(r"(?:[-+*/=^_({\[,:<>|]|\\(?:times|cdot|div|pm|mp|frac|sqrt|le|ge|ne|approx))\s*$")


@dataclass(frozen=True)
class Prepared:
    """An answer ready for comparison: ``text`` without a trailing unit; ``unit`` the canonical name of the
    unit that was dropped ("cm", "m/s^2"; "?" for one outside the table), None when none was."""

    text: str
    unit: str | None = None


def _unit_name(word: str) -> str | None:
    """The canonical name of one unit word (plurals folded), None when it is not in the table."""
    if word in _UNIT_NAMES:
        return _UNIT_NAMES[word]
    low = word.lower()
    if low in _UNIT_NAMES:
        return _UNIT_NAMES[low]
    for suffix in ("es", "s"):
        if len(low) > 3 and low.endswith(suffix) and low[: -len(suffix)] in _UNIT_NAMES:
            return _UNIT_NAMES[low[: -len(suffix)]]
    return None


def _known_unit_word(word: str) -> bool:
    low = word.lower()
    return (
        _unit_name(word) is not None
        or low in _POWER_PREFIX
        or low in _POWER_SUFFIX
        or low == "per"
        or low in _BARE_UNIT_SET
    )


def _text_unit_ok(content: str, numeric_value: bool) -> bool:
    """Whether the content of a trailing ``\\text{...}`` reads as a unit that may be dropped. After a plain
    number any words but the value-changing ones may go ("7 apples", "12 square units"); after anything
    else (a variable, an expression) only known unit words may ("x \\text{ cm}", not "n \\text{ is even}")."""
    text = re.sub(r"\\[,;:! ]|~", " ", content).strip()
    if not re.fullmatch(r"°?[A-Za-z][A-Za-z .'’\-/^{}0-9²³]*", text):
        return False
    words = re.findall(r"[A-Za-z]+", text)
    if len(words) == 1 and len(words[0]) == 1:
        return words[0] in _SINGLE_LETTER_UNITS
    if not numeric_value and not all(_known_unit_word(word) for word in words):
        return False
    for k, word in enumerate(words):
        low = word.lower()
        if k == 0 and low in _POWER_SUFFIX:  # "3 squared" (but "cm squared" is a unit)
            return False
        if k > 0 and low == "cent" and words[k - 1].lower() == "per":  # "per cent"
            return False
        stems = {low, low.removesuffix("s"), low.removesuffix("es")}
        if stems & _NOT_UNIT_WORDS:
            return False
    return True


def _unit_key(tail: str) -> str:
    """A canonical name for a unit tail ("cm", "m/s^2", "km*h"); "?" when a part is not in the table."""
    names: list[str] = []
    for m in _UNIT_TOKEN.finditer(tail):
        if m.group("per") is not None:
            names.append("/")
            continue
        raw = m.group("text") or m.group("rm") or m.group("bare") or ""
        pending = 1
        atom: list[str] = []
        for word in re.findall(r"[A-Za-z]+|\^\s*\{?\s*-?[1-3]|[²³/]", raw):
            low = word.lower()
            if word == "/" or low == "per":
                atom.append("/")
            elif low in _POWER_PREFIX:
                pending = _POWER_PREFIX[low]
            elif low in _POWER_SUFFIX or word[0] in "^²³":
                if not atom or atom[-1] == "/":
                    return "?"
                power = _POWER_SUFFIX.get(low) or {"²": 2, "³": 3}.get(word) or int(word.lstrip("^ {"))
                atom[-1] += f"^{power}"
            else:
                name = _unit_name(word)
                if name is None:
                    return "?"
                atom.append(name + (f"^{pending}" if pending != 1 else ""))
                pending = 1
        if not atom or atom[-1] == "/":
            return "?"
        if m.group("exp"):
            atom[-1] += "^" + re.sub(r"[\s^{}]", "", m.group("exp"))
        if names and names[-1] != "/":
            names.append("*")
        names.extend(atom)
    return "".join(names) or "?"


def strip_unit(answer: str) -> Prepared:
    """``answer`` without a trailing unit: ``\\text{ cm}``, ``\\mathrm{m}/\\mathrm{s}^2``, ``{\\rm kg}``, or a
    bare multi-letter unit word ("5 cm", "3 hours").

    Conservative, so that dropping a unit never turns a wrong answer into a right one: a one-letter word
    outside ``\\text{}`` is a variable and stays ("2d", "3m", "\\sqrt{2}h"); a ``\\text{}`` holding a word that
    changes the value stays ("10 thousand", "5 or more", "3 squared", "2 pi"), and so do ``\\text{e}`` and
    ``\\text{i}``; nothing is dropped when no value would be left or the value would end in an operator.
    Bounded work: only the last ``_UNIT_WINDOW`` characters are searched."""
    m = _UNIT_TAIL.search(answer, max(0, len(answer) - _UNIT_WINDOW))
    if m is None:
        return Prepared(answer)
    tail = m.group(0)
    value = _TRAILING_SPACE.sub("", answer[: m.start()]).rstrip()
    if not value or value.endswith("\\") or _OPEN_END.search(value[-12:]):
        return Prepared(answer)
    numeric_value = bool(_NUMERIC_VALUE.fullmatch(value))
    for token in _UNIT_TOKEN.finditer(tail):
        content = token.group("text") or token.group("rm")
        if content is not None and not _text_unit_ok(content, numeric_value):
            return Prepared(answer)
    return Prepared(value, _unit_key(tail))


def prepare(answer: str) -> Prepared:
    """The form of an answer that is compared: roman-type constants made plain (``\\mathrm{e}`` → e,
    ``\\mathrm{i}`` → i, ``\\uppi`` → ``\\pi``), ``\\text{ percent}`` written as ``\\%``, ``°`` as
    ``^{\\circ}``, then a trailing unit dropped (:func:`strip_unit`). Linear time."""
    text = answer.strip()
    if "\\" in text:
        text = _ROMAN_CONSTANT.sub(_plain_constant, text)
        text = _UPRIGHT_PI.sub(r"\\pi", text)
        text = _PERCENT_TEXT.sub(r"\\%", text)
    if "°" in text or "\\degree" in text:
        text = _DEGREE_SIGN.sub(r"^{\\circ}", text)
    return strip_unit(text)


def units_conflict(a: Prepared, b: Prepared) -> bool:
    """Both answers carried a unit from the table and the units differ ("5 m" against "5 cm")."""
    return a.unit is not None and b.unit is not None and "?" not in (a.unit, b.unit) and a.unit != b.unit


# ---- references written as long rounded decimals -------------------------------------------------------

MIN_ROUNDED_DIGITS = 8  # a decimal reference with this many significant digits is read as a rounded value
_DECIMAL = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d{1,4})?")
_PLAIN_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,4})?")


def rounded_reference(normalized: str) -> Decimal | None:
    """The reference as a Decimal when it is a decimal (with a point) of at least ``MIN_ROUNDED_DIGITS``
    significant digits, e.g. ``0.0833333333333333`` or ``4.123105625617661`` (a machine-printed float), else
    None. Such a reference stands for any value that rounds to it at its last shown digit."""
    if len(normalized) > 400 or not _DECIMAL.fullmatch(normalized):
        return None
    try:
        value = Decimal(normalized)
    except InvalidOperation:
        return None
    if len(value.as_tuple().digits) < MIN_ROUNDED_DIGITS or not value.is_finite():
        return None
    return value


def is_plain_decimal(normalized: str) -> bool:
    """A number written out in digits (``0.0833``, ``12``, ``1.5e-3``), as opposed to a fraction."""
    return bool(_PLAIN_DECIMAL.fullmatch(normalized))


def agrees_at_precision(reference: Decimal, value: Fraction) -> bool:
    """Whether ``reference`` is ``value`` rounded (up or down) at the reference's last shown digit, for a
    value that no decimal of that many places can write exactly (1/12, 1/7). A value with a terminating
    decimal expansion (1/8, 123/1000) gets no tolerance: it must equal the reference exactly."""
    denominator = value.denominator
    for p in (2, 5):
        while denominator % p == 0:
            denominator //= p
    if denominator == 1:
        return False
    exponent = reference.as_tuple().exponent
    if not isinstance(exponent, int) or abs(exponent) > 10_000:
        return False
    scale = Fraction(10) ** (-exponent)
    scaled_value = value * scale
    scaled_reference = Fraction(reference) * scale
    low = scaled_value.numerator // scaled_value.denominator
    return scaled_reference in (low, low + 1)
