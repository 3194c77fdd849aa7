"""Agreement with hand-labelled grading cases of the kinds the rule-based grader used to miss.

Four kinds, each with answers that must be graded correct and answers that must not:

- ``multi``: answers made of several boxes (``\\boxed{1} and \\boxed{2}`` for ``{1, 2}``), references made of
  several boxes, and the hacks next to them (``\\boxed{1} or \\boxed{2}`` or a shotgun of boxes against a
  single-valued reference).
- ``decimal``: references written as long rounded decimals (``0.0833333333333333`` for 1/12), compared at
  the reference's own precision, never looser.
- ``constant``: Euler's number and the imaginary unit in roman type (``\\mathrm{e}``, ``\\mathrm{i}``), pi.
- ``unit``: units that are legitimately dropped, and look-alikes that must not be (``2d``, ``10 thousand``).

The labels are what a careful human grader would say. The grader must agree with every row and must never
grade a wrong answer correct: the RL reward must not be hackable.
"""

from __future__ import annotations

import collections
from decimal import Decimal
from fractions import Fraction

import pytest

from cepo_services.verifier import Grader, extract_last_boxed
from cepo_services.verifier import extract as ex

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def grader():
    with Grader(timeout_s=5.0) as g:
        g.warm_up()
        yield g


# (kind, response, reference, correct)
CASES = [
    # ---- several boxes ---------------------------------------------------------------------------------
    ("multi", r"\boxed{1} and \boxed{2}", r"\{1,2\}", True),
    ("multi", r"\boxed{1} and \boxed{2}", "1, 2", True),
    ("multi", r"\boxed{2} and \boxed{1}", r"\{1, 2\}", True),
    ("multi", r"So the solutions are $\boxed{1}$, $\boxed{2}$.", "1,2", True),
    ("multi", r"\boxed{(2,2)} \text{ and } \boxed{(6,2)}", "(2,2),(6,2)", True),
    ("multi", r"\boxed{(6,2)}, \boxed{(2,2)}", "(2,2),(6,2)", True),
    ("multi", r"\boxed{1}; \boxed{2}; \boxed{3}", "1, 2, 3", True),
    ("multi", r"\boxed{1}, \boxed{2}, and \boxed{3}", r"\{1,2,3\}", True),
    ("multi", r"\boxed{-2} \quad \boxed{3}", "x=-2, x=3", True),
    ("multi", r"\boxed{(2,2),(6,2)}", r"\boxed{(2,2)} and \boxed{(6,2)}", True),
    ("multi", r"\boxed{1} and \boxed{2}", r"\boxed{2} and \boxed{1}", True),
    ("multi", r"\boxed{\pm 2}", r"\boxed{2} and \boxed{-2}", True),
    ("multi", r"\boxed{1} or \boxed{2}", r"\{1,2\}", True),
    ("multi", r"\boxed{1}, \boxed{2}", "(1, 2)", True),
    ("multi", r"\boxed{2} \text{ or } \boxed{2}", "2", True),
    ("multi", r"\boxed{3}\boxed{3}", "3", True),
    ("multi", r"First \boxed{1}, on reflection \boxed{2}", "2", True),
    ("multi", r"We get \boxed{1} here. Finally, the answer is \boxed{2}.", "2", True),
    ("multi", r"\boxed{(6,2)}", r"\boxed{(2,2)} and \boxed{(6,2)}", False),
    ("multi", r"\boxed{2}", r"\boxed{1} \text{ and } \boxed{2}", False),
    ("multi", r"\boxed{1}", r"\{1,2\}", False),
    ("multi", r"\boxed{1} and \boxed{2}", "2", False),
    ("multi", r"\boxed{1} or \boxed{2}", "2", False),
    ("multi", r"\boxed{1} \boxed{2} \boxed{3} \boxed{4} \boxed{5}", "5", False),
    ("multi", " ".join(rf"\boxed{{{i}}}" for i in range(1, 21)), "20", False),
    ("multi", r"\boxed{1}, \boxed{2}, \boxed{3}", "1, 2", False),
    ("multi", r"\boxed{1} and \boxed{3}", r"\{1,2\}", False),
    ("multi", r"\boxed{2}, \boxed{1}", "(1, 2)", False),
    ("multi", r"\boxed{1} and \boxed{2}", r"\boxed{1}", False),
    ("multi", r"\boxed{(2,2)} and \boxed{(2,6)}", "(2,2),(6,2)", False),
    ("multi", r"\boxed{1}, \boxed{2}", "x=1, y=2", True),
    ("multi", r"\boxed{2}, \boxed{1}", "x=1, y=2", False),
    ("multi", r"\boxed{2, 1}", "x=1, y=2", False),
    ("multi", r"\boxed{(1, 2)}", "x=1, y=2", True),
    ("multi", r"\boxed{(2, 1)}", "x=1, y=2", False),
    ("multi", r"\boxed{x=1} and \boxed{y=2}", "x=1, y=2", True),
    ("multi", r"\boxed{x = 1 \text{ or } x = 2}", "2", False),
    ("multi", r"\boxed{\pm 2}", "2", False),
    ("multi", r"\boxed{3} and \boxed{4}", r"3 \text{ and } 4", True),
    (
        "multi",
        ", ".join(rf"\boxed{{{i}}}" for i in range(1, 13)),
        ",".join(str(i) for i in range(1, 13)),
        True,
    ),
    (
        "multi",
        ", ".join(rf"\boxed{{{i}}}" for i in range(1, 14)),
        ",".join(str(i) for i in range(1, 14)),
        False,
    ),
    # ---- references written as long rounded decimals ---------------------------------------------------
    ("decimal", r"\boxed{\frac{1}{12}}", "0.0833333333333333", True),
    ("decimal", r"\boxed{\sqrt{17}}", "4.123105625617661", True),
    ("decimal", r"\boxed{1/12}", "0.0833333333333333", True),
    ("decimal", r"\boxed{\dfrac{1}{12}}", "0.0833333333333333", True),
    ("decimal", r"\boxed{\pi}", "3.141592653589793", True),
    ("decimal", r"\boxed{\frac{1}{3}}", "0.3333333333333333", True),
    ("decimal", r"\boxed{-\frac{1}{12}}", "-0.0833333333333333", True),
    ("decimal", r"\boxed{e}", "2.718281828459045", True),
    ("decimal", r"\boxed{\frac{\sqrt{2}}{2}}", "0.7071067811865476", True),
    ("decimal", r"\boxed{\ln 2}", "0.6931471805599453", True),
    ("decimal", r"\boxed{\frac{1}{12}}", "0.083333333333333", True),
    ("decimal", r"\boxed{\frac{1}{12}}", "8.33333333333333e-02", True),
    ("decimal", r"\boxed{\sqrt{17}\text{ cm}}", "4.123105625617661", True),
    ("decimal", r"\boxed{\frac{1}{7}}", "0.14285714", True),
    ("decimal", r"\boxed{\frac{1}{1024}}", "0.0009765625", True),
    ("decimal", r"\boxed{2\pi}", "6.283185307179586", True),
    ("decimal", r"\boxed{0.08}", "0.0833333333333333", False),
    ("decimal", r"\boxed{0.0833}", "0.0833333333333333", False),
    ("decimal", r"\boxed{0.083333333333333}", "0.0833333333333333", False),
    ("decimal", r"\boxed{\frac{1}{11}}", "0.0833333333333333", False),
    ("decimal", r"\boxed{\sqrt{18}}", "4.123105625617661", False),
    ("decimal", r"\boxed{-\frac{1}{12}}", "0.0833333333333333", False),
    ("decimal", r"\boxed{\frac{1}{12}}", "0.0833", False),
    ("decimal", r"\boxed{\frac{1}{12}}", "0.0833333333333335", False),
    ("decimal", r"\boxed{x}", "0.0833333333333333", False),
    ("decimal", r"\boxed{\frac{1}{7}}", "0.1428571", False),
    ("decimal", r"\boxed{\pi}", "3.14", False),
    ("decimal", r"\boxed{6.28}", r"2\pi", False),
    ("decimal", r"\boxed{\frac{123456781}{100000}}", "1234.5678", False),
    ("decimal", r"\boxed{0.08333333333333333}", "0.0833333333333333", False),
    ("decimal", r"\boxed{\frac{\pi}{12}}", "0.2617993877991495", True),
    ("decimal", r"\boxed{\frac{\pi}{12}}", "0.2617993877991493", False),
    ("decimal", r"\boxed{x=\frac{1}{12}}", "0.0833333333333333", True),
    ("decimal", r"\boxed{\frac{e-1}{e}}", "0.6321205588285577", True),
    ("decimal", r"\boxed{\frac{1}{12}}", "0.08333333", False),
    # ---- Euler's number, the imaginary unit and pi in roman type ---------------------------------------
    ("constant", r"\boxed{2\mathrm{e}}", "2", False),
    ("constant", r"\boxed{2\mathrm{e}}", "2e", True),
    ("constant", r"\boxed{\mathrm{e}^{2}}", "e^2", True),
    ("constant", r"\boxed{e^{2}}", r"\mathrm{e}^{2}", True),
    ("constant", r"\boxed{1-e^{-1}}", r"1-\frac{1}{\mathrm{e}}", True),
    ("constant", r"\boxed{1 - 1/e}", r"1-\frac{1}{\mathrm{e}}", True),
    ("constant", r"\boxed{\frac{e-1}{e}}", r"1-\frac{1}{\mathrm{e}}", True),
    ("constant", r"\boxed{1}", r"1-\frac{1}{\mathrm{e}}", False),
    ("constant", r"\boxed{1-\frac{1}{2}}", r"1-\frac{1}{\mathrm{e}}", False),
    ("constant", r"\boxed{2\text{e}}", "2", False),
    ("constant", r"\boxed{2\,\mathrm{e}}", "2", False),
    ("constant", r"\boxed{{\rm e}^{x}}", "e^x", True),
    ("constant", r"\boxed{2\operatorname{e}}", "2e", True),
    ("constant", r"\boxed{x\mathrm{e}^{x}}", "xe^x", True),
    ("constant", r"\boxed{2\mathrm{i}}", "2", False),
    ("constant", r"\boxed{2\mathrm{i}}", "2i", True),
    ("constant", r"\boxed{3+4\mathrm{i}}", "3+4i", True),
    ("constant", r"\boxed{3+4\mathrm{i}}", "3", False),
    ("constant", r"\boxed{2\mathrm{\pi}}", r"2\pi", True),
    ("constant", r"\boxed{2\mathrm{pi}}", "2", False),
    ("constant", r"\boxed{2π}", r"2\pi", True),
    ("constant", r"\boxed{\uppi}", r"\pi", True),
    ("constant", r"\boxed{2\pi}", r"\pi^2", False),
    ("constant", r"\boxed{2\mathrm{e}-3}", "0.002", False),
    ("constant", r"\boxed{2i}", r"2\mathrm{i}", True),
    # ---- units, percent, degrees -----------------------------------------------------------------------
    ("unit", r"\boxed{5\text{ cm}}", "5", True),
    ("unit", r"\boxed{5 \text{ cm}^2}", "5", True),
    ("unit", r"\boxed{5\,\mathrm{m}}", "5", True),
    ("unit", r"\boxed{12 \text{ square units}}", "12", True),
    ("unit", r"\boxed{3 \text{ hours}}", "3", True),
    ("unit", r"\boxed{5 cm}", "5", True),
    ("unit", r"\boxed{60 \text{ mph}}", "60", True),
    ("unit", r"\boxed{5}", r"5\text{ cm}", True),
    ("unit", r"\boxed{5\text{ cm}}", r"5\text{ centimeters}", True),
    ("unit", r"\boxed{\sqrt{2}\text{ m}}", r"\sqrt{2}", True),
    ("unit", r"\boxed{5 \text{ dollars}}", "5", True),
    ("unit", r"\boxed{9.8\,\mathrm{m}/\mathrm{s}^2}", "9.8", True),
    ("unit", r"\boxed{30°}", "30", True),
    ("unit", r"\boxed{50\%}", "0.5", True),
    ("unit", r"\boxed{50\%}", "50", True),
    ("unit", r"\boxed{2d}", "2", False),
    ("unit", r"\boxed{x+2d}", "x+2", False),
    ("unit", r"\boxed{2t}", "2", False),
    ("unit", r"\boxed{3m}", "3", False),
    ("unit", r"\boxed{\frac{1}{2}h}", r"\frac12", False),
    ("unit", r"\boxed{2ab}", "2", False),
    ("unit", r"\boxed{\sqrt{2}m}", r"\sqrt{2}", False),
    ("unit", r"\boxed{10\text{ thousand}}", "10", False),
    ("unit", r"\boxed{5\text{ million}}", "5", False),
    ("unit", r"\boxed{3\text{ squared}}", "3", False),
    ("unit", r"\boxed{5 \text{ or more}}", "5", False),
    ("unit", r"\boxed{5\text{ m}}", r"5\text{ cm}", False),
    ("unit", r"\boxed{5\text{ km}}", r"5\text{ m}", False),
    ("unit", r"\boxed{4\text{ m}^2}", r"4\text{ m}^3", False),
    ("unit", r"\boxed{5\%}", "0.5", False),
    ("unit", r"\boxed{0.5\%}", "0.5", False),
    ("unit", r"\boxed{x = 5 = 2}", "2", False),
    ("unit", r"\boxed{n \text{ is odd}}", r"n \text{ is even}", False),
    ("unit", r"\boxed{7 \text{ bananas}}", "7", True),
    ("unit", r"\boxed{50\text{ percent}}", "0.5", True),
    ("unit", r"\boxed{5 \text{ m}}", r"5 \text{ meters}", True),
    ("unit", r"\boxed{30^\circ\text{C}}", "30", True),
    ("unit", r"\boxed{5=2}", "2", False),
    ("unit", r"\boxed{x = \frac{4}{2} = 2}", "2", True),
]

KINDS = ("multi", "decimal", "constant", "unit")


@pytest.mark.parametrize(
    ("kind", "response", "reference", "correct"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_case(grader, kind, response, reference, correct):
    verdict = grader.grade(response, reference)
    assert verdict.correct is correct, verdict
    assert verdict.reward == (1.0 if correct else 0.0)
    if correct:
        assert verdict.reason == "correct"
    else:
        assert verdict.reason in ("wrong_answer", "unparseable"), verdict


def test_agreement_and_no_false_positives(grader):
    assert len(CASES) >= 60
    assert {c[0] for c in CASES} == set(KINDS)
    for kind in KINDS:  # every kind has rows of both labels
        assert {c[3] for c in CASES if c[0] == kind} == {True, False}, kind
    verdicts = grader.grade_batch([c[1] for c in CASES], [c[2] for c in CASES])
    counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])  # rows, agreements, false +
    false_positives = []
    for (kind, response, reference, correct), verdict in zip(CASES, verdicts, strict=True):
        counts[kind][0] += 1
        counts[kind][1] += verdict.correct == correct
        if verdict.correct and not correct:
            counts[kind][2] += 1
            false_positives.append((response, reference))
    agreement = sum(c[1] for c in counts.values()) / len(CASES)
    print("\n" + "; ".join(f"{k}: {c[1]}/{c[0]} agree, {c[2]} false positives" for k, c in counts.items()))
    print(f"agreement {agreement:.1%} on {len(CASES)} cases")
    assert false_positives == []
    assert agreement == 1.0


# ---- the pure helpers behind these rules ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "status", "contents", "overflow"),
    [
        (r"\boxed{1} and \boxed{2}", "ok", ("1", "2"), False),
        (r"$\boxed{1}$, $\boxed{2}$, and $\boxed{3}$.", "ok", ("1", "2", "3"), False),
        (r"\boxed{1} \text{ or } \boxed{2}", "ok", ("1", "2"), False),
        (r"\boxed{1};\quad\boxed{2}", "ok", ("1", "2"), False),
        (r"\(\boxed{1}\) and \(\boxed{2}\)", "ok", ("1", "2"), False),
        (r"**\boxed{1}** and **\boxed{2}**", "ok", ("1", "2"), False),
        (r"\boxed{2} \boxed{2}", "ok", ("2",), False),
        (r"\boxed{\frac{1}{2}} and \boxed{\dfrac{1}{2}}", "ok", (r"\dfrac{1}{2}",), False),
        (r"First \boxed{1}, on reflection \boxed{2}", "ok", ("2",), False),
        (r"\boxed{1} then \boxed{2}", "ok", ("2",), False),
        (r"\boxed{1}" + " " * 65 + r"\boxed{2}", "ok", ("2",), False),
        (r"\boxed{} and \boxed{2}", "ok", ("2",), False),
        (r"\boxed{\boxed{3}}", "ok", ("3",), False),
        (r"\boxed{1} and \boxed alone \boxed{2}", "ok", ("2",), False),
        (r"\boxed{1} and \boxed{2", "unclosed_boxed", (), False),
        (r"\boxed{1} and \boxed{ }", "empty_boxed", (), False),
        ("no box", "no_boxed", (), False),
        (" ".join(rf"\boxed{{{i}}}" for i in range(12)), "ok", tuple(str(i) for i in range(12)), False),
        (" ".join(rf"\boxed{{{i}}}" for i in range(14)), "ok", tuple(str(i) for i in range(1, 14)), True),
    ],
)
def test_extract_final_boxes(text, status, contents, overflow):
    found = ex.extract_final_boxes(text)
    assert (found.status, found.contents, found.overflow) == (status, contents, overflow)
    if status != "ok":
        assert extract_last_boxed(text).status == status


def test_answer_of_several_boxes_is_reported_joined(grader):
    assert grader.grade(r"\boxed{1} and \boxed{2}", "1, 2").answer == "1, 2"
    assert grader.grade(r"\boxed{2} and \boxed{2}", "2").answer == "2"
    shotgun = grader.grade(" ".join(rf"\boxed{{{i}}}" for i in range(20)), "19")
    assert (shotgun.reason, shotgun.answer) == ("wrong_answer", ", ".join(str(i) for i in range(7, 20)))
    assert grader.grade(r"\boxed{1}", r"\boxed{1} and \boxed{2}").reason == "wrong_answer"
    many = " ".join(rf"\boxed{{{i}}}" for i in range(20))
    assert grader.grade(r"\boxed{1}", many).reason == "bad_reference"  # a reference that is a shotgun


@pytest.mark.parametrize(
    ("answer", "text", "unit"),
    [
        (r"5\text{ cm}", "5", "cm"),
        (r"5 \text{ cm}^2", "5", "cm^2"),
        (r"5 \text{ square centimeters}", "5", "cm^2"),
        (r"5\,\mathrm{m}", "5", "m"),
        (r"9.8\,\mathrm{m}/\mathrm{s}^2", "9.8", "m/s^2"),
        (r"5 \text{ km per hour}", "5", "km/h"),
        (r"{\rm 5 kg}", r"{\rm 5 kg}", None),
        (r"5{\rm kg}", "5", "kg"),
        ("5 cm", "5", "cm"),
        ("3 hours", "3", "h"),
        (r"7 \text{ apples}", "7", "?"),
        (r"x \text{ cm}", "x", "cm"),
        (r"\$7 \text{ dollars}", r"\$7", "$"),
        (r"30^\circ\text{C}", r"30^\circ", "?"),
        ("30°", r"30^{\circ}", None),
        (r"50\text{ percent}", r"50\%", None),
        # kept: variables, value-changing words, predicates, constants, nothing left, an open operator
        ("2d", "2d", None),
        ("3m", "3m", None),
        (r"\sqrt{2}h", r"\sqrt{2}h", None),
        ("2ab", "2ab", None),
        (r"10\text{ thousand}", r"10\text{ thousand}", None),
        (r"3\text{ squared}", r"3\text{ squared}", None),
        (r"5 \text{ or more}", r"5 \text{ or more}", None),
        (r"5\text{ per cent}", r"5\%", None),
        (r"2\mathrm{pi}", r"2\mathrm{pi}", None),
        (r"n \text{ is even}", r"n \text{ is even}", None),
        (r"x \text{ bananas}", r"x \text{ bananas}", None),
        (r"5\text{K}", r"5\text{K}", None),
        (r"\text{ cm}", r"\text{ cm}", None),
        (r"x + \text{cm}", r"x + \text{cm}", None),
        (r"\frac{1}{\text{cm}}", r"\frac{1}{\text{cm}}", None),
        # constants in roman type become the plain letter
        (r"2\mathrm{e}", "2e", None),
        (r"2\text{e}", "2e", None),
        (r"\cdot\mathrm{e}", r"\cdot e", None),
        (r"{\rm e}^{x}", "e^{x}", None),
        (r"2\operatorname{e}", "2e", None),
        (r"2\mathrm{e}-3", "2{e}-3", None),
        (r"1-\frac{1}{\mathrm{e}}", r"1-\frac{1}{e}", None),
        (r"3+4\mathrm{i}", "3+4i", None),
        (r"\uppi", r"\pi", None),
    ],
)
def test_prepare(answer, text, unit):
    prepared = ex.prepare(answer)
    assert (prepared.text, prepared.unit) == (text, unit)


def test_units_conflict():
    def p(answer: str) -> ex.Prepared:
        return ex.prepare(answer)

    assert ex.units_conflict(p(r"5\text{ m}"), p(r"5\text{ cm}"))
    assert ex.units_conflict(p(r"4\text{ m}^2"), p(r"4\text{ m}^3"))
    assert not ex.units_conflict(p(r"5\text{ cm}"), p(r"5\text{ centimetres}"))
    assert not ex.units_conflict(p(r"5\text{ cm}"), p("5"))
    assert not ex.units_conflict(p(r"7\text{ apples}"), p(r"7\text{ oranges}"))  # unknown: not judged


def test_rounded_reference_rules():
    assert ex.rounded_reference("0.0833333333333333") == Decimal("0.0833333333333333")
    assert ex.rounded_reference("8.33333333333333e-02") is not None
    assert ex.rounded_reference("3.141593") is None  # 8 significant digits are needed
    assert ex.rounded_reference("0.14285714") is not None
    assert ex.rounded_reference("123456789") is None  # an integer is exact
    assert ex.rounded_reference("1/3") is None
    ref = Decimal("0.0833333333333333")
    assert ex.agrees_at_precision(ref, Fraction(1, 12))
    assert ex.agrees_at_precision(Decimal("0.0833333333333334"), Fraction(1, 12))  # rounded up: one unit
    assert not ex.agrees_at_precision(Decimal("0.0833333333333332"), Fraction(1, 12))
    assert not ex.agrees_at_precision(ref, Fraction(1, 11))
    assert not ex.agrees_at_precision(ref, Fraction(-1, 12))
    # a terminating value gets no tolerance, however close
    assert not ex.agrees_at_precision(Decimal("1234.5678"), Fraction(123456781, 100000))
    assert ex.is_plain_decimal("0.0833") and ex.is_plain_decimal("-12") and not ex.is_plain_decimal("1/12")
