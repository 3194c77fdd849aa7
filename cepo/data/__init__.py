"""Training and evaluation data: loaders that turn files and generators into problem records, and the cursor."""

from cepo.data.cursor import DataCursor, dataset_fingerprint
from cepo.data.loaders import (
    IMAGE_PLACEHOLDER,
    LoadResult,
    SkippedRow,
    check_heldout,
    from_config,
    hub_unreachable,
    load_heldout,
    load_hf,
    load_jsonl,
    load_parquet,
    load_problems,
    problem_key,
    split_values,
)
from cepo.errors import DataError

__all__ = [
    "IMAGE_PLACEHOLDER",
    "DataCursor",
    "DataError",
    "LoadResult",
    "SkippedRow",
    "check_heldout",
    "dataset_fingerprint",
    "from_config",
    "hub_unreachable",
    "load_heldout",
    "load_hf",
    "load_jsonl",
    "load_parquet",
    "load_problems",
    "problem_key",
    "split_values",
]
