"""reasoning-gym adapters: valid records, stable ids, and answers that reasoning-gym scores 1.0."""

from __future__ import annotations

import json

import pytest

from cepo.data import DataError
from cepo.tasks import reasoning_gym as rg
from cepo_proto.messages import Problem

REQUIRED = ("basic_arithmetic", "simple_equations", "gsm_symbolic", "simple_geometry")


def test_required_tasks_are_supported() -> None:
    assert set(REQUIRED) <= set(rg.SUPPORTED_TASKS)


@pytest.mark.parametrize("task", rg.SUPPORTED_TASKS)
def test_every_adapter_produces_valid_records_that_score_their_own_answer(task: str) -> None:
    problems = rg.generate(task, 8, seed=4)
    assert len(problems) == 8
    assert [p.id for p in problems] == [f"rg:{task}:4:{i}" for i in range(8)]
    for index, problem in enumerate(problems):
        assert isinstance(problem, Problem)
        assert problem.problem.strip() and problem.answer.strip()
        assert problem.images == []
        meta = problem.metadata
        assert (meta["source"], meta["task"], meta["size"], meta["seed"], meta["index"]) == (
            "reasoning_gym",
            task,
            8,
            4,
            index,
        )
        assert json.loads(json.dumps(problem.model_dump())) == problem.model_dump()  # JSON-safe throughout
        assert Problem.model_validate_json(problem.model_dump_json()) == problem
        assert rg.score_answer(problem, problem.answer) == 1.0
        assert rg.score_answer(problem, None) < 1.0  # some scorers give 0.01 for any non-answer


def test_entry_metadata_is_kept_and_the_original_entry_regenerates() -> None:
    import reasoning_gym

    problems = rg.generate("basic_arithmetic", 3, seed=2)
    dataset = reasoning_gym.create_dataset("basic_arithmetic", size=3, seed=2)
    for index, problem in enumerate(problems):
        entry = dataset[index]
        assert problem.metadata["entry_metadata"] == json.loads(json.dumps(entry["metadata"]))
        assert problem.metadata["entry_metadata_exact"] is True
        assert rg.source_entry(problem) == entry


def test_non_json_entry_metadata_is_stringified_and_flagged() -> None:
    # gsm_symbolic puts Fraction values in some entries' metadata (seed 7: entries 35 and 41).
    problems = rg.generate("gsm_symbolic", 42, seed=7)
    lossy = [p for p in problems if not p.metadata["entry_metadata_exact"]]
    assert lossy, "expected at least one entry with non-JSON metadata"
    for problem in lossy:
        json.dumps(problem.metadata)
        assert rg.score_answer(problem, problem.answer) == 1.0


def test_generation_is_deterministic_and_seeded() -> None:
    assert rg.generate("simple_equations", 5, seed=1) == rg.generate("simple_equations", 5, seed=1)
    first = [p.problem for p in rg.generate("simple_equations", 5, seed=1)]
    second = [p.problem for p in rg.generate("simple_equations", 5, seed=2)]
    assert first != second


def test_wrong_answers_score_below_one() -> None:
    (problem,) = rg.generate("basic_arithmetic", 1, seed=5)
    wrong = str(int(float(problem.answer)) + 1)
    assert rg.score_answer(problem, wrong) < 1.0


def test_mixture_splits_the_size_over_tasks() -> None:
    problems = rg.generate_mixture(["simple_geometry", "basic_arithmetic", "gsm_symbolic"], 8, seed=0)
    tasks = [p.metadata["task"] for p in problems]
    assert tasks == ["simple_geometry"] * 3 + ["basic_arithmetic"] * 3 + ["gsm_symbolic"] * 2
    assert len({p.id for p in problems}) == 8


def test_unknown_tasks_and_bad_arguments() -> None:
    with pytest.raises(
        DataError, match=r"unknown reasoning_gym task 'sudoku'; supported tasks: basic_arithmetic"
    ):
        rg.generate("sudoku", 3, seed=0)
    with pytest.raises(DataError, match="n must be a positive integer"):
        rg.generate("basic_arithmetic", 0, seed=0)
    with pytest.raises(DataError, match="unknown reasoning_gym task 'nope'"):
        rg.generate_mixture(["basic_arithmetic", "nope"], 4, seed=0)
    with pytest.raises(DataError, match="repeat a name"):
        rg.generate_mixture(["gcd", "gcd"], 4, seed=0)
    with pytest.raises(DataError, match="cannot split 1 problems over 2"):
        rg.generate_mixture(["gcd", "lcm"], 1, seed=0)
    with pytest.raises(DataError, match="does not come from reasoning_gym"):
        rg.score_answer(Problem(id="x", problem="p", answer="a"), "a")
    (problem,) = rg.generate("gcd", 1, seed=0)
    tampered = problem.model_copy(update={"problem": "something else"})
    with pytest.raises(DataError, match="no longer matches"):
        rg.score_answer(tampered, problem.answer)
