"""The built-in arithmetic task: determinism, correct chains of thought, held-out disjointness, error injection."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from cepo.tasks import arithmetic as A

STEP = re.compile(r"(\d+)([+-])(\d+)=(-?\d+)\.")


def _steps(text: str) -> list[tuple[int, str, int, int]]:
    return [(int(a), op, int(b), int(c)) for a, op, b, c in STEP.findall(text)]


def _boxed(text: str) -> str:
    match = re.search(r"\\boxed\{([^{}]*)\}$", text)
    assert match, text
    return match.group(1)


def _value(operands: list[int], ops: list[str]) -> int:
    """Left-to-right integer arithmetic on the generator's own structure (no eval of text)."""
    value = operands[0]
    for op, x in zip(ops, operands[1:], strict=True):
        value = value + x if op == "+" else value - x
    return value


@pytest.mark.parametrize("split", A.SPLITS)
def test_deterministic_for_a_seed(split):
    first = A.generate(split, 50, seed=7)
    assert first == A.generate(split, 50, seed=7)
    assert [p.problem for p in first] != [p.problem for p in A.generate(split, 50, seed=8)]
    assert len({p.id for p in first}) == 50  # ids unique within a split


@pytest.mark.parametrize("split", A.SPLITS)
def test_solutions_evaluate_correctly(split):
    for problem in A.generate(split, 300, seed=3):
        meta = problem.metadata
        operands, ops = meta["operands"], meta["ops"]
        assert problem.answer == str(_value(operands, ops))
        text = A.solution(problem)
        steps = _steps(text)
        assert len(steps) == len(ops)
        left = operands[0]
        for (a, op, b, c), want_op, want_b in zip(steps, ops, operands[1:], strict=True):
            assert (a, op, b) == (left, want_op, want_b)
            assert c == (a + b if op == "+" else a - b)
            assert c >= 0  # running values stay non-negative
            left = c
        assert _boxed(text) == problem.answer
        assert all(1 <= x <= 9 for x in operands[1:]) and 1 <= operands[0] <= 29
        assert meta["split"] == meta["suite"] == split


def test_suite_shapes_differ_from_training():
    train = A.generate("train", 3000, seed=1)
    assert {len(p.metadata["operands"]) for p in train} == {2, 3, 4}
    firsts = [p.metadata["operands"][0] for p in train]
    assert all(1 <= x <= 19 for x in firsts) and 0.05 < sum(x >= 10 for x in firsts) / len(firsts) < 0.25
    four_term_orders = {"".join(p.metadata["ops"]) for p in train if len(p.metadata["ops"]) == 3}
    assert four_term_orders == {"+++", "++-", "+--", "---"}  # no '-' directly before a '+'
    assert {"".join(p.metadata["ops"]) for p in train if len(p.metadata["ops"]) == 2} == {
        "++",
        "+-",
        "-+",
        "--",
    }
    train_phrasings = {p.metadata["phrasing"] for p in train}
    assert "symbolic" in train_phrasings and len(train_phrasings) == 5

    more = A.generate("more_operands", 200, seed=1)
    assert {len(p.metadata["operands"]) for p in more} == {5}
    larger = A.generate("larger_numbers", 200, seed=1)
    assert all(20 <= p.metadata["operands"][0] <= 29 for p in larger)
    mix = A.generate("unseen_mix", 200, seed=1)
    assert {"".join(p.metadata["ops"]) for p in mix} <= {"-++", "+-+", "-+-", "--+"}
    assert all(len(p.metadata["operands"]) == 4 for p in mix)
    words = A.generate("word_problems", 200, seed=1)
    assert not {p.metadata["phrasing"] for p in words} & train_phrasings
    assert all(not p.problem.startswith("Compute") for p in words)


def test_train_and_every_held_out_split_are_disjoint_by_text():
    train = A.generate("train", 20000, seed=1) + A.generate("train", 5000, seed=2)
    train_texts = {p.problem for p in train}
    assert len(train_texts) > 20000
    assert all(A.in_train_bucket(t) for t in train_texts)
    for split in A.HELD_OUT_SPLITS:
        held = {p.problem for seed in (1, 2, 3) for p in A.generate(split, 1500, seed=seed)}
        assert not held & train_texts, split
        assert not any(A.in_train_bucket(t) for t in held), split
    # the hash rule, not luck: the whole space of 2-term symbolic problems is split, never shared
    two_term_train = {t for t in train_texts if t.startswith("Compute") and t.count("+") + t.count("-") == 1}
    two_term_test = {
        p.problem
        for seed in range(20)
        for p in A.generate("test", 300, seed=seed)
        if len(p.metadata["ops"]) == 1
    }
    assert two_term_test and not two_term_test & two_term_train


def test_hash_buckets_split_the_space():
    texts = [f"Compute {a}+{b}+{c}." for a in range(1, 10) for b in range(1, 10) for c in range(1, 10)]
    share = sum(A.in_train_bucket(t) for t in texts) / len(texts)
    assert 0.7 < share < 0.9


@pytest.mark.parametrize("split", A.SPLITS)
def test_injected_error_changes_the_final_answer(split):
    rng = random.Random(0)
    for problem in A.generate(split, 200, seed=5):
        correct = A.solution(problem)
        wrong = A.inject_error(problem, rng)
        assert _boxed(wrong) != problem.answer
        good_steps, bad_steps = _steps(correct), _steps(wrong)
        assert len(good_steps) == len(bad_steps)
        # exactly one step is arithmetically wrong; the others are right given their (propagated) inputs
        wrong_steps = [s for s in bad_steps if s[3] != (s[0] + s[2] if s[1] == "+" else s[0] - s[2])]
        assert len(wrong_steps) == 1
        # the chain stays consistent: each step starts from the previous (wrong) result
        for prev, nxt in itertools.pairwise(bad_steps):
            assert nxt[0] == prev[3]
        assert int(_boxed(wrong)) == bad_steps[-1][3] >= 0


def test_unknown_split_and_exhausted_space():
    with pytest.raises(ValueError, match="unknown split"):
        A.generate("validation", 1, seed=1)
    with pytest.raises(ValueError):
        A.expression_of(A.generate("train", 1, seed=1)[0].model_copy(update={"metadata": {}}))
