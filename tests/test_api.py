"""The Python API (``cepo.load_config`` / ``cepo.train`` / ``cepo.evaluate``, step callbacks) and the user-code
hooks: ``verifier.reward_fn`` run in the verifier's killable worker process, ``data.source: python`` with
``data.loader``. One end-to-end run trains two steps through the real pipeline with both hooks."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import cepo
from cepo.config import ConfigError, load_config
from cepo_proto import Problem

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
SLACK_S = 2.0  # on top of timeout_s for a call on a warm worker (as in test_verifier_hostile)

REWARDS = """
import math
import os
import time


def quarter(response, reference):
    return 0.25


def exact(response, reference):
    return reference in response


def numpy_half(response, reference):
    import numpy

    return numpy.float32(0.5)


def numpy_true(response, reference):
    import numpy

    return numpy.bool_(True)


def tail(response, reference):
    return 1.0 if response == "\\\\boxed{7}" and reference == "7" else 0.0


def slow(response, reference):
    time.sleep(120)
    return 1.0


def raises(response, reference):
    raise ValueError("no reward today")


def exits(response, reference):
    raise SystemExit(3)


def dies(response, reference):
    os._exit(1)


def gives_nan(response, reference):
    return math.nan


def gives_inf(response, reference):
    return math.inf


def gives_big(response, reference):
    return 1.5


def gives_negative(response, reference):
    return -0.1


def gives_text(response, reference):
    return "1.0"


def gives_none(response, reference):
    return None


def gives_list(response, reference):
    return [1.0]


class Scorer:
    @staticmethod
    def score(response, reference):
        return 1.0


NOT_CALLABLE = 3
"""

LOADERS = """
from cepo_proto import Problem


def rows(split, size):
    return [{"problem": f"Compute {i}+1.", "answer": i + 1} for i in range(size)]


def records(split, size):
    return [Problem(id=f"{split}-{i}", problem=f"Compute {i}+2.", answer=str(i + 2)) for i in range(size)]


def bad_row(split, size):
    return [{"problem": "Compute 1+1.", "answer": "2"}, {"problem": "Compute 2+2."}]


def not_a_list(split, size):
    return 5


def not_a_row(split, size):
    return [{"problem": "Compute 1+1.", "answer": "2"}, "Compute 2+2."]


def raises(split, size):
    raise RuntimeError("the database is down")
"""


@pytest.fixture(scope="module")
def hooks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder outside the repository with the modules ``cepo_test_rewards`` and ``cepo_test_loaders``."""
    folder = tmp_path_factory.mktemp("hooks")
    (folder / "cepo_test_rewards.py").write_text(REWARDS)
    (folder / "cepo_test_loaders.py").write_text(LOADERS)
    return folder


@pytest.fixture
def on_path(hooks_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(hooks_dir))
    return hooks_dir


def _grader(hooks_dir: Path, name: str, **options):
    from cepo_services.verifier import Grader

    options.setdefault("timeout_s", 5.0)
    return Grader(reward_fn=f"cepo_test_rewards:{name}", reward_path=[str(hooks_dir)], **options)


# ---- the reward hook in the verifier's worker ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "response", "reward", "correct", "reason", "answer"),
    [
        ("quarter", r"so \boxed{4}", 0.25, False, "wrong_answer", "4"),
        ("exact", r"so \boxed{4}", 1.0, True, "correct", "4"),  # True → 1.0
        ("exact", r"so \boxed{5}", 0.0, False, "wrong_answer", "5"),  # False → 0.0
        ("numpy_half", r"so \boxed{4}", 0.5, True, "correct", "4"),  # 0.5 is correct
        ("numpy_true", "no box at all", 1.0, True, "correct", None),  # the function decides, not the box
    ],
)
def test_reward_function_gives_the_reward(hooks_dir, name, response, reward, correct, reason, answer):
    """reward = what the function returned, correct = reward ≥ 0.5; ``answer`` is still the final box (CEPO's
    r⁻ is taken from it)."""
    with _grader(hooks_dir, name) as grader:
        verdict = grader.grade(response, "4")
    assert (verdict.reward, verdict.correct, verdict.reason, verdict.answer) == (
        reward,
        correct,
        reason,
        answer,
    )


def test_reward_function_sees_the_truncated_response_and_the_reference(hooks_dir):
    with _grader(hooks_dir, "tail", max_chars=9) as grader:  # the last 9 characters: \boxed{7}
        assert grader.grade("x" * 500 + r"\boxed{7}", "7").reward == 1.0
        assert grader.grade("x" * 500 + r"\boxed{7}", "8").reward == 0.0


def test_reward_default_import_path_is_the_callers_sys_path(on_path):
    from cepo_services.verifier import Grader

    with Grader(reward_fn="cepo_test_rewards:quarter") as grader:
        assert grader.grade("anything", "1").reward == 0.25
    with Grader(reward_fn="cepo_test_rewards:Scorer.score") as grader:  # a dotted attribute path
        assert grader.grade("anything", "1").reward == 1.0


def test_a_slow_reward_times_out_and_its_worker_is_replaced(hooks_dir):
    with _grader(hooks_dir, "slow", timeout_s=1.0) as grader:
        grader.warm_up()
        old = grader.worker_pid
        start = time.monotonic()
        verdict = grader.grade(r"\boxed{4}", "4")
        elapsed = time.monotonic() - start
        assert (verdict.reason, verdict.reward, verdict.correct, verdict.answer) == (
            "timeout",
            0.0,
            False,
            "4",
        )
        assert 1.0 <= elapsed < 1.0 + SLACK_S
        assert grader.restarts == 1 and grader.worker_pid not in (None, old)
        assert "took longer than 1 s" in grader.reward_problems[-1]


@pytest.mark.parametrize(
    ("name", "detail"),
    [
        ("raises", "raised ValueError: no reward today"),
        ("exits", "raised SystemExit: 3"),  # sys.exit in the user's code does not end the worker
        ("dies", "its worker process died"),  # os._exit: the worker is gone, and replaced
    ],
)
def test_a_failing_reward_is_a_reward_error_verdict(hooks_dir, name, detail):
    with _grader(hooks_dir, name) as grader:
        for _ in range(2):  # and again: the worker (or its replacement) still answers
            verdict = grader.grade(r"\boxed{4}", "4")
            assert (verdict.reason, verdict.reward, verdict.correct) == ("reward_error", 0.0, False)
        assert detail in grader.reward_problems[-1]
        assert f"cepo_test_rewards:{name}" in grader.reward_problems[-1]


@pytest.mark.parametrize(
    ("name", "detail"),
    [
        ("gives_nan", "returned nan (not a finite number)"),
        ("gives_inf", "returned inf (not a finite number)"),
        ("gives_big", "returned 1.5, outside [0, 1]"),
        ("gives_negative", "returned -0.1, outside [0, 1]"),
        ("gives_text", "returned '1.0' (str), not a float in [0, 1] or a bool"),
        ("gives_none", "returned None (NoneType)"),
        ("gives_list", "returned a list, not a float in [0, 1] or a bool"),
    ],
)
def test_a_bad_return_value_is_a_bad_reward_verdict(hooks_dir, name, detail):
    with _grader(hooks_dir, name) as grader:
        verdict = grader.grade(r"\boxed{4}", "4")
        assert (verdict.reason, verdict.reward, verdict.correct, verdict.answer) == (
            "bad_reward",
            0.0,
            False,
            "4",
        )
        assert detail in grader.reward_problems[-1]


def test_a_reward_the_worker_cannot_import_is_a_clear_error(hooks_dir):
    from cepo_proto.pipeline import GradeRequest
    from cepo_services.verifier import Grader, RewardLoadError
    from cepo_services.verifier.replica import VerifierReplica

    with (
        _grader(hooks_dir, "NOT_CALLABLE") as grader,
        pytest.raises(RewardLoadError, match=r"'cepo_test_rewards:NOT_CALLABLE'.*not callable"),
    ):
        grader.grade(r"\boxed{4}", "4")
    with (
        Grader(reward_fn="cepo_test_rewards:quarter", reward_path=[]) as grader,  # not on the worker's path
        pytest.raises(RewardLoadError, match=r"cannot import module 'cepo_test_rewards'"),
    ):
        grader.warm_up()
    # the replica starts (a dead actor would hide the reason) and its grade call raises it
    replica = VerifierReplica(
        "verifier-0", reward_fn="cepo_test_rewards:missing", reward_path=[str(hooks_dir)]
    )
    try:
        with pytest.raises(RewardLoadError, match=r"has no attribute 'missing'"):
            replica.grade(GradeRequest(responses=["x"], answers=["1"]))
    finally:
        replica.shutdown()
    with pytest.raises(ValueError, match="reward_fn must be an importable 'module:function' path"):
        Grader(reward_fn="cepo_test_rewards.quarter")
    with pytest.raises(ValueError, match="format_weight must be 0 with reward_fn"):
        Grader(reward_fn="cepo_test_rewards:quarter", format_weight=0.1)


# ---- configuration --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["verifier.reward_fn=cepo_test_rewards:missing"], "verifier.reward_fn: 'cepo_test_rewards' has no attribute"),
        (["verifier.reward_fn=cepo_test_rewards:NOT_CALLABLE"], "verifier.reward_fn: 'cepo_test_rewards:NOT_CALLABLE' is not callable"),
        (["verifier.reward_fn=no_such_module_xyz:f"], "verifier.reward_fn: cannot import module 'no_such_module_xyz'"),
        (["verifier.reward_fn=cepo_test_rewards"], "verifier.reward_fn: expected an importable 'module:function' path"),
        (["verifier.reward_fn=cepo_test_rewards:quarter", "verifier.format_weight=0.1"], "verifier.format_weight must be 0"),
        (["data.source=python"], "data.source 'python' needs data.loader"),
        (["data.loader=cepo_test_loaders:rows"], "data.loader is used with data.source 'python' only"),
        (["data.source=python", "data.loader=cepo_test_loaders:nope"], "data.loader: 'cepo_test_loaders' has no attribute 'nope'"),
        (["data.source=python", "data.loader=cepo_test_loaders:rows", "data.eval_suites=[train]"], "is the training split"),
    ],
)  # fmt: skip
def test_config_validation_names_the_field(on_path, overrides, message):
    with pytest.raises(ConfigError, match="invalid configuration") as info:
        load_config(TINY, overrides)
    assert message in str(info.value)


def test_config_validate_command_checks_the_hook(on_path, tiny_model_dir):  # tiny.yaml's model.path exists
    from typer.testing import CliRunner

    from cepo.cli import app

    runner = CliRunner()
    args = ["config", "validate", "-c", str(TINY), "--set"]
    bad = runner.invoke(app, [*args, "verifier.reward_fn=cepo_test_rewards:missing"])
    assert (
        bad.exit_code == 2
        and "verifier.reward_fn: 'cepo_test_rewards' has no attribute 'missing'" in bad.output
    )
    good = runner.invoke(app, [*args, "verifier.reward_fn=cepo_test_rewards:quarter"])
    assert good.exit_code == 0, good.output


def test_a_module_in_the_current_directory_is_found(hooks_dir, monkeypatch):
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(hooks_dir))])
    monkeypatch.delitem(sys.modules, "cepo_test_rewards", raising=False)
    monkeypatch.chdir(hooks_dir)
    cfg = load_config(TINY, ["verifier.reward_fn=cepo_test_rewards:quarter"])
    assert cfg.verifier.reward_fn == "cepo_test_rewards:quarter"
    from cepo.hooks import import_path

    assert str(hooks_dir) in import_path()  # so the verifier's worker finds it too


def test_functions_become_their_import_path_and_unimportable_ones_are_refused(on_path):
    import cepo_test_rewards

    cfg = cepo.load_config(TINY, verifier__reward_fn=cepo_test_rewards.quarter, learner__lr=1e-5)
    assert cfg.verifier.reward_fn == "cepo_test_rewards:quarter" and cfg.learner.lr == 1e-5
    cfg = cepo.load_config(
        TINY, ["rollout.group_size=4"], **{"verifier.reward_fn": cepo_test_rewards.Scorer.score}
    )
    assert cfg.verifier.reward_fn == "cepo_test_rewards:Scorer.score" and cfg.rollout.group_size == 4

    def nested(response, reference):
        return 1.0

    in_main = functools.wraps(nested)(lambda response, reference: 1.0)
    in_main.__module__, in_main.__qualname__ = "__main__", "scored"
    refused = [
        (lambda response, reference: 1.0, "a lambda cannot be imported by other processes"),
        (nested, "is defined inside a function"),
        (in_main, "is defined in __main__ (your script or notebook)"),
        (functools.partial(cepo_test_rewards.quarter), "has no importable name"),
    ]
    for function, message in refused:
        with pytest.raises(ConfigError, match=r"verifier\.reward_fn: ") as info:
            cepo.load_config(TINY, verifier__reward_fn=function)
        assert message in str(info.value)
        with pytest.raises(ConfigError, match=re.escape(message)):
            cepo.train(TINY, reward_fn=function)  # refused before anything starts


# ---- data.source: python ---------------------------------------------------------------------------------


def test_python_data_source(on_path):
    from cepo.data.loaders import from_config, load_heldout
    from cepo.errors import DataError

    def data(loader: str, *more: str):
        return load_config(
            TINY, ["data.source=python", f"data.loader=cepo_test_loaders:{loader}", *more]
        ).data

    cfg = data("rows", "data.size=5", "data.eval_suites=[test]", "data.eval_size=3")
    problems = from_config(cfg).problems
    assert [(p.id, p.answer) for p in problems] == [(f"train:{i + 1}", str(i + 1)) for i in range(5)]
    assert problems[0].metadata["split"] == "train" and problems[0].metadata["source"] == "python"
    held_out, origin = load_heldout(cfg, "test")
    assert [p.id for p in held_out.problems] == ["test:1", "test:2", "test:3"] and "test" in origin

    records = from_config(data("records", "data.size=2")).problems
    assert records == [
        Problem(id=f"train-{i}", problem=f"Compute {i}+2.", answer=str(i + 2)) for i in range(2)
    ]

    failing = [
        ("bad_row", "data.loader cepo_test_loaders:bad_row (split 'train'): row 2, field 'answer': missing"),
        ("not_a_list", "returned int, not a list of cepo_proto.Problem or of dicts"),
        ("not_a_row", "row 2: a str, not a cepo_proto.Problem or a dict"),
        ("raises", "raised RuntimeError: the database is down"),
    ]
    for loader, message in failing:
        with pytest.raises(DataError) as info:
            from_config(data(loader))
        assert message in str(info.value)
    skipped = from_config(data("bad_row", "data.on_bad_row=skip"))
    assert len(skipped.problems) == 1 and skipped.skipped[0].row == 2


# ---- the API surface -------------------------------------------------------------------------------------


def test_import_cepo_is_fast_and_imports_nothing_heavy():
    code = (
        "import sys, time\nstart = time.perf_counter()\nimport cepo\nseconds = time.perf_counter() - start\n"
        "print(seconds, 'torch' in sys.modules, 'cepo.config' in sys.modules, 'ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    seconds, *heavy = out.stdout.split()
    assert heavy == ["False", "False", "False"]
    assert float(seconds) < 0.5  # about 0.01 s on an idle machine


def test_cepo_evaluate_is_the_function_and_still_the_module(monkeypatch):
    """``cepo/evaluate.py`` is also ``cepo.evaluate``: the module, made callable, whichever comes first — the
    import system binding the submodule, or an attribute lookup."""
    import importlib

    from cepo import StopTraining, evaluate, load_config, train

    assert cepo.evaluate is evaluate and callable(evaluate) and callable(evaluate.heldout_suites)
    monkeypatch.delitem(sys.modules, "cepo.evaluate")
    monkeypatch.delattr(cepo, "evaluate")
    module = importlib.import_module("cepo.evaluate")  # a fresh import binds the submodule on the package
    assert cepo.evaluate is module and callable(module)
    assert issubclass(StopTraining, Exception) and callable(train) and callable(load_config)
    with pytest.raises(ValueError, match="no suites to evaluate"):
        cepo.evaluate(TINY, suites=[])  # the call reaches cepo.evaluate.evaluate_model


def test_step_callbacks_stop_the_run(monkeypatch):
    """``callbacks``: each sees every step; False or StopTraining ends the run after that step (cepo.run.train
    gets ``on_step`` returning False), any other exception propagates. The real run: the end-to-end test."""
    from cepo_proto.pipeline import StepReport

    def fake_run(cfg, run_dir, *, steps, on_step, **_):
        done = 0
        for step in range(steps):
            done += 1
            report = StepReport.model_construct(step=step, reward_mean=0.5)
            if on_step(report) is False:
                break
        return {"steps": done}

    monkeypatch.setattr("cepo.run.train", fake_run)
    cfg = load_config(TINY)
    seen: list[int] = []

    def stop_at(step: int, how: str):
        def callback(report):
            if report.step == step:
                if how == "raise":
                    raise cepo.StopTraining
                return False
            return None

        return callback

    assert cepo.train(cfg, "unused", steps=5, callbacks=[lambda r: seen.append(r.step)])["steps"] == 5
    seen.clear()
    assert cepo.train(
        cfg, "unused", steps=5, callbacks=[stop_at(1, "raise"), lambda r: seen.append(r.step)]
    ) == {"steps": 2}
    assert seen == [0, 1]  # the callback after the stopping one still saw the last step
    assert cepo.train(cfg, "unused", steps=5, callbacks=[stop_at(2, "return")])["steps"] == 3

    def broken(report):
        raise RuntimeError("my callback is broken")

    with pytest.raises(RuntimeError, match="my callback is broken"):
        cepo.train(cfg, "unused", steps=5, callbacks=[broken])
    with pytest.raises(TypeError, match="is not callable"):
        cepo.train(cfg, "unused", callbacks=[3])


# ---- end to end -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_with_a_custom_reward_and_data_loader(tiny_model_dir, tmp_path, monkeypatch):
    """``cepo.train`` with a reward function and a data loader from a module outside the repository (on this
    process's sys.path only, not on PYTHONPATH): every verdict comes from the function, run in the verifier's
    worker process; the callback sees each step and stops the run after the second, which is checkpointed."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert str(tmp_path) not in os.environ.get("PYTHONPATH", "")
    calls = tmp_path / "calls.txt"
    (tmp_path / "cepo_e2e_hooks.py").write_text(
        textwrap.dedent(
            f"""
            import os

            from cepo.tasks import arithmetic

            CALLS = {str(calls)!r}


            def reward(response, reference):
                with open(CALLS, "a") as fh:
                    fh.write(f"{{os.getpid()}} {{reference}}\\n")
                return 0.25


            def problems(split, size):
                return arithmetic.generate(split, size, 7)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import cepo_e2e_hooks

    cfg = cepo.load_config(
        TINY,
        model__path=str(tiny_model_dir),
        algorithm__method="grpo",  # no teacher replicas: the test is about the hooks
        rollout__replicas=1,
        rollout__prompts_per_step=4,
        rollout__group_size=2,
        learner__ranks=1,
        verifier__replicas=1,
        data__source="python",
        data__loader=cepo_e2e_hooks.problems,
        data__size=64,
        data__eval_suites=[],
    )
    reports = []

    def stop_after_two(report):
        if report.step == 1:
            raise cepo.StopTraining

    run_dir = tmp_path / "run"
    summary = cepo.train(
        cfg,
        run_dir,
        steps=5,
        callbacks=[reports.append, stop_after_two],
        reward_fn=cepo_e2e_hooks.reward,
        quiet=True,
    )

    assert [r.step for r in reports] == [0, 1]
    assert [(r.reward_mean, r.accuracy) for r in reports] == [(0.25, 0.0), (0.25, 0.0)]
    assert summary["steps"] == 2 and summary["run_dir"] == str(run_dir)
    assert (run_dir / "checkpoints" / "step_00002").is_dir()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["reward_mean"] for line in lines] == [0.25, 0.25]
    recorded = (run_dir / "config.yaml").read_text()
    assert "reward_fn: cepo_e2e_hooks:reward" in recorded and "loader: cepo_e2e_hooks:problems" in recorded

    graded = [line.split(" ", 1) for line in calls.read_text().splitlines()]
    assert len(graded) == 2 * 4 * 2  # steps × prompts × samples, each graded once by the function
    assert {int(pid) for pid, _ in graded}.isdisjoint({os.getpid()})  # in the verifier's worker, not here
    answers = {p.answer for p in cepo_e2e_hooks.problems("train", 64)}
    assert {reference for _, reference in graded} <= answers
