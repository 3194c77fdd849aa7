"""The data cursor: seeded epoch permutations, seamless epoch crossing and exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cepo.data import DataCursor, DataError, dataset_fingerprint
from cepo_proto.messages import Problem


def make_problems(n: int, tag: str = "") -> list[Problem]:
    return [Problem(id=f"p{i}", problem=f"What is {i}+1?{tag}", answer=str(i + 1)) for i in range(n)]


def ids(batch: list[Problem]) -> list[str]:
    return [p.id for p in batch]


def run(cursor: DataCursor, sizes: list[int]) -> list[list[str]]:
    return [ids(cursor.next_batch(n)) for n in sizes]


SIZES = [3, 5, 1, 7, 2, 9, 4, 3, 6, 5, 1, 8]  # 54 problems: more than five epochs of 10, odd batch sizes


def test_each_epoch_is_a_permutation_derived_from_seed_and_epoch() -> None:
    problems = make_problems(10)
    cursor = DataCursor(problems, seed=7)
    taken = ids(cursor.next_batch(30))
    for epoch in range(3):
        chunk = taken[epoch * 10 : (epoch + 1) * 10]
        assert sorted(chunk) == sorted(p.id for p in problems)
        expected = np.random.default_rng([7, epoch]).permutation(10)
        assert chunk == [f"p{i}" for i in expected]
        assert cursor.epoch_order(epoch) == [int(i) for i in expected]
    assert (cursor.epoch, cursor.position, cursor.consumed) == (3, 0, 30)


def test_batches_cross_epoch_boundaries_seamlessly() -> None:
    problems = make_problems(10)
    flat = [pid for batch in run(DataCursor(problems, seed=1), SIZES) for pid in batch]
    one_go = ids(DataCursor(problems, seed=1).next_batch(sum(SIZES)))
    assert flat == one_go
    assert len(flat) == sum(SIZES)


def test_a_batch_larger_than_the_dataset_spans_epochs() -> None:
    cursor = DataCursor(make_problems(3), seed=2)
    batch = ids(cursor.next_batch(8))
    assert len(batch) == 8
    assert sorted(batch[:3]) == sorted(batch[3:6]) == ["p0", "p1", "p2"]
    assert (cursor.epoch, cursor.position) == (2, 2)


def test_same_seed_same_order_different_seed_different_order() -> None:
    problems = make_problems(20)
    assert run(DataCursor(problems, seed=5), SIZES) == run(DataCursor(problems, seed=5), SIZES)
    assert run(DataCursor(problems, seed=5), SIZES) != run(DataCursor(problems, seed=6), SIZES)
    assert run(DataCursor(problems, seed=-5), SIZES) != run(DataCursor(problems, seed=5), SIZES)


@pytest.mark.parametrize("stop", [1, 2, 4, 5, 9])
def test_resume_from_state_equals_an_uninterrupted_run(stop: int) -> None:
    problems = make_problems(10)
    reference = run(DataCursor(problems, seed=11), SIZES)

    first = DataCursor(problems, seed=11)
    before = run(first, SIZES[:stop])
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    assert state == first.state_dict()

    resumed = DataCursor(make_problems(10), seed=999)  # the saved seed wins
    resumed.load_state_dict(state)
    assert resumed.seed == 11
    after = run(resumed, SIZES[stop:])
    assert before + after == reference


def test_state_dict_is_small_and_json_serialisable() -> None:
    cursor = DataCursor(make_problems(10), seed=3)
    cursor.next_batch(13)
    state = cursor.state_dict()
    assert set(state) == {"version", "seed", "epoch", "position", "size", "fingerprint"}
    assert (state["epoch"], state["position"], state["size"], state["seed"]) == (1, 3, 10, 3)
    assert state["fingerprint"] == dataset_fingerprint(make_problems(10))
    assert json.loads(json.dumps(state)) == state
    assert len(json.dumps(state)) < 200


def test_state_of_a_different_dataset_is_refused() -> None:
    state = DataCursor(make_problems(10), seed=3).state_dict()
    for other in (make_problems(11), make_problems(10, tag="!"), list(reversed(make_problems(10)))):
        with pytest.raises(DataError, match="different dataset"):
            DataCursor(other, seed=3).load_state_dict(state)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epoch": -1}, "epoch -1 is negative"),
        ({"position": 10}, r"position 10 is outside 0..9"),
        ({"position": -1}, r"position -1 is outside 0..9"),
        ({"position": 1.5}, "position must be an integer"),
        ({"seed": True}, "seed must be an integer"),
        ({"epoch": "2"}, "epoch must be an integer"),
        ({"version": 2}, "version 2"),
        ({"extra": 1}, "unknown keys extra"),
    ],
)
def test_out_of_range_states_are_refused(change: dict[str, object], message: str) -> None:
    cursor = DataCursor(make_problems(10), seed=3)
    cursor.next_batch(4)
    state = {**cursor.state_dict(), **change}
    with pytest.raises(DataError, match=message):
        cursor.load_state_dict(state)
    assert (cursor.epoch, cursor.position) == (0, 4)  # untouched


def test_incomplete_states_and_bad_arguments() -> None:
    cursor = DataCursor(make_problems(4), seed=0)
    state = cursor.state_dict()
    del state["fingerprint"]
    with pytest.raises(DataError, match="lacks fingerprint"):
        cursor.load_state_dict(state)
    with pytest.raises(DataError, match="must be a dict"):
        cursor.load_state_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch size must be a positive integer"):
        cursor.next_batch(0)
    with pytest.raises(DataError, match="at least one problem"):
        DataCursor([], seed=0)
    with pytest.raises(DataError, match="seed must be an integer"):
        DataCursor(make_problems(2), seed=1.0)  # type: ignore[arg-type]
