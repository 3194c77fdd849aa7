"""Built-in multi-step arithmetic: short chains of thought ending in ``\\boxed{}``.

``Compute 4+1+1+8.`` → ``4+1=5. 5+1=6. 6+8=14. \\boxed{14}``. Expressions are evaluated left to right
with ``+`` and ``-`` only (so left-to-right order equals the usual precedence), every running value stays
non-negative, and operands are 1–9 in training: a tiny model learns single-digit steps but never two-digit
operands (REFERENCE.md, "What a tiny model can learn").

Splits and suites (``generate(split, n, seed)``):

- ``train``: 2–4 terms, operands 1–9 (10 % of problems start with a two-digit operand 10–19); any operator
  order for 2–3 terms, but 4-term orders are "sorted" (no ``-`` directly before a ``+``); 75 % written as
  ``Compute …``, 25 % as word problems in four training phrasings.
- ``test``: the same shape as ``train``, held out.
- ``more_operands``: 5 terms — one more than training ever shows (length generalisation; a tiny model
  mostly drops an operand, so expect a few per cent).
- ``larger_numbers``: a first operand 20–29 (training's two-digit first operands are 10–19), the rest as in
  training: copying a number of an unseen range, running values up to 56 (training reaches 46).
- ``unseen_mix``: 4 terms whose operator order never occurs in training (``-+`` inside a 4-term chain, e.g.
  ``a+b-c+d``). Each step and each adjacent pair of operators is familiar from 3-term problems; only the
  whole order is new (compositional generalisation).
- ``word_problems``: 2–4 terms in two story phrasings never used in training: new openings, nouns and
  questions around the training phrasings' verbs.

Held-out problems are disjoint from training *by text*: a problem belongs to training only if
``sha256(text) mod 10`` lands in :data:`TRAIN_BUCKETS`, and every held-out split only takes texts in the other
buckets. Drawing splits by seed alone overlaps training by ~80 % on this small problem space.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cepo_proto import Problem

__all__ = [
    "HELD_OUT_SPLITS",
    "SPLITS",
    "SUITES",
    "TASK_VERSION",
    "Expression",
    "bucket",
    "expression_of",
    "generate",
    "in_train_bucket",
    "inject_error",
    "solution",
]

TASK_VERSION = "arithmetic-v1"  # bump when generated texts or solutions change (model caches key on it)
SUITES: tuple[str, ...] = ("more_operands", "larger_numbers", "unseen_mix", "word_problems")
HELD_OUT_SPLITS: tuple[str, ...] = ("test", *SUITES)
SPLITS: tuple[str, ...] = ("train", *HELD_OUT_SPLITS)
TRAIN_BUCKETS = frozenset(range(8))  # sha256(text) mod 10 in 0..7 → may be used for training; 8, 9 → held out
SUITE_DESCRIPTIONS: dict[str, str] = {
    "train": "2–4 terms, operands 1–9 (10 % open with 10–19), 4-term orders without -+, 25 % word problems",
    "test": "same shape as train, held out by text hash",
    "more_operands": "5 terms: one more than training ever shows (length generalisation)",
    "larger_numbers": "first operand 20–29 (training: 1–19), running values up to 56 (training: 46)",
    "unseen_mix": "4 terms with -+ in the operator order (absent from 4-term training problems)",
    "word_problems": "2–4 terms in story phrasings never used in training (new openings, nouns, questions)",
}


@dataclass(frozen=True)
class Expression:
    """A left-to-right chain ``operands[0] ops[0] operands[1] ops[1] …``."""

    operands: tuple[int, ...]
    ops: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.operands) != len(self.ops) + 1 or len(self.operands) < 2:
            raise ValueError(f"need n ≥ 2 operands and n-1 operators, got {self.operands} {self.ops}")
        if any(op not in "+-" for op in self.ops):
            raise ValueError(f"operators must be + or -, got {self.ops}")

    def running(self) -> list[int]:
        """The value after each step (Python integer arithmetic)."""
        value, values = self.operands[0], []
        for op, operand in zip(self.ops, self.operands[1:], strict=True):
            value = value + operand if op == "+" else value - operand
            values.append(value)
        return values

    @property
    def value(self) -> int:
        return self.running()[-1]

    def symbolic(self) -> str:
        return str(self.operands[0]) + "".join(
            f"{op}{x}" for op, x in zip(self.ops, self.operands[1:], strict=True)
        )


# ---------------------------------------------------------------------------------------------------------
# Chains of thought


def _chain(expr: Expression, error_at: int | None = None, delta: int = 0) -> str:
    """``a+b=c. c+d=e. \\boxed{e}``; with ``error_at``, that step's result is off by ``delta`` and the
    mistake is carried into every later step (so the final answer is off by ``delta`` too)."""
    left, parts = expr.operands[0], []
    for step, (op, operand) in enumerate(zip(expr.ops, expr.operands[1:], strict=True)):
        result = left + operand if op == "+" else left - operand
        if step == error_at:
            result += delta
        parts.append(f"{left}{op}{operand}={result}.")
        left = result
    return " ".join(parts) + f" \\boxed{{{left}}}"


def expression_of(problem: Problem) -> Expression:
    """The expression behind a generated problem (from its metadata)."""
    meta = problem.metadata
    if "operands" not in meta or "ops" not in meta:
        raise ValueError(f"problem {problem.id} was not generated by cepo.tasks.arithmetic (no operands/ops)")
    return Expression(tuple(int(x) for x in meta["operands"]), tuple(meta["ops"]))


def solution(problem: Problem) -> str:
    """The correct chain of thought for a generated problem, ending in ``\\boxed{answer}``."""
    return _chain(expression_of(problem))


def inject_error(problem: Problem, rng: random.Random) -> str:
    """A chain of thought with exactly one wrong step (its result off by ±1–3); the error propagates, so the
    boxed answer is wrong too. Every value in the chain stays non-negative."""
    expr = expression_of(problem)
    running = expr.running()
    step = rng.randrange(len(expr.ops))
    lowest = min(running[step:])  # the error shifts this and every later value by delta
    deltas = [d for d in (-3, -2, -1, 1, 2, 3) if lowest + d >= 0]
    return _chain(expr, error_at=step, delta=rng.choice(deltas))


# ---------------------------------------------------------------------------------------------------------
# Phrasings


@dataclass(frozen=True)
class _Story:
    """A word-problem phrasing: an opening with the first operand, one clause per step, a question."""

    name: str
    start: str
    plus: str
    minus: str
    question: str

    def render(self, expr: Expression, who: str) -> str:
        clauses = [
            (self.plus if op == "+" else self.minus).format(n=x, who=who)
            for op, x in zip(expr.ops, expr.operands[1:], strict=True)
        ]
        opening = self.start.format(n=expr.operands[0], who=who)
        return f"{opening} Then {', then '.join(clauses)}. {self.question.format(who=who)}"


_NAMES = ("Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivy", "Jon")
TRAIN_STORIES = (
    _Story(
        "apples",
        "{who} has {n} apples.",
        "{who} gets {n} more",
        "{who} gives away {n}",
        "How many apples now?",
    ),
    _Story(
        "bus", "A bus has {n} people on it.", "{n} get on", "{n} get off", "How many people are on the bus?"
    ),
    _Story(
        "cards",
        "{who} owns {n} cards.",
        "{who} buys {n} more",
        "{who} loses {n}",
        "How many cards does {who} own?",
    ),
    _Story(
        "room", "There are {n} kids in a room.", "{n} come in", "{n} leave", "How many kids are in the room?"
    ),
)
# New openings, nouns and questions; the verbs are the training phrasings' (so the operator is recoverable).
HELD_OUT_STORIES = (
    _Story(
        "coins",
        "{who} saves {n} coins.",
        "{who} gets {n} more",
        "{who} loses {n}",
        "How many coins does {who} have?",
    ),
    _Story(
        "train",
        "A train carries {n} riders.",
        "{n} get on",
        "{n} leave",
        "How many riders are on the train now?",
    ),
)


# ---------------------------------------------------------------------------------------------------------
# Shapes


def bucket(text: str) -> int:
    """``sha256(text) mod 10``: which hash bucket a problem text falls in."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 10


def in_train_bucket(text: str) -> bool:
    """Whether a problem text may be used for training (held-out splits take only the other texts)."""
    return bucket(text) in TRAIN_BUCKETS


def _sorted_ops(rng: random.Random, n_ops: int) -> tuple[str, ...]:
    minus = rng.randint(0, n_ops)
    return ("+",) * (n_ops - minus) + ("-",) * minus


def _any_ops(rng: random.Random, n_ops: int) -> tuple[str, ...]:
    return tuple(rng.choice("+-") for _ in range(n_ops))


def _train_ops(rng: random.Random, n_ops: int) -> tuple[str, ...]:
    """Training orders: any order for 2–3 terms, sorted (no ``-+``) for 4 terms."""
    return _any_ops(rng, n_ops) if n_ops < 3 else _sorted_ops(rng, n_ops)


def _mixed_ops(rng: random.Random, n_ops: int) -> tuple[str, ...]:
    """Orders with a ``-`` directly before a ``+``: for 3 operators, never produced by :func:`_train_ops`."""
    while True:
        ops = tuple(rng.choice("+-") for _ in range(n_ops))
        if "-+" in "".join(ops):
            return ops


def _expression(
    rng: random.Random, n_terms: int, ops: tuple[str, ...], first: tuple[int, int] = (1, 9)
) -> Expression | None:
    operands = (rng.randint(*first), *(rng.randint(1, 9) for _ in range(n_terms - 1)))
    expr = Expression(operands, ops)
    return expr if min(expr.running()) >= 0 else None


def _draw(split: str, rng: random.Random) -> tuple[Expression, str, str] | None:
    """One candidate (expression, text, phrasing) of a split's shape, or None to redraw."""
    first = (1, 9)
    if split in ("train", "test", "word_problems"):
        n_terms = rng.choices((2, 3, 4), weights=(2, 3, 5))[0]
        ops = _train_ops(rng, n_terms - 1)
        if split != "word_problems" and rng.random() < 0.1:
            first = (10, 19)
    elif split == "more_operands":
        n_terms = 5
        ops = _sorted_ops(rng, n_terms - 1)
    elif split == "larger_numbers":
        n_terms = rng.choices((2, 3, 4), weights=(2, 3, 5))[0]
        ops = _train_ops(rng, n_terms - 1)
        first = (20, 29)
    elif split == "unseen_mix":
        n_terms = 4
        ops = _mixed_ops(rng, n_terms - 1)
    else:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    expr = _expression(rng, n_terms, ops, first)
    if expr is None:
        return None
    stories: Sequence[_Story] = ()
    if split == "word_problems":
        stories = HELD_OUT_STORIES
    elif split in ("train", "test") and first == (1, 9) and rng.random() < 0.25:
        stories = TRAIN_STORIES
    if stories:
        story = rng.choice(stories)
        return expr, story.render(expr, rng.choice(_NAMES)), story.name
    return expr, f"Compute {expr.symbolic()}.", "symbolic"


def generate(split: str, n: int, seed: int, *, unique: bool = True) -> list[Problem]:
    """``n`` problems of ``split`` (see :data:`SPLITS`), deterministic for ``seed``.

    Training texts all hash into :data:`TRAIN_BUCKETS`, held-out texts never do. With ``unique`` (default)
    no text repeats within the returned list; a split too small for ``n`` distinct texts raises ValueError.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if n < 0:
        raise ValueError("n must be ≥ 0")
    keep: Callable[[str], bool] = (
        in_train_bucket if split == "train" else (lambda text: not in_train_bucket(text))
    )
    rng = random.Random(f"{TASK_VERSION}/{split}/{seed}")
    problems: list[Problem] = []
    seen: set[str] = set()
    attempts, max_attempts = 0, 200 * n + 1000
    while len(problems) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(f"split {split!r} has fewer than {n} distinct problems; ask for fewer")
        drawn = _draw(split, rng)
        if drawn is None:
            continue
        expr, text, phrasing = drawn
        if not keep(text) or (unique and text in seen):
            continue
        seen.add(text)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
        problems.append(
            Problem(
                id=f"arith-{split}-{digest}" if unique else f"arith-{split}-{seed}-{len(problems)}",
                problem=text,
                answer=str(expr.value),
                metadata={
                    "source": "arithmetic",
                    "split": split,
                    "suite": split,
                    "operands": list(expr.operands),
                    "ops": list(expr.ops),
                    "phrasing": phrasing,
                    "seed": seed,
                    "task_version": TASK_VERSION,
                },
            )
        )
    return problems
