"""Problem loaders: JSONL, Parquet and Hugging Face ``datasets`` folders → :class:`cepo_proto.Problem` records.

Every loader reads rows, maps source columns onto record fields (``columns``: source column → field), and
checks each row. A bad row — not JSON, not an object, a missing or empty field, a wrong type, a
placeholder/image mismatch, a duplicate id — either stops the load with a :class:`DataError` naming the file,
the 1-based row (line) number and the field, or, with ``on_bad_row="skip"``, is left out and reported in
:attr:`LoadResult.skipped` (and logged as a warning). A missing path, an unknown format, an unreadable file or
an empty result always raises.

Record fields: ``id`` (the source's id column, else ``<file stem>:<row>``), ``problem`` (text with ``<image>``
placeholders), ``answer`` (numbers become strings), ``images`` (each a file path that exists, an http(s) URL
or a ``data:image/…;base64,…`` URI; Hugging Face ``Image`` values and raw bytes are converted) and
``metadata`` (where the row came from, plus the source's own ``metadata`` column under ``extra``).

Splits. A Hugging Face dataset has its own splits. A JSONL or Parquet file may carry a split column
(``split_column``, ``"split"`` by default): when any row names its split there, only the rows of the requested
split are read (and a row that names none is bad); a file without that column is one split, taken whole.
Held-out suites of file sources (:func:`load_heldout`) come from ``data.eval_paths`` (a file of their own) or
from the training file's rows whose split column names the suite, never from the training rows themselves.
A dataset name on the Hugging Face Hub is only loaded when the Hub answers (:func:`hub_unreachable`): offline
it fails at once, naming the setting to change.

Your own source (``data.source: python``, :func:`load_python`): ``data.loader`` names a function called with a
split name and a size that returns a list of :class:`cepo_proto.Problem` records or of rows (dicts), the rows
checked like a file's (row numbers from 1; ``id`` defaults to ``<split>:<row>``).
"""

from __future__ import annotations

import base64
import decimal
import functools
import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from cepo.errors import DataError
from cepo_proto.messages import Problem

if TYPE_CHECKING:
    from cepo.config import DataConfig

__all__ = [
    "FIELDS",
    "FILE_SOURCES",
    "IMAGE_PLACEHOLDER",
    "DataError",
    "LoadResult",
    "SkippedRow",
    "check_heldout",
    "from_config",
    "hub_unreachable",
    "load_heldout",
    "load_hf",
    "load_jsonl",
    "load_parquet",
    "load_problems",
    "load_python",
    "problem_key",
    "split_values",
]

log = logging.getLogger(__name__)

FIELDS: tuple[str, ...] = ("id", "problem", "answer", "images", "metadata")
FILE_SOURCES: tuple[str, ...] = ("jsonl", "parquet", "hf")
IMAGE_PLACEHOLDER = "<image>"
OnBadRow = Literal["error", "skip"]
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")


@dataclass(frozen=True)
class SkippedRow:
    """One bad row left out under ``on_bad_row="skip"``."""

    file: str
    row: int  # 1-based row (line number for JSONL)
    field: str | None  # None when the row as a whole is bad (not JSON, not an object)
    reason: str
    unit: str = "row"  # "line" for JSONL

    def describe(self) -> str:
        where = f"{self.file}: {self.unit} {self.row}"
        if self.field is not None:
            where += f", field '{self.field}'"
        return f"{where}: {self.reason}"


@dataclass
class LoadResult:
    """The loaded problems and the bad rows that were skipped (empty unless ``on_bad_row="skip"``)."""

    problems: list[Problem]
    skipped: list[SkippedRow] = field(default_factory=list)
    # rows per split of a JSONL/Parquet file with a split column (None: the file has none, it is one split)
    splits: dict[str, int] | None = None

    def summary(self) -> str:
        text = f"{len(self.problems)} problems"
        if self.skipped:
            text += f", {len(self.skipped)} bad rows skipped (first: {self.skipped[0].describe()})"
        return text


class _BadRow(Exception):
    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


# ---------------------------------------------------------------------------------------------------------
# Column mapping


def _field_columns(columns: Mapping[str, str] | None) -> dict[str, str | None]:
    """For each record field, the source column it is read from (None: no column can supply it)."""
    columns = dict(columns or {})
    seen: dict[str, str] = {}
    for source, target in columns.items():
        if not isinstance(source, str) or not source:
            raise DataError(f"column mapping: source column names must be non-empty strings, got {source!r}")
        if target not in FIELDS:
            raise DataError(
                f"column mapping {source!r} → {target!r}: unknown record field; fields are {', '.join(FIELDS)}"
            )
        if target in seen:
            raise DataError(f"column mapping: both {seen[target]!r} and {source!r} map onto field {target!r}")
        seen[target] = source
    # A field is read from the column mapped onto it, else from its own name, unless that name is itself
    # mapped onto another field.
    return {f: seen.get(f, f if f not in columns else None) for f in FIELDS}


def _column_note(name: str, column: str | None) -> str:
    return "" if column == name or column is None else f" (source column {column!r})"


# ---------------------------------------------------------------------------------------------------------
# Values


def _image_mime(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:2] == b"BM":
        return "image/bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    return None


def _data_uri(data: bytes, index: int) -> str:
    if not data:
        raise _BadRow("images", f"image {index} is empty")
    mime = _image_mime(data)
    if mime is None:
        raise _BadRow("images", f"image {index} is not a recognised image (PNG, JPEG, GIF, WebP, BMP, TIFF)")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _existing_path(raw: str, base_dir: Path | None, *, relative: bool = True) -> str | None:
    """``raw`` as an absolute path to an existing file; a relative path is taken relative to ``base_dir`` (the
    data file's folder; the working directory when None), or not at all when ``relative`` is False."""
    try:
        path = Path(raw).expanduser()  # RuntimeError for ~user of an unknown user
        if not path.is_absolute():
            if not relative:
                return None
            path = (base_dir or Path.cwd()) / path
        return str(path.resolve()) if path.is_file() else None
    except (OSError, ValueError, RuntimeError):  # a name too long, a NUL byte, an unknown ~user
        return None


def _image_to_str(value: Any, index: int, base_dir: Path | None) -> str:
    """One image → a path that exists, an http(s) URL or a data URI."""
    if isinstance(value, str):
        if not value.strip():
            raise _BadRow("images", f"image {index} is an empty string")
        if value.startswith("data:"):
            if not value.startswith("data:image/") or ";base64," not in value:
                raise _BadRow("images", f"image {index} is a data URI but not data:image/…;base64,…")
            return value
        if value.startswith(("http://", "https://")):
            return value
        found = _existing_path(value, base_dir)
        if found is None:
            raise _BadRow("images", f"image {index}: file {value!r} does not exist")
        return found
    if isinstance(value, bytes | bytearray | memoryview):
        return _data_uri(bytes(value), index)
    if isinstance(value, Mapping):  # a Hugging Face Image value: {"bytes": …, "path": …}
        path, data = value.get("path"), value.get("bytes")
        has_bytes = isinstance(data, bytes | bytearray | memoryview) and len(data) > 0
        if isinstance(path, str) and path:
            # With bytes at hand a relative path (save_to_disk keeps only the file's base name) is no evidence
            # of where the file is: only an absolute path that exists wins over the bytes.
            found = _existing_path(path, base_dir, relative=not has_bytes)
            if found is not None:
                return found
        if has_bytes:
            return _data_uri(bytes(data), index)
        raise _BadRow("images", f"image {index} has no bytes and no existing path (path={path!r})")
    if hasattr(value, "save") and hasattr(value, "mode") and hasattr(value, "size"):  # a PIL image
        filename = getattr(value, "filename", None)
        if isinstance(filename, str) and filename:
            found = _existing_path(filename, None)
            if found is not None:
                return found
        buffer = io.BytesIO()
        try:
            value.save(buffer, format="PNG")
        except Exception as exc:  # any encoder failure makes the row bad
            raise _BadRow("images", f"image {index} could not be encoded as PNG: {exc}") from None
        return _data_uri(buffer.getvalue(), index)
    raise _BadRow("images", f"image {index} has unsupported type {type(value).__name__}")


def _text(name: str, value: Any, column: str | None, *, numbers: bool = False) -> str:
    note = _column_note(name, column)
    if value is None:
        raise _BadRow(name, f"missing (null){note}")
    if isinstance(value, bool):
        raise _BadRow(name, f"expected a string, got a boolean{note}")
    if numbers and isinstance(value, int):
        return str(value)
    if numbers and isinstance(value, float):
        if not math.isfinite(value):
            raise _BadRow(name, f"expected a finite number, got {value!r}{note}")
        return str(int(value)) if value.is_integer() else repr(value)
    if numbers and isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise _BadRow(name, f"expected a finite number, got {value}{note}")
        return format(value.normalize(), "f")
    if not isinstance(value, str):
        kinds = "a string or a number" if numbers else "a string"
        raise _BadRow(name, f"expected {kinds}, got {type(value).__name__}{note}")
    if not value.strip():
        raise _BadRow(name, f"is empty{note}")
    _check_unicode(name, value, note)
    return value


def _check_unicode(name: str, value: str, note: str = "") -> None:
    """JSON escapes can spell an unpaired surrogate (``"\\ud800"``), which is no text and cannot be encoded."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _BadRow(
            name, f"not valid Unicode text (unpaired surrogate at character {exc.start}){note}"
        ) from None


class _Rows:
    """Turns raw rows into problems, checking each and collecting (or raising on) bad ones."""

    def __init__(
        self,
        *,
        label: str,
        id_stem: str,
        unit: str,
        source: str,
        split: str | None,
        columns: Mapping[str, str] | None,
        on_bad_row: OnBadRow,
        base_dir: Path | None,
        split_column: str | None = None,
    ) -> None:
        if on_bad_row not in ("error", "skip"):
            raise DataError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
        self.label, self.id_stem, self.unit, self.source, self.split = label, id_stem, unit, source, split
        self.fields = _field_columns(columns)
        self.on_bad_row = on_bad_row
        self.base_dir = base_dir
        # rows are selected by their split column only when a split is asked for
        self.split_column = split_column if split is not None else None
        self.problems: list[Problem] = []
        self.skipped: list[SkippedRow] = []
        self.rows = 0
        self.split_counts: dict[str, int] = {}  # rows per value of the split column
        self.other_splits = 0  # rows of another split, left out
        self.unsplit: list[int] = []  # rows without a split value (bad if any other row has one)
        self._ids: dict[str, int] = {}

    def bad(self, row: int, field: str | None, reason: str) -> None:
        skipped = SkippedRow(self.label, row, field, reason, self.unit)
        if self.on_bad_row == "error":
            raise DataError(skipped.describe())
        self.skipped.append(skipped)

    def add(self, row: int, record: Any) -> None:
        self.rows += 1
        column = self.split_column
        if column is not None and isinstance(record, Mapping):
            value = record.get(column)
            if value is None:
                self.unsplit.append(row)
            elif not isinstance(value, str) or not value.strip():
                self.bad(row, column, f"the split column holds {_brief(value)}, not a split name")
                return
            else:
                self.split_counts[value] = self.split_counts.get(value, 0) + 1
                if value != self.split:
                    self.other_splits += 1
                    return
        try:
            problem = self._convert(row, record)
        except _BadRow as exc:
            self.bad(row, exc.field, exc.reason)
            return
        first = self._ids.get(problem.id)
        if first is not None:
            self.bad(row, "id", f"duplicate id {problem.id!r} (first seen at {self.unit} {first})")
            return
        self._ids[problem.id] = row
        self.problems.append(problem)

    def _get(self, record: Mapping[str, Any], name: str) -> tuple[bool, Any, str | None]:
        column = self.fields[name]
        if column is None or column not in record:
            return False, None, column
        return True, record[column], column

    def _convert(self, row: int, record: Any) -> Problem:
        if not isinstance(record, Mapping):
            raise _BadRow(None, f"expected an object, got {type(record).__name__}")

        present, value, column = self._get(record, "id")
        if not present:
            problem_id = f"{self.id_stem}:{row}"
        elif isinstance(value, int) and not isinstance(value, bool):
            problem_id = str(value)
        else:
            problem_id = _text("id", value, column)

        present, value, column = self._get(record, "problem")
        if not present:
            raise _BadRow("problem", f"missing{_column_note('problem', column)}")
        text = _text("problem", value, column)

        present, value, column = self._get(record, "answer")
        if not present:
            raise _BadRow("answer", f"missing{_column_note('answer', column)}")
        answer = _text("answer", value, column, numbers=True)

        present, value, column = self._get(record, "images")
        images: list[str] = []
        if present and value is not None:
            items = list(value) if isinstance(value, list | tuple) else [value]
            images = [_image_to_str(item, i, self.base_dir) for i, item in enumerate(items)]
        placeholders = text.count(IMAGE_PLACEHOLDER)
        if placeholders != len(images):
            raise _BadRow(
                "images",
                f"the problem has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but the row has {len(images)} image(s)",
            )

        metadata: dict[str, Any] = {"source": self.source, "file": self.label, "row": row}
        if self.split is not None:
            metadata["split"] = self.split
        present, value, column = self._get(record, "metadata")
        if present and value is not None:
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise _BadRow("metadata", f"a string that is not JSON ({exc.msg})") from None
                except (ValueError, RecursionError) as exc:  # a 4,300-digit integer, deep nesting
                    reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
                    raise _BadRow("metadata", f"a string that is not usable JSON ({reason})") from None
            if not isinstance(value, Mapping):
                raise _BadRow("metadata", f"expected an object, got {type(value).__name__}")
            try:
                metadata["extra"] = json.loads(json.dumps(dict(value)))
            except (TypeError, ValueError, RecursionError) as exc:
                raise _BadRow("metadata", f"not JSON-serialisable ({exc})") from None

        for i, image in enumerate(images):
            _check_unicode("images", image, f" (image {i})")
        try:  # the row's own metadata (not the file name, which may hold surrogate escapes of raw bytes)
            json.dumps(metadata.get("extra"), ensure_ascii=False, allow_nan=True).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _BadRow("metadata", f"not valid Unicode text (unpaired surrogate: {exc.reason})") from None
        try:
            return Problem(id=problem_id, problem=text, answer=answer, images=images, metadata=metadata)
        except ValidationError as exc:  # a backstop: every check above should have caught it first
            first = exc.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else None
            raise _BadRow(field, first["msg"]) from None

    def result(self) -> LoadResult:
        if self.rows == 0:
            raise DataError(f"{self.label} holds no rows")
        splits: dict[str, int] | None = None
        if self.split_counts:  # a file of several splits: every row must name its own
            splits = dict(self.split_counts)
            loaded = {p.metadata["row"] for p in self.problems}
            missing = [row for row in self.unsplit if row in loaded]  # the others are already bad rows
            if missing:
                for row in missing:
                    self.bad(row, self.split_column, "names no split, while other rows do")
                self.problems = [p for p in self.problems if p.metadata["row"] not in set(missing)]
                self.skipped.sort(key=lambda s: s.row)
            if self.split not in self.split_counts:
                raise DataError(
                    f"{self.label}: no row has {self.split_column} {self.split!r} "
                    f"(column {self.split_column!r} holds {_split_list(splits)})"
                )
        selected = self.rows - self.other_splits
        if not self.problems:
            raise DataError(
                f"{self.label}: all {selected} rows{self._of_split()} were bad and skipped "
                f"(first: {self.skipped[0].describe()})"
            )
        if self.skipped:
            log.warning(
                "%s: skipped %d bad row(s) of %d%s; first: %s",
                self.label,
                len(self.skipped),
                selected,
                self._of_split(),
                self.skipped[0].describe(),
            )
        return LoadResult(self.problems, self.skipped, splits)

    def _of_split(self) -> str:
        return f" of split {self.split!r}" if self.split_counts else ""


def _brief(value: Any, limit: int = 40) -> str:
    text = repr(value) if not isinstance(value, str) else repr(value[:limit])
    return text if len(text) <= limit + 10 else text[: limit + 7] + "..."


def _split_list(splits: Mapping[str, int]) -> str:
    """``'train' (40 rows), 'test' (10 rows)``: the values of a split column, most rows first."""
    ordered = sorted(splits.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{_brief(name)} ({count} rows)" for name, count in ordered[:8])
    return text + (f" and {len(ordered) - 8} more" if len(ordered) > 8 else "")


# ---------------------------------------------------------------------------------------------------------
# Formats


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"{what} file {path} does not exist")
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a {what} file (use source 'hf' for a folder of data files)")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".jsonl", ".ndjson", ".json", ".parquet"):
        name = name.removesuffix(suffix)
    return name or path.name


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any | _BadRow]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue  # blank lines (a trailing newline) are not rows
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, _BadRow(None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, _BadRow(None, f"not valid JSON ({exc.msg} at column {exc.colno})")
            except ValueError as exc:  # an integer of more than 4,300 digits
                yield number, _BadRow(None, f"not usable JSON ({exc})")
            except RecursionError:
                yield number, _BadRow(None, "not usable JSON (nested too deeply)")
            else:
                yield number, value


def _feed(rows: _Rows, items: Iterable[tuple[int, Any]]) -> LoadResult:
    for number, item in items:
        if isinstance(item, _BadRow):
            rows.rows += 1
            rows.bad(number, item.field, item.reason)
        else:
            rows.add(number, item)
    return rows.result()


def load_jsonl(
    path: str | Path,
    *,
    columns: Mapping[str, str] | None = None,
    on_bad_row: OnBadRow = "error",
    split: str | None = None,
    split_column: str | None = "split",
) -> LoadResult:
    """Problems from a JSON Lines file (one object per line; ``.gz`` is decompressed). With ``split`` given,
    a file whose rows name their split in ``split_column`` gives only the rows of ``split``."""
    path = Path(path)
    _require_file(path, "JSONL")
    rows = _Rows(
        label=str(path),
        id_stem=_stem(path),
        unit="line",
        source="jsonl",
        split=split,
        columns=columns,
        on_bad_row=on_bad_row,
        base_dir=path.parent,
        split_column=split_column,
    )
    try:
        return _feed(rows, _jsonl_rows(path))
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read JSONL file {path}: {exc}") from None


def load_parquet(
    path: str | Path,
    *,
    columns: Mapping[str, str] | None = None,
    on_bad_row: OnBadRow = "error",
    split: str | None = None,
    split_column: str | None = "split",
) -> LoadResult:
    """Problems from a Parquet file (read with pyarrow, in batches); ``split`` and ``split_column`` as for
    :func:`load_jsonl`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    _require_file(path, "Parquet")
    rows = _Rows(
        label=str(path),
        id_stem=_stem(path),
        unit="row",
        source="parquet",
        split=split,
        columns=columns,
        on_bad_row=on_bad_row,
        base_dir=path.parent,
        split_column=split_column,
    )

    def items() -> Iterator[tuple[int, Any]]:
        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                number += 1
                yield number, record

    try:
        return _feed(rows, items())
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"cannot read Parquet file {path}: {exc}") from None


def _file_format(path: Path) -> Literal["jsonl", "parquet"] | None:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    return "jsonl" if name.endswith(_JSONL_SUFFIXES) else None


def split_values(source: str, path: str | Path, column: str | None = "split") -> dict[str, int] | None:
    """Rows per split named in ``column`` of a JSONL or Parquet file (or an ``hf`` source's single file), or
    None when no row has that column (the file is one split). Rows that cannot be read are not counted; the
    Parquet file's column alone is read."""
    path = Path(path).expanduser()
    kind = source if source in ("jsonl", "parquet") else _file_format(path) if path.is_file() else None
    if kind is None or column is None:
        return None
    _require_file(path, "JSONL" if kind == "jsonl" else "Parquet")
    counts: dict[str, int] = {}
    if kind == "jsonl":
        try:
            for _, record in _jsonl_rows(path):
                if isinstance(record, Mapping) and isinstance(record.get(column), str):
                    counts[record[column]] = counts.get(record[column], 0) + 1
        except (OSError, EOFError) as exc:
            raise DataError(f"cannot read JSONL file {path}: {exc}") from None
        return counts or None
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
        if column not in handle.schema_arrow.names:
            return None
        for batch in handle.iter_batches(batch_size=65536, columns=[column]):
            for value in batch.column(0).to_pylist():
                if isinstance(value, str):
                    counts[value] = counts.get(value, 0) + 1
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"cannot read Parquet file {path}: {exc}") from None
    return counts or None


def _hf_rows(dataset: Any) -> Iterator[tuple[int, Any]]:
    """Rows of a ``datasets.Dataset`` in arrow storage form (images stay {"bytes", "path"}, not decoded)."""
    number = 0
    for table in dataset.with_format("arrow").iter(batch_size=1024):
        for record in table.to_pylist():
            number += 1
            yield number, record


_TRUE = frozenset({"1", "ON", "YES", "TRUE"})
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
HUB_PROBE_TIMEOUT_S = 3.0


def _offline_variable() -> str | None:
    """The Hugging Face offline switch that is set in the environment, if any."""
    for name in _OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().upper() in _TRUE:
            return name
    return None


@functools.lru_cache(maxsize=8)
def _probe(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection to host:port opens within ``timeout`` seconds (name lookup included, which
    ``socket``'s own timeout does not bound), else why not."""
    import socket
    import threading

    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc.strerror or str(exc) or type(exc).__name__)

    thread = threading.Thread(target=connect, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        return f"{host}:{port} did not answer within {timeout:g} s"
    return None if outcome[0] is None else f"{host}:{port} cannot be reached ({outcome[0]})"


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the Hugging Face Hub cannot be used now — an offline switch (``HF_HUB_OFFLINE``,
    ``HF_DATASETS_OFFLINE``, ``TRANSFORMERS_OFFLINE``) is set, or its host (``HF_ENDPOINT``, through the
    environment's https proxy if one applies) does not accept a connection within ``timeout`` seconds — or
    None. One quick check instead of the Hugging Face libraries' retries (half a minute offline)."""
    offline = _offline_variable()
    if offline is not None:
        return f"{offline} is set"
    import urllib.parse
    import urllib.request

    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    proxy = urllib.request.getproxies().get(endpoint.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if parsed.hostname:
            host, port = parsed.hostname, parsed.port or 80
    return _probe(host, port, timeout)


def _hub_refusal(path: str, setting: str | None, why: str, *, cache_hint: bool = True) -> DataError:
    named = f"{setting} {path!r}" if setting else repr(path)
    return DataError(
        f"{named} is a dataset on the Hugging Face Hub, and {why}: set {setting or 'the path'} to a local file "
        "or folder, or data.source to a built-in task (arithmetic, reasoning_gym; e.g. -c configs/tiny.yaml)"
        + ("; with HF_HUB_OFFLINE=1 a copy in the Hugging Face cache is used" if cache_hint else "")
    )


def _hf_dataset(
    path: str, split: str, cache_dir: str | Path | None, setting: str | None = None
) -> tuple[Any, Path | None]:
    """The ``split`` of the Hugging Face dataset at ``path`` and the folder that relative paths refer to."""
    folder = Path(path).expanduser()
    cache = str(cache_dir) if cache_dir is not None else None
    if not folder.exists():
        if not _HUB_NAME.match(path):
            raise DataError(f"Hugging Face dataset folder {path} does not exist")
        offline = _offline_variable()
        if offline is None and (why := hub_unreachable()) is not None:
            raise _hub_refusal(path, setting, why)  # at once: datasets would retry for half a minute
        import datasets

        try:
            return datasets.load_dataset(path, split=split, cache_dir=cache), None
        except Exception as exc:  # offline, private, misspelt: all end here
            if offline is not None:
                why = f"{offline} is set but it is not in the Hugging Face cache"
                raise _hub_refusal(path, setting, why, cache_hint=False) from None
            raise DataError(
                f"{path} is not a local file or folder, and loading it from the Hugging Face Hub failed: "
                f"{type(exc).__name__}: {exc} (offline: `hf download --repo-type dataset {path} --local-dir DIR` "
                "elsewhere and point data.path at DIR)"
            ) from None
    import datasets

    if (folder / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk
        try:
            loaded = datasets.load_from_disk(str(folder))
        except Exception as exc:
            raise DataError(f"cannot load the saved dataset at {folder}: {exc}") from None
        if split not in loaded:
            raise DataError(f"saved dataset {folder} has no split {split!r}; available: {', '.join(loaded)}")
        return loaded[split], folder
    if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():  # Dataset.save_to_disk
        try:
            loaded = datasets.load_from_disk(str(folder))
        except Exception as exc:
            raise DataError(f"cannot load the saved dataset at {folder}: {exc}") from None
        recorded = loaded.split
        if recorded is not None and str(recorded) != split:
            raise DataError(
                f"saved dataset {folder} holds split {str(recorded)!r}, not the requested {split!r}"
            )
        return loaded, folder
    try:  # a hub-style folder of data files (data/train-00000-of-00001.parquet, …)
        return datasets.load_dataset(str(folder), split=split, cache_dir=cache), folder
    except ValueError as exc:
        if "Unknown split" in str(exc):
            raise DataError(f"dataset folder {folder}: {exc}") from None
        raise DataError(f"cannot load a Hugging Face dataset from {folder}: {exc}") from None
    except Exception as exc:
        raise DataError(
            f"cannot load a Hugging Face dataset from {folder}: {type(exc).__name__}: {exc}"
        ) from None


def load_hf(
    path: str | Path,
    *,
    split: str = "train",
    columns: Mapping[str, str] | None = None,
    on_bad_row: OnBadRow = "error",
    cache_dir: str | Path | None = None,
    split_column: str | None = "split",
    setting: str | None = None,
) -> LoadResult:
    """Problems from a Hugging Face dataset: a ``save_to_disk`` folder (``Dataset`` or ``DatasetDict``), a
    hub-style folder of parquet/jsonl files, a single parquet/jsonl file (read as :func:`load_parquet` /
    :func:`load_jsonl` do, split column included), or a Hub name (needs the network; refused at once when the
    Hub cannot be reached, naming ``setting``, the configuration key ``path`` came from)."""
    text = str(path)
    file = Path(text).expanduser()
    if file.is_file():
        kind = _file_format(file)
        if kind == "parquet":
            return load_parquet(
                file, columns=columns, on_bad_row=on_bad_row, split=split, split_column=split_column
            )
        if kind == "jsonl":
            return load_jsonl(
                file, columns=columns, on_bad_row=on_bad_row, split=split, split_column=split_column
            )
        raise DataError(
            f"{file}: unknown data file format (expected .parquet or .jsonl, or a dataset folder)"
        )
    dataset, base_dir = _hf_dataset(text, split, cache_dir, setting)
    name = (file.resolve().name if base_dir is not None else text.replace("/", "_")) or "data"
    rows = _Rows(
        label=f"{text}[{split}]",
        id_stem=f"{name}:{split}",
        unit="row",
        source="hf",
        split=split,
        columns=columns,
        on_bad_row=on_bad_row,
        base_dir=base_dir,
    )
    return _feed(rows, _hf_rows(dataset))


def load_problems(
    source: str,
    path: str | Path,
    *,
    split: str = "train",
    columns: Mapping[str, str] | None = None,
    on_bad_row: OnBadRow = "error",
    cache_dir: str | Path | None = None,
    split_column: str | None = "split",
    setting: str | None = None,
) -> LoadResult:
    """Problems from ``path`` in format ``source`` ('jsonl', 'parquet' or 'hf'): the rows of ``split`` (a
    JSONL/Parquet file without ``split_column`` is one split, read whole)."""
    if path is None or not str(path):
        raise DataError(f"source {source!r} needs a path")
    if source == "jsonl":
        return load_jsonl(
            path, columns=columns, on_bad_row=on_bad_row, split=split, split_column=split_column
        )
    if source == "parquet":
        return load_parquet(
            path, columns=columns, on_bad_row=on_bad_row, split=split, split_column=split_column
        )
    if source == "hf":
        return load_hf(
            path,
            split=split,
            columns=columns,
            on_bad_row=on_bad_row,
            cache_dir=cache_dir,
            split_column=split_column,
            setting=setting,
        )
    raise DataError(
        f"unknown data source {source!r} for {path}; file sources: {', '.join(FILE_SOURCES)} "
        "(generated sources 'arithmetic' and 'reasoning_gym' go through from_config)"
    )


# ---------------------------------------------------------------------------------------------------------
# From the run configuration


def problem_key(text: str) -> str:
    """The hash by which held-out and training problems are compared: sha256 of the text after Unicode NFKC
    normalisation, case folding and collapsing whitespace (images are not compared)."""
    normal = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return hashlib.sha256(normal.encode("utf-8", "surrogatepass")).hexdigest()


def _is_single_file(source: str, path: str | Path | None) -> bool:
    """Whether ``path`` is read as one JSONL/Parquet file (whose splits are a column), not a dataset."""
    if path is None:
        return False
    if source in ("jsonl", "parquet"):
        return True
    try:
        file = Path(path).expanduser()
        return source == "hf" and file.is_file() and _file_format(file) is not None
    except (OSError, ValueError, RuntimeError):
        return False


def _no_heldout(config: DataConfig, suite: str) -> DataError:
    column = config.split_column
    why = (
        f"data.path {config.path} has no {column!r} column naming its rows' splits"
        if column
        else f"data.path {config.path} is one file and data.split_column is null"
    )
    return DataError(
        f"data.eval_suites: suite {suite!r} has no held-out data: {why}, and data.eval_paths has no entry "
        f"{suite!r}; set data.eval_paths.{suite} to the suite's own file"
        + (f" (or add a {column!r} column to data.path)" if column else "")
        + " — the training file is never evaluated on"
    )


def load_heldout(
    config: DataConfig, suite: str, *, cache_dir: str | Path | None = None
) -> tuple[LoadResult, str]:
    """The problems of held-out ``suite`` of a file source (jsonl, parquet, hf) and where they came from.

    From ``config.eval_paths[suite]`` when it has an entry (read like ``data.path``; a Hugging Face dataset's
    split ``suite``; a file with a split column: its rows of ``suite``), else from ``data.path``: a Hugging
    Face dataset's split ``suite``, or a file's rows whose split column names ``suite``. A suite that would be
    the training data itself — the training split, a file without a split column — is a :class:`DataError`.
    """
    source = config.source
    if source == "python" and config.loader:
        result = load_python(
            config.loader, suite, config.eval_size, columns=config.columns, on_bad_row=config.on_bad_row
        )
        return result, f"{config.loader}({suite!r}, {config.eval_size})"
    if source not in FILE_SOURCES:
        raise DataError(f"load_heldout reads file sources ({', '.join(FILE_SOURCES)}), not {source!r}")
    own = suite in config.eval_paths
    path = config.eval_paths[suite] if own else config.path
    setting = f"data.eval_paths.{suite}" if own else "data.path"
    if not path:
        raise DataError(f"data.path is required when data.source is {source!r}")
    if not own and suite == config.split:
        raise DataError(
            f"data.eval_suites: suite {suite!r} is the training split (data.split): name a held-out split, "
            f"or give it a file of its own in data.eval_paths.{suite}"
        )
    single = _is_single_file(source, path)
    if not own and single and config.split_column is None:
        raise _no_heldout(config, suite)
    try:
        result = load_problems(
            source,
            path,
            split=suite,
            columns=config.columns,
            on_bad_row=config.on_bad_row,
            cache_dir=cache_dir,
            split_column=config.split_column,
            setting=setting,
        )
    except DataError as exc:
        text = str(exc)
        raise DataError(text if text.startswith(setting) else f"{setting}: {text}") from None
    if not own and single and result.splits is None:
        raise _no_heldout(config, suite)
    where = f"{path}" + (f" ({config.split_column} {suite!r})" if result.splits is not None else "")
    if not single:
        where = f"{path}[{suite}]"
    return result, where


def check_heldout(config: DataConfig) -> None:
    """Check, without loading the data or asking the network, that every held-out suite of a file source has
    data of its own: an existing ``data.eval_paths`` file (whose split column, if any, names the suite), a split
    of a saved dataset (its ``dataset_dict.json``), or rows of the training file whose split column names the
    suite. Hub names and hub-style folders are accepted as they are (their splits are known only on load).
    Raises :class:`DataError` naming the key and value."""
    source = config.source
    if source not in FILE_SOURCES:
        return
    for suite in config.eval_suites:
        own = suite in config.eval_paths
        path = config.eval_paths[suite] if own else config.path
        setting = f"data.eval_paths.{suite}" if own else "data.path"
        if not path:
            continue  # data.path missing is the configuration's own error
        if not own and suite == config.split:
            raise DataError(f"data.eval_suites: suite {suite!r} is the training split (data.split)")
        if _is_single_file(source, path):
            try:
                values = split_values(source, path, config.split_column)
            except DataError as exc:
                raise DataError(f"{setting}: {exc}") from None
            if values is None:
                if not own:
                    raise _no_heldout(config, suite)
            elif suite not in values:
                raise DataError(
                    f"data.eval_suites: suite {suite!r}: no row of {path} ({setting}) has "
                    f"{config.split_column} {suite!r}; the column holds {_split_list(values)}"
                )
            continue
        folder = Path(path).expanduser()
        if not folder.exists():
            if source in ("jsonl", "parquet") or not _HUB_NAME.match(str(path)):
                raise DataError(f"{setting}: {path} does not exist")
            continue  # a Hub name: not asked here
        saved = folder / "dataset_dict.json"
        if saved.is_file():
            try:
                splits = json.loads(saved.read_text()).get("splits")
            except (OSError, ValueError, AttributeError):
                splits = None
            if isinstance(splits, list) and suite not in splits:
                raise DataError(
                    f"data.eval_suites: suite {suite!r} is not a split of the saved dataset {path} ({setting}); "
                    f"splits: {', '.join(map(str, splits))}"
                )


def load_python(
    target: str,
    split: str,
    size: int,
    *,
    columns: Mapping[str, str] | None = None,
    on_bad_row: OnBadRow = "error",
    setting: str = "data.loader",
) -> LoadResult:
    """The problems ``target`` ("module:function", see :mod:`cepo.hooks`) returns for ``function(split, size)``.

    It must return a list (or another iterable) whose items are :class:`cepo_proto.Problem` records, kept as
    they are, or rows: dicts with ``problem`` and ``answer`` (``id``, ``images``, ``metadata`` optional;
    ``columns`` maps other keys onto them), checked like a file's rows — a bad one stops the load naming the
    row (counted from 1) and field, or with ``on_bad_row="skip"`` is left out. Ids must be unique; a row
    without one gets ``<split>:<row>``. ``size`` is what the caller wants (``data.size`` for training,
    ``data.eval_size`` for a held-out suite, which is cut to it); the function may return fewer or more.
    """
    from cepo.hooks import resolve

    label = f"{setting} {target} (split {split!r})"
    try:
        function = resolve(target)
    except ValueError as exc:
        raise DataError(f"{setting}: {exc}") from None
    try:
        items = function(split, size)
    except Exception as exc:
        raise DataError(f"{label} raised {type(exc).__name__}: {exc}") from exc
    expected = "a list of cepo_proto.Problem or of dicts with 'problem' and 'answer'"
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
        raise DataError(f"{label} returned {type(items).__name__}, not {expected}")
    rows = _Rows(
        label=label,
        id_stem=split,
        unit="row",
        source="python",
        split=split,  # recorded in each problem's metadata; no rows are selected by a column
        columns=columns,
        on_bad_row=on_bad_row,
        base_dir=None,
        split_column=None,
    )
    try:
        for row, item in enumerate(items, start=1):
            if isinstance(item, Problem):
                rows.rows += 1
                first = rows._ids.get(item.id)
                if first is not None:
                    rows.bad(row, "id", f"duplicate id {item.id!r} (first seen at row {first})")
                    continue
                rows._ids[item.id] = row
                rows.problems.append(item)
            elif isinstance(item, Mapping):
                rows.add(row, item)
            else:
                rows.rows += 1
                rows.bad(row, None, f"a {type(item).__name__}, not a cepo_proto.Problem or a dict")
    except DataError:
        raise
    except Exception as exc:  # a generator that fails part-way
        raise DataError(f"{label}: iterating its result raised {type(exc).__name__}: {exc}") from exc
    if rows.rows == 0:
        raise DataError(f"{label} returned no problems")
    return rows.result()


def _check_generated(problems: Any, label: str) -> list[Problem]:
    if not isinstance(problems, list) or not all(isinstance(p, Problem) for p in problems):
        raise DataError(f"{label} did not return a list of Problem records")
    if not problems:
        raise DataError(f"{label} generated no problems")
    seen: set[str] = set()
    for problem in problems:
        if problem.id in seen:
            raise DataError(f"{label} generated the id {problem.id!r} twice")
        seen.add(problem.id)
    return problems


def _split_seed(seed: int, split: str) -> int:
    """The generation seed of ``split``: ``seed`` itself for 'train', a stable derived seed otherwise."""
    if split == "train":
        return seed
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{split}".encode()).digest()[:4], "big")


def from_config(
    config: DataConfig, *, split: str | None = None, cache_dir: str | Path | None = None
) -> LoadResult:
    """Load (or generate) the problems a :class:`cepo.config.DataConfig` describes.

    ``split`` overrides ``config.split`` (e.g. for evaluation). ``arithmetic`` calls
    ``cepo.tasks.arithmetic.generate(split, size, seed)``; ``reasoning_gym`` splits ``size`` over
    ``config.tasks`` and generates with ``config.seed`` for 'train' (a seed derived from it for other splits);
    ``python`` calls ``data.loader`` with (split, ``config.size``) (:func:`load_python`).
    """
    import importlib

    split = config.split if split is None else split
    source = config.source
    if source in FILE_SOURCES:
        if not config.path:
            raise DataError(f"data.path is required when data.source is {source!r}")
        return load_problems(
            source,
            config.path,
            split=split,
            columns=config.columns,
            on_bad_row=config.on_bad_row,
            cache_dir=cache_dir,
            split_column=config.split_column,
            setting="data.path",
        )
    if source == "arithmetic":
        try:
            arithmetic = importlib.import_module("cepo.tasks.arithmetic")
        except ImportError as exc:
            raise DataError(f"the arithmetic task generator is not available: {exc}") from None
        return LoadResult(
            _check_generated(arithmetic.generate(split, config.size, config.seed), "arithmetic")
        )
    if source == "reasoning_gym":
        from cepo.tasks import reasoning_gym

        problems = reasoning_gym.generate_mixture(
            list(config.tasks), config.size, _split_seed(config.seed, split)
        )
        problems = [p.model_copy(update={"metadata": {**p.metadata, "split": split}}) for p in problems]
        return LoadResult(_check_generated(problems, "reasoning_gym"))
    if source == "python":
        if not config.loader:
            raise DataError("data.loader is required when data.source is 'python'")
        return load_python(
            config.loader, split, config.size, columns=config.columns, on_bad_row=config.on_bad_row
        )
    raise DataError(
        f"unknown data source {source!r}; sources: arithmetic, {', '.join(FILE_SOURCES)}, reasoning_gym, python"
    )
