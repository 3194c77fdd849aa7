"""The data cursor: a seeded, resumable walk over the problems, one epoch permutation after another.

The order of epoch ``e`` is ``numpy.random.default_rng([seed, e]).permutation(len(problems))``: it depends
on the seed and the epoch number only, so a cursor restored from :meth:`DataCursor.state_dict` (epoch,
position, seed and a fingerprint of the dataset) hands out exactly the batches an uninterrupted run would
have. Batches cross epoch boundaries seamlessly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from cepo.errors import DataError
from cepo_proto.messages import Problem

__all__ = ["STATE_VERSION", "DataCursor", "dataset_fingerprint"]

STATE_VERSION = 1
_STATE_KEYS = ("version", "seed", "epoch", "position", "size", "fingerprint")


def dataset_fingerprint(problems: Sequence[Problem]) -> str:
    """sha256 over the ordered (id, problem, answer) of every record."""
    digest = hashlib.sha256()
    for problem in problems:
        for part in (problem.id, problem.problem, problem.answer):
            encoded = part.encode("utf-8")
            digest.update(len(encoded).to_bytes(8, "little"))
            digest.update(encoded)
    return digest.hexdigest()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entropy(seed: int, epoch: int) -> list[int]:
    # SeedSequence takes non-negative integers only; a negative seed gets its own, distinct encoding.
    return [seed, epoch] if seed >= 0 else [-seed, epoch, 1]


class DataCursor:
    """Hands out batches of problems in a deterministic, seeded, resumable order."""

    def __init__(self, problems: Sequence[Problem], seed: int) -> None:
        if not problems:
            raise DataError("the data cursor needs at least one problem")
        if not _is_int(seed):
            raise DataError(f"the data cursor seed must be an integer, got {seed!r}")
        self._problems = list(problems)
        self._seed = seed
        self._epoch = 0
        self._position = 0
        self._fingerprint = dataset_fingerprint(self._problems)
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    def __len__(self) -> int:
        return len(self._problems)

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def epoch(self) -> int:
        """The epoch the next problem comes from."""
        return self._epoch

    @property
    def position(self) -> int:
        """Index of the next problem within the current epoch's permutation."""
        return self._position

    @property
    def consumed(self) -> int:
        """Problems handed out so far."""
        return self._epoch * len(self._problems) + self._position

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def epoch_order(self, epoch: int) -> list[int]:
        """The permutation (indices into the dataset) of ``epoch``."""
        return [int(i) for i in self._permutation(epoch)]

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch or self._order is None:
            rng = np.random.default_rng(_entropy(self._seed, epoch))
            self._order = rng.permutation(len(self._problems))
            self._order_epoch = epoch
        return self._order

    def next_batch(self, n: int) -> list[Problem]:
        """The next ``n`` problems; the walk continues into the next epoch's permutation when one ends."""
        if not _is_int(n) or n < 1:
            raise ValueError(f"batch size must be a positive integer, got {n!r}")
        size = len(self._problems)
        batch: list[Problem] = []
        while len(batch) < n:
            order = self._permutation(self._epoch)
            take = min(n - len(batch), size - self._position)
            batch.extend(self._problems[i] for i in order[self._position : self._position + take])
            self._position += take
            if self._position == size:
                self._epoch += 1
                self._position = 0
        return batch

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-serialisable snapshot: restoring it resumes at exactly this point."""
        return {
            "version": STATE_VERSION,
            "seed": self._seed,
            "epoch": self._epoch,
            "position": self._position,
            "size": len(self._problems),
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; refuses a state of a different dataset or with bad values.

        The state's seed replaces this cursor's seed, so the resumed order is the saved run's order.
        """
        if not isinstance(state, dict):
            raise DataError(f"data cursor state must be a dict, got {type(state).__name__}")
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise DataError(f"data cursor state lacks {', '.join(missing)}")
        unknown = sorted(set(state) - set(_STATE_KEYS))
        if unknown:
            raise DataError(f"data cursor state has unknown keys {', '.join(map(str, unknown))}")
        if state["version"] != STATE_VERSION:
            raise DataError(f"data cursor state version {state['version']!r} is not {STATE_VERSION}")
        for key in ("seed", "epoch", "position", "size"):
            if not _is_int(state[key]):
                raise DataError(f"data cursor state: {key} must be an integer, got {state[key]!r}")
        size = len(self._problems)
        if state["size"] != size or state["fingerprint"] != self._fingerprint:
            raise DataError(
                f"data cursor state belongs to a different dataset ({state['size']} problems, fingerprint "
                f"{str(state['fingerprint'])[:12]}…) than this one ({size} problems, fingerprint "
                f"{self._fingerprint[:12]}…)"
            )
        if state["epoch"] < 0:
            raise DataError(f"data cursor state: epoch {state['epoch']} is negative")
        if not 0 <= state["position"] < size:
            raise DataError(f"data cursor state: position {state['position']} is outside 0..{size - 1}")
        self._seed = state["seed"]
        self._epoch = state["epoch"]
        self._position = state["position"]
        self._order = None
        self._order_epoch = -1
