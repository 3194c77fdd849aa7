"""Training and evaluation data: loaders that turn files and generators into problem records, and the cursor."""

from cepo.data.cursor import DataCursor, dataset_fingerprint
from cepo.data.loaders import (
    IMAGE_PLACEHOLDER,
    LoadResult,
    SkippedRow,
    from_config,
    load_hf,
    load_jsonl,
    load_parquet,
    load_problems,
)
from cepo.errors import DataError

__all__ = [
    "IMAGE_PLACEHOLDER",
    "DataCursor",
    "DataError",
    "LoadResult",
    "SkippedRow",
    "dataset_fingerprint",
    "from_config",
    "load_hf",
    "load_jsonl",
    "load_parquet",
    "load_problems",
]
