"""reasoning-gym task generators as problem records.

``generate("gsm_symbolic", n, seed)`` draws ``n`` entries from ``reasoning_gym.create_dataset(task, size=n,
seed=seed)`` and turns entry ``i`` into a :class:`cepo_proto.Problem` with the stable id ``rg:<task>:<seed>:<i>``.
Everything needed to call reasoning-gym's own ``score_answer`` again later is kept in ``metadata``: the task
name, the dataset size, seed and index (enough to regenerate the exact entry, see :func:`source_entry`) and a
JSON-safe copy of the entry's own metadata.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

from cepo.errors import DataError
from cepo_proto.messages import Problem

__all__ = ["SUPPORTED_TASKS", "generate", "generate_mixture", "score_answer", "source_entry"]

SOURCE = "reasoning_gym"
ID_PREFIX = "rg"

# Tasks with one short, checkable final answer (a number, an expression, a coordinate pair), each checked to
# score its own answer 1.0 with reasoning-gym's scorer (tests/test_tasks_reasoning_gym.py).
SUPPORTED_TASKS: tuple[str, ...] = (
    "basic_arithmetic",
    "simple_equations",
    "gsm_symbolic",
    "simple_geometry",
    "advanced_geometry",
    "chain_sum",
    "products",
    "decimal_arithmetic",
    "fraction_simplification",
    "gcd",
    "lcm",
    "leg_counting",
    "complex_arithmetic",
)


def _check_task(task: str) -> None:
    if task not in SUPPORTED_TASKS:
        raise DataError(f"unknown reasoning_gym task {task!r}; supported tasks: {', '.join(SUPPORTED_TASKS)}")


@functools.lru_cache(maxsize=64)
def _dataset(task: str, size: int, seed: int) -> Any:
    import reasoning_gym

    return reasoning_gym.create_dataset(task, size=size, seed=seed)


def _json_safe(value: Any) -> tuple[Any, bool]:
    """A JSON round-tripped copy of ``value`` and whether it is exact (non-JSON values become strings)."""
    try:
        return json.loads(json.dumps(value)), True
    except (TypeError, ValueError):
        return json.loads(json.dumps(value, default=str)), False


def generate(task: str, n: int, seed: int) -> list[Problem]:
    """``n`` problems of reasoning-gym task ``task`` drawn with ``seed`` (ids ``rg:<task>:<seed>:<index>``)."""
    _check_task(task)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f"reasoning_gym task {task!r}: n must be a positive integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"reasoning_gym task {task!r}: seed must be an integer, got {seed!r}")
    dataset = _dataset(task, n, seed)
    problems: list[Problem] = []
    for index in range(n):
        entry = dataset[index]
        question, answer = entry.get("question"), entry.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise DataError(
                f"reasoning_gym task {task!r} (seed {seed}) entry {index}: empty or missing question"
            )
        if answer is None or not str(answer).strip():
            raise DataError(
                f"reasoning_gym task {task!r} (seed {seed}) entry {index}: empty or missing answer"
            )
        entry_metadata, exact = _json_safe(entry.get("metadata") or {})
        problems.append(
            Problem(
                id=f"{ID_PREFIX}:{task}:{seed}:{index}",
                problem=question,
                answer=str(answer),
                metadata={
                    "source": SOURCE,
                    "task": task,
                    "size": n,
                    "seed": seed,
                    "index": index,
                    "entry_metadata": entry_metadata,
                    "entry_metadata_exact": exact,
                },
            )
        )
    return problems


def generate_mixture(tasks: Sequence[str], n: int, seed: int) -> list[Problem]:
    """``n`` problems split as evenly as possible over ``tasks`` (earlier tasks get the remainder)."""
    if not tasks:
        raise DataError(f"no reasoning_gym tasks given; supported tasks: {', '.join(SUPPORTED_TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise DataError(f"reasoning_gym tasks repeat a name: {list(tasks)}")
    for task in tasks:
        _check_task(task)
    if isinstance(n, bool) or not isinstance(n, int) or n < len(tasks):
        raise DataError(
            f"cannot split {n!r} problems over {len(tasks)} reasoning_gym tasks (need n ≥ {len(tasks)})"
        )
    base, extra = divmod(n, len(tasks))
    problems: list[Problem] = []
    for position, task in enumerate(tasks):
        problems.extend(generate(task, base + (1 if position < extra else 0), seed))
    return problems


def _origin(problem: Problem) -> tuple[str, int, int, int]:
    meta = problem.metadata
    if meta.get("source") != SOURCE:
        raise DataError(
            f"problem {problem.id!r} does not come from reasoning_gym (metadata source {meta.get('source')!r})"
        )
    try:
        task, size, seed, index = meta["task"], meta["size"], meta["seed"], meta["index"]
    except KeyError as exc:
        raise DataError(f"problem {problem.id!r}: reasoning_gym metadata lacks {exc.args[0]!r}") from None
    _check_task(task)
    if (
        not all(isinstance(v, int) and not isinstance(v, bool) for v in (size, seed, index))
        or not 0 <= index < size
    ):
        raise DataError(
            f"problem {problem.id!r}: bad reasoning_gym size/seed/index {size!r}/{seed!r}/{index!r}"
        )
    return task, size, seed, index


@functools.lru_cache(maxsize=4096)
def _entry(task: str, size: int, seed: int, index: int) -> dict[str, Any]:
    return _dataset(task, size, seed)[index]


def source_entry(problem: Problem) -> dict[str, Any]:
    """The original reasoning-gym entry of a record from :func:`generate`, regenerated exactly."""
    entry = _entry(*_origin(problem))
    if entry["question"] != problem.problem or str(entry["answer"]) != problem.answer:
        raise DataError(
            f"problem {problem.id!r} no longer matches reasoning-gym's entry (a different reasoning-gym version?)"
        )
    return entry


def score_answer(problem: Problem, answer: str | None) -> float:
    """reasoning-gym's own score of ``answer`` (the extracted final answer, or None) for ``problem``."""
    entry = source_entry(problem)
    return float(_dataset(*_origin(problem)[:3]).score_answer(answer, entry))
