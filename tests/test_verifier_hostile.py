"""Hostile inputs: the verifier answers every string, within its time bound, and never runs model text."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cepo_proto import Verdict
from cepo_services.verifier import Grader

pytestmark = pytest.mark.timeout(120)

TIMEOUT_S = 1.0
SLACK_S = 2.0  # allowed on top of timeout_s for a call on a warm worker


@pytest.fixture(scope="module")
def grader():
    with Grader(timeout_s=TIMEOUT_S) as g:
        yield g


@pytest.fixture(scope="module")
def raw_grader():
    """No pre-screens: the wall-clock timeout is the only defence."""
    with Grader(timeout_s=TIMEOUT_S, prescreen=False, max_chars=1_000_000, max_answer_chars=200_000) as g:
        yield g


def timed(g: Grader, response: str, answer: str = "1", **options) -> Verdict:
    """Grade on a warm worker and assert the call's time bound."""
    g.warm_up()
    start = time.monotonic()
    verdict = g.grade(response, answer, **options)
    elapsed = time.monotonic() - start
    bound = options.get("timeout_s", g.timeout_s) + SLACK_S
    assert elapsed < bound, f"took {elapsed:.2f} s > {bound:.2f} s"
    assert isinstance(verdict, Verdict)
    return verdict


def _child_state(pid: int) -> str | None:
    """The state letter of ``pid`` if it is a child of this process (R, S, Z...), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0] if int(fields[1]) == os.getpid() else None


# ---- astronomically large numbers -----------------------------------------------------------------------

TOWERS = [
    r"9^{9^{9^{9}}}",
    "2**2**2**100",
    r"10^{10^{8}}",
    r"2^{2^{40}}",
    r"\left(9^9\right)^{9^9}",
    "x^x^x^x^x^x^x^x^x",
]


@pytest.mark.parametrize("tower", TOWERS)
def test_power_towers_are_refused_at_once(grader, tower):
    start = time.monotonic()
    verdict = grader.grade(rf"\boxed{{{tower}}}", "1")
    assert time.monotonic() - start < 0.5  # the pre-screen, no worker round trip needed
    assert verdict.reason == "unparseable"
    assert verdict.answer == tower


@pytest.mark.parametrize("tower", [r"9^{9^{9^{9}}}", r"10^{10^{8}}", r"(10^{6})!"])
def test_power_towers_without_prescreen_time_out(raw_grader, tower):
    verdict = timed(raw_grader, rf"\boxed{{{tower}}}", "1")
    assert verdict.correct is False
    assert verdict.reason in ("timeout", "unparseable")


def test_towers_as_reference_answer(grader):
    assert timed(grader, r"\boxed{1}", r"9^{9^{9^{9}}}").reason == "bad_reference"


def test_huge_numbers(grader, raw_grader):
    digits = "7" * 20_000
    assert timed(grader, rf"\boxed{{{digits}}}", digits).reason == "answer_too_long"
    # With the length cap lifted, equal text is still exact and cheap; a near miss stays bounded.
    assert timed(raw_grader, rf"\boxed{{{digits}}}", digits).reason == "correct"
    near = timed(raw_grader, rf"\boxed{{{digits[:-1]}8}}", digits)
    assert near.correct is False
    assert timed(grader, r"\boxed{2^{1000000}}", "1").reason == "unparseable"
    assert timed(grader, r"\boxed{100000!}", "1").reason == "unparseable"


# ---- size, nesting, encoding ----------------------------------------------------------------------------


def test_one_megabyte_strings(grader):
    junk = "lorem ipsum {[( " * 65_536  # 1 MiB
    assert timed(grader, junk + r"\boxed{12}", "12").reason == "correct"
    assert timed(grader, junk, "12").reason == "no_boxed"
    assert timed(grader, r"\boxed{" + "1" * 1_000_000 + "}", "1").correct is False
    assert timed(grader, "\\boxed{" * 150_000, "1").reason == "unclosed_boxed"
    assert timed(grader, "\\boxed " * 150_000, "1").reason == "no_boxed"
    assert timed(grader, r"\boxed{1}", "1" * 1_000_000).reason == "bad_reference"


def test_many_boxes(grader):
    # A shotgun of joined boxes is wrong at once (no worker call), whatever box matches the reference; the
    # walk back over the boxes stops after MAX_ANSWER_BOXES + 1 of them.
    response = "".join(rf"\boxed{{{i}}} " for i in range(100_000))
    verdict = timed(grader, response, "99999")
    assert verdict.reason == "wrong_answer"
    assert verdict.answer is not None and verdict.answer.endswith("99998, 99999")
    # Boxes with working between them are not one answer: the last one counts.
    response = "".join(rf"step {i}: \boxed{{{i}}}. " for i in range(100_000))
    assert timed(grader, response, "99999").reason == "correct"
    # The same box again and again is one answer.
    assert timed(grader, r"\boxed{7} " * 100_000, "7").reason == "correct"
    # Long joiner-only gaps, unclosed and empty boxes in the run: still linear, still the last box.
    assert timed(grader, r"\boxed{1}" + " " * 1_000_000 + r"\boxed{2}", "2").reason == "correct"
    assert timed(grader, r"\boxed{" * 100_000 + r"} \boxed{2}", "2").reason == "correct"
    assert timed(grader, r"\boxed{} " * 100_000 + r"\boxed{2}", "2").reason == "correct"


def test_several_boxes_with_hostile_parts(grader, raw_grader):
    # One box of a multi-part answer is a power tower: refused by the pre-screen, or cut off by the timeout.
    assert timed(grader, r"\boxed{1} and \boxed{9^{9^{9^{9}}}}", "1, 2").reason == "unparseable"
    assert timed(raw_grader, r"\boxed{1} and \boxed{9^{9^{9^{9}}}}", "1, 2").reason in (
        "timeout",
        "unparseable",
    )
    assert timed(grader, r"\boxed{1} and \boxed{2}", r"\boxed{1} and \boxed{9^{9^{9^{9}}}}").reason == (
        "bad_reference"
    )
    assert timed(raw_grader, r"\boxed{1} and \boxed{2}", "1, 2").reason == "correct"  # the worker recovered


def test_rounded_reference_with_hostile_answers(grader, raw_grader):
    reference = "0.0833333333333333"
    assert timed(raw_grader, r"\boxed{9^{9^{9^{9}}}}", reference).correct is False
    assert timed(grader, r"\boxed{\sin(10^{10^{4}})}", reference).correct is False
    assert timed(grader, r"\boxed{\frac{1}{0}}", reference).correct is False
    assert timed(grader, r"\boxed{\infty}", reference).correct is False
    assert timed(grader, r"\boxed{\sqrt{-1}}", reference).correct is False
    long_reference = "0." + "3" * 300  # compared exactly in this process (references up to 400 characters)
    assert timed(grader, r"\boxed{\frac{1}{3}}", long_reference).correct is True
    assert timed(grader, r"\boxed{\frac{1}{3}}", long_reference[:-1] + "5").correct is False
    assert timed(grader, r"\boxed{\pi}", "3." + "1" * 300).correct is False
    assert timed(grader, r"\boxed{\frac{1}{3}}", "1." + "0" * 300 + "e-9999").correct is False
    assert timed(raw_grader, r"\boxed{\frac{1}{3}}", "0." + "3" * 5_000).correct is False  # not parsed


@pytest.mark.parametrize(
    "tail",
    [
        " cm" * 100_000,
        r"\text{ cm}" * 50_000,
        r"\,\mathrm{m}/" * 50_000,
        "~" * 500_000 + r"\text{cm}",
        r"\mathrm{e}" * 50_000,
        "°" * 200_000,
        r"\text{" * 100_000,
    ],
)
def test_unit_and_constant_rewrites_are_linear(raw_grader, tail):
    verdict = timed(raw_grader, rf"\boxed{{5{tail}}}", "5")
    assert verdict.reason in ("wrong_answer", "unparseable", "timeout", "unclosed_boxed", "answer_too_long")


@pytest.mark.parametrize("opening", ["{", "(", "[", r"\sqrt{", r"\frac{1}{"])
def test_deep_nesting(grader, raw_grader, opening):
    closing = {"{": "}", "(": ")", "[": "]", r"\sqrt{": "}", r"\frac{1}{": "}"}[opening]
    nested = opening * 10_000 + "1" + closing * 10_000
    # Too long for the default cap (or, past max_chars, its \boxed{ is cut off).
    assert timed(grader, rf"\boxed{{{nested}}}").reason in ("answer_too_long", "no_boxed")
    # Without the pre-screen (two kinds, to save time): parser recursion, a crash or a timeout.
    if opening in ("(", r"\frac{1}{"):
        verdict = timed(raw_grader, rf"\boxed{{{nested}}}")
        assert verdict.correct is False
        assert verdict.reason in ("unparseable", "timeout", "wrong_answer")


def test_nesting_prescreen(grader):
    with Grader(max_answer_chars=50_000) as big:
        assert timed(big, r"\boxed{" + "(" * 5_000 + "1" + ")" * 5_000 + "}").reason == "unparseable"
    assert timed(grader, r"\boxed{((((1))))}").reason == "correct"


@pytest.mark.parametrize(
    ("response", "answer", "reason"),
    [
        ("\\boxed{4\x00}", "4", "correct"),
        ("\x00" * 10_000 + "\\boxed{4}", "4", "correct"),
        ("\\boxed{\x00}", "4", "empty_boxed"),
        ("\\boxed{4}\udfff", "4", "correct"),
        ("\\boxed{\ud800}", "4", "unparseable"),
        ("\\boxed{\udc00\ud800}", "\udc00\ud800", "correct"),
        ("\\boxed{\ud83d\ude00}", "\U0001f600", "correct"),
        ("\\boxed{4}", "\ud800\x00", "bad_reference"),
        ("\\boxed{\U0001f600}", "4", "unparseable"),
        ("}}}}{{{{\\boxed{4}}}}}{{{{", "4", "correct"),
        ("\\boxed{\\}", "4", "unclosed_boxed"),
        ("\\boxed{\\\\}", "4", "unparseable"),
        ("\\boxed{", "4", "unclosed_boxed"),
        ("\\boxed{4} \\boxed{", "4", "unclosed_boxed"),
        ("\\", "4", "no_boxed"),
        ("", "4", "no_boxed"),
        ("\\boxed{" + "}" * 1000, "4", "empty_boxed"),
    ],
)
def test_odd_strings(grader, response, answer, reason):
    assert timed(grader, response, answer).reason == reason


@pytest.mark.parametrize("value", [None, 4, 4.0, b"\\boxed{4}", ["\\boxed{4}"]])
def test_non_string_inputs_do_not_raise(grader, value):
    verdict = grader.grade(value, "4")
    assert isinstance(verdict, Verdict)
    assert grader.grade(r"\boxed{4}", value).reason in (
        "correct",
        "wrong_answer",
        "bad_reference",
        "unparseable",
    )


# ---- model text is never executed -----------------------------------------------------------------------

PAYLOADS = [
    "__import__('os').system('touch {marker}')",
    '__import__("os").system("touch {marker}")',
    "eval(\"__import__('os').system('touch {marker}')\")",
    "exec(\"import os; os.system('touch {marker}')\")",
    "1+__import__('os').system('touch {marker}')",
    "(lambda: __import__('os').system('touch {marker}'))()",
    "().__class__.__base__.__subclasses__()",
    "open('{marker}', 'w').write('x')",
    "\\text{{__import__('os').system('touch {marker}')}}",
    "$__import__('os').system('touch {marker}')$",
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_code_in_answers_is_never_run(grader, raw_grader, tmp_path: Path, payload):
    marker = tmp_path / "pwned_x"
    code = payload.format(marker=marker)
    for g in (grader, raw_grader):
        assert timed(g, rf"\boxed{{{code}}}", "0").correct is False
        timed(g, r"\boxed{0}", code)  # as the reference answer, too
        timed(g, rf"\boxed{{{code}}}", code)
    assert not marker.exists()
    assert not Path("/tmp/pwned_x").exists()


# ---- the timeout backstop -------------------------------------------------------------------------------


def test_hanging_computation_is_cut_off_and_worker_restarts():
    with Grader(timeout_s=1.0) as g:
        g.warm_up()
        old_pid, restarts = g.worker_pid, g.restarts
        start = time.monotonic()
        reply = g._call({"op": "spin"}, 1.0)  # the worker busy-loops forever (test hook, no sleep)
        elapsed = time.monotonic() - start
        assert reply is None
        assert 1.0 <= elapsed < 1.0 + SLACK_S
        assert g.restarts == restarts + 1
        assert _child_state(old_pid) is None  # killed and reaped: no zombie
        assert g.worker_pid not in (None, old_pid)
        assert g.grade(r"\boxed{\sqrt{8}}", r"2\sqrt{2}").reason == "correct"  # the next call works


def test_timeout_verdict_then_recovery(raw_grader):
    verdict = timed(raw_grader, r"\boxed{9^{9^{9^{9}}}}", "1", format_weight=0.1)
    assert verdict.reason == "timeout"
    assert verdict.correct is False
    assert verdict.reward == pytest.approx(0.1)  # the format was fine
    assert verdict.answer == r"9^{9^{9^{9}}}"
    assert timed(raw_grader, r"\boxed{\frac{2}{4}}", "0.5").reason == "correct"
    assert timed(raw_grader, r"\boxed{x^2}", "x \\cdot x").reason == "correct"


def test_shorter_per_call_timeout(raw_grader):
    verdict = timed(raw_grader, r"\boxed{10^{10^{8}}}", "1", timeout_s=0.3)  # bound: 0.3 s + slack
    assert verdict.reason in ("timeout", "unparseable")


def test_worker_crash_is_an_answer():
    with Grader(timeout_s=5.0) as g:
        g.warm_up()
        pid = g.worker_pid
        os.kill(pid, 9)  # dies while idle: the next call notices and replaces it
        # Wait until it is waitable (not reaped: WNOWAIT). /proc showing "Z" is not enough: the thread-group
        # leader turns Z while its other threads (the parent watch) are still exiting, and its pipes are open.
        deadline = time.monotonic() + 10
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            assert time.monotonic() < deadline, "the killed worker never exited"
            time.sleep(0.05)
        assert g.grade(r"\boxed{\sqrt{4}}", "2").reason == "correct"


# ---- worker lifetime ------------------------------------------------------------------------------------


def test_worker_exits_with_its_parent(tmp_path: Path):
    script = textwrap.dedent(
        """
        import os, sys
        from cepo_services.verifier import Grader
        g = Grader()
        g.warm_up()
        print(g.worker_pid, flush=True)
        os._exit(0)  # no atexit, no close: the worker must notice on its own
        """
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60, check=True
    )
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists()


def test_no_worker_processes_left_behind():
    with Grader(timeout_s=0.5) as g:
        g.warm_up()
        pids = [g.worker_pid]
        assert g._call({"op": "spin"}, 0.5) is None
        g.warm_up()
        pids.append(g.worker_pid)
    assert all(_child_state(pid) is None for pid in pids)  # neither the killed nor the closed one remains
