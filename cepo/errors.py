"""The data error, shared by the loaders (:mod:`cepo.data.loaders`), the cursor and the task generators
(:mod:`cepo.tasks`) without either package importing the other (``cepo.data`` re-exports it)."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A data problem: a bad row, a missing file, an unknown format, an empty dataset."""
