"""Property-based fuzzing of everything a user hands in: run configurations (YAML files and ``--set`` strings) and
data files (JSONL and Parquet). Every case either loads or fails with the project's own error (ConfigError,
DataError), never another exception, a crash or a hang, and a loader writes nothing next to its input."""

from __future__ import annotations

import datetime
import gzip
import io
import json
import string
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cepo.config import ConfigError, RunConfig, apply_overrides, load_config, parse_override
from cepo.data import DataError, LoadResult, load_problems
from cepo.data.loaders import FIELDS

REPO = Path(__file__).resolve().parents[1]
FUZZ = settings(
    max_examples=150,
    deadline=timedelta(seconds=3),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
pytestmark = pytest.mark.timeout(300)  # a hang fails the test instead of stalling the suite

# ---------------------------------------------------------------------------------------------- values

# Scalars a YAML or JSON document can hold, with the awkward ones on purpose: huge ints, NaN, ±inf, control
# characters, brackets (rich markup), surrogate-free unicode.
_awkward_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        ["", " ", "[unclosed", "[red]x[/red]", "~nouser/x.png", "<image>", "null", "1e999", "\x00"]
    ),
    st.text(alphabet=string.printable, max_size=12),
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    _awkward_text,
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(_awkward_text, st.integers()), inner, max_size=4),
    ),
    max_leaves=12,
)

# ---------------------------------------------------------------------------------------------- config

# Every key of the configuration tree, so that fuzzed values land on real fields as often as not
_KEYS: list[str] = []


def _collect(model: Any, prefix: str) -> None:
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            _KEYS.append(prefix + name)
            _collect(annotation, f"{prefix}{name}.")
        else:
            _KEYS.append(prefix + name)


_collect(RunConfig, "")
_SECTIONS = [k for k in _KEYS if "." not in k]

_keys = st.one_of(
    st.sampled_from(_KEYS),
    st.sampled_from(_KEYS).map(lambda k: k + ".extra"),
    st.text(alphabet=string.ascii_lowercase + "._", min_size=1, max_size=20),
)
# YAML-ish value text for --set: real YAML of random values, nasty literals, plain random text
_value_texts = st.one_of(
    _values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()),
    st.sampled_from(
        [
            "[unclosed",
            "{a: 1",
            "!!python/object:os.system ls",
            "!!binary ###",
            "&a [*a]",
            "*undefined",
            "1" * 5000,  # beyond Python's int-from-string digit limit
            "[" * 400 + "]" * 400,  # nesting beyond the recursion limit
            "{" * 400,
            "- a\n- b",
            "a: b: c",
            "\t",
            "2001-12-14",
            ".nan",
            "-.inf",
            "0x1F",
            "!!float nope",
            "2001-02-30",
            "!!bool maybe",
            "!!int 0x",
            "!!binary a",
            "!!set [a]",
            "%YAML 1.1\n---\n1",
        ]
    ),
    st.text(max_size=40),
)
_overrides = st.one_of(
    st.tuples(_keys, _value_texts).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=40),
)


_BOMB = "\n".join(
    ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    + ["name: *a8"]
)  # a few hundred bytes of YAML whose full repr is gigabytes


def _config_document() -> st.SearchStrategy[str]:
    """YAML text: dumped random trees (shaped like the config or not), mutated real configs, raw text."""
    section = st.dictionaries(
        st.one_of(st.sampled_from([k.split(".")[-1] for k in _KEYS]), _awkward_text), _values, max_size=5
    )
    shaped = st.dictionaries(st.sampled_from(_SECTIONS), st.one_of(section, _values), max_size=6)
    dumped = st.one_of(shaped, _values).map(lambda v: yaml.safe_dump(v, allow_unicode=True))
    real = (REPO / "configs" / "tiny.yaml").read_text()

    @st.composite
    def mutated(draw: st.DrawFn) -> str:
        text = real
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(text)))
            cut = draw(st.integers(0, 20))
            text = (
                text[:at]
                + draw(st.sampled_from(["", ":", "[", "{", "\n  ", "- ", "\t", "&x ", "*x", "'"]))
                + text[at + cut :]
            )
        return text

    return st.one_of(
        dumped,
        mutated(),
        st.text(max_size=200),
        st.sampled_from(["", "---", "[" * 400, "a: " + "9" * 5000, _BOMB]),
    )


def _loads_or_config_error(fn, *args) -> Any:
    try:
        return fn(*args)
    except ConfigError as exc:
        assert str(exc).strip(), "a ConfigError must say what is wrong"
        return exc


@FUZZ
@given(text=_overrides)
def test_parse_override_fuzz(text: str) -> None:
    result = _loads_or_config_error(parse_override, text)
    if not isinstance(result, ConfigError):
        path, _value = result
        assert path and all(isinstance(p, str) and p for p in path)


@FUZZ
@given(
    overrides=st.lists(_overrides, max_size=4),
    base=st.one_of(st.just({}), st.dictionaries(st.sampled_from(_SECTIONS), _values, max_size=3)),
)
def test_apply_overrides_and_load_fuzz(overrides: list[str], base: dict) -> None:
    result = _loads_or_config_error(apply_overrides, base, overrides)
    if not isinstance(result, ConfigError):
        assert isinstance(result, dict)
    result = _loads_or_config_error(load_config, None, overrides)
    assert isinstance(result, RunConfig | ConfigError)


@FUZZ
@given(
    document=_config_document(),
    raw=st.binary(max_size=64),
    use_raw=st.booleans(),
    overrides=st.lists(_overrides, max_size=2),
)
def test_load_config_file_fuzz(document: str, raw: bytes, use_raw: bool, overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_bytes(raw if use_raw else document.encode("utf-8", "surrogatepass"))
        result = _loads_or_config_error(load_config, path, overrides)
        assert isinstance(result, RunConfig | ConfigError)
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["run.yaml"]


def test_load_config_unreadable_is_config_error(tmp_path: Path) -> None:
    folder = tmp_path / "a-folder.yaml"
    folder.mkdir()
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(folder)
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(latin)


# ---------------------------------------------------------------------------------------------- data

_row_values = st.one_of(
    _values,
    st.text(min_size=1, max_size=10).map(lambda t: t + " <image>"),
    st.text(min_size=5000, max_size=5000, alphabet="ab"),  # a huge field
)
_rows = st.one_of(
    st.dictionaries(st.sampled_from([*FIELDS, "question", "extra"]), _row_values, max_size=6),
    st.fixed_dictionaries(
        {
            "problem": st.text(min_size=1, max_size=20),
            "answer": st.one_of(st.text(max_size=5), st.integers(), st.floats()),
        },
        optional={"id": _scalars, "images": _values, "metadata": _values},
    ),
    _values,
)


def _json_line(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


@st.composite
def _jsonl_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["rows", "truncated", "random", "raw-lines"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "raw-lines":
        lines = draw(
            st.lists(
                st.one_of(
                    st.binary(max_size=40),
                    st.sampled_from(
                        [
                            b"{",
                            b"[]",
                            b"null",
                            b"\xff\xfe",
                            b'{"problem": "x", "answer": ' + b"9" * 5000 + b"}",
                            b"[" * 100_000,
                            b'{"problem": "\\ud800", "answer": "1"}',
                            b"NaN",
                            b"   ",
                        ]
                    ),
                ),
                max_size=5,
            )
        )
        return b"\n".join(lines)
    lines = [_json_line(row) for row in draw(st.lists(_rows, min_size=1, max_size=6))]
    blob = b"\n".join(lines) + b"\n"
    if kind == "truncated":
        blob = blob[: draw(st.integers(0, len(blob)))]
    return blob


def _check_load(path: Path, on_bad_row: str, source: str) -> LoadResult | DataError:
    before = sorted(p.name for p in path.parent.iterdir())
    try:
        result: LoadResult | DataError = load_problems(source, path, on_bad_row=on_bad_row)
    except DataError as exc:
        assert str(exc).strip()
        result = exc
    assert sorted(p.name for p in path.parent.iterdir()) == before, "a loader wrote next to its input"
    if isinstance(result, LoadResult):
        assert result.problems, "an empty result must be a DataError"
        if on_bad_row == "error":
            assert result.skipped == []
        for problem in result.problems:
            assert problem.id and problem.problem.strip() and problem.answer.strip()
            assert problem.problem.count("<image>") == len(problem.images)
        for skipped in result.skipped:
            assert skipped.row >= 1 and skipped.reason and skipped.describe()
    return result


@FUZZ
@given(blob=_jsonl_bytes(), on_bad_row=st.sampled_from(["error", "skip"]), compress=st.booleans())
def test_jsonl_loader_fuzz(blob: bytes, on_bad_row: str, compress: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("data.jsonl.gz" if compress else "data.jsonl")
        if compress:
            packed = gzip.compress(blob)
            # sometimes a truncated gzip stream, sometimes plain bytes behind a .gz name
            packed = packed[: max(1, len(packed) - (len(blob) % 7))] if len(blob) % 3 == 0 else packed
            path.write_bytes(packed if len(blob) % 5 else blob)
        else:
            path.write_bytes(blob)
        result = _check_load(path, on_bad_row, "jsonl")
        if isinstance(result, LoadResult) and not compress:
            rows = [line for line in blob.split(b"\n") if line.strip()]
            assert len(result.problems) + len(result.skipped) == len(rows)


# Parquet columns of one arrow type each, with wrong types for the record fields on purpose
_columns = {
    "text": st.lists(
        st.one_of(st.none(), st.text(max_size=20), st.just("<image> x")), min_size=1, max_size=5
    ),
    "int": st.lists(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), min_size=1, max_size=5),
    "float": st.lists(st.one_of(st.none(), st.floats(allow_nan=True)), min_size=1, max_size=5),
    "bool": st.lists(st.booleans(), min_size=1, max_size=5),
    "binary": st.lists(
        st.one_of(st.none(), st.binary(max_size=20), st.just(b"\x89PNG\r\n\x1a\n" + b"0" * 8)),
        min_size=1,
        max_size=5,
    ),
    "list": st.lists(st.one_of(st.none(), st.lists(st.text(max_size=8), max_size=3)), min_size=1, max_size=5),
    "struct": st.lists(
        st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {
                    "bytes": st.one_of(st.none(), st.binary(max_size=8)),
                    "path": st.one_of(st.none(), st.text(max_size=8)),
                }
            ),
        ),
        min_size=1,
        max_size=5,
    ),
    "json": st.lists(
        st.one_of(st.none(), _values.map(lambda v: json.dumps(v, allow_nan=True))), min_size=1, max_size=5
    ),
    "decimal": st.lists(
        st.one_of(st.none(), st.decimals(min_value=-(10**6), max_value=10**6, places=3)),
        min_size=1,
        max_size=5,
    ),
    "date": st.lists(st.one_of(st.none(), st.dates()), min_size=1, max_size=5),
    "timestamp": st.lists(
        st.one_of(st.none(), st.datetimes(timezones=st.just(datetime.UTC))), min_size=1, max_size=5
    ),
    "map": st.lists(
        st.one_of(st.none(), st.lists(st.tuples(st.text(max_size=5), st.text(max_size=5)), max_size=3)),
        min_size=1,
        max_size=5,
    ),
    "large": st.lists(st.one_of(st.none(), st.text(max_size=20)), min_size=1, max_size=5),
    "dictionary": st.lists(
        st.one_of(st.none(), st.sampled_from(["a", "<image>", " "])), min_size=1, max_size=5
    ),
    "nested": st.lists(
        st.one_of(
            st.none(), st.lists(st.one_of(st.none(), st.fixed_dictionaries({"path": st.text(max_size=5)})))
        ),
        min_size=1,
        max_size=5,
    ),
}
_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_ARROW_TYPES = {
    "text": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "bool": pa.bool_(),
    "binary": pa.binary(),
    "list": pa.list_(pa.string()),
    "struct": _STRUCT,
    "json": pa.string(),
    "decimal": pa.decimal128(12, 3),
    "date": pa.date32(),
    "timestamp": pa.timestamp("s", tz="UTC"),
    "map": pa.map_(pa.string(), pa.string()),
    "large": pa.large_string(),
    "dictionary": pa.dictionary(pa.int32(), pa.string()),
    "nested": pa.list_(pa.struct([("path", pa.string())])),
}


@st.composite
def _parquet_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["table", "table", "truncated", "random"]))
    if kind == "random":
        return draw(
            st.one_of(st.binary(max_size=200), st.just(b"PAR1"), st.just(b"PAR1" + b"\x00" * 16 + b"PAR1"))
        )
    n_rows = draw(st.integers(0, 5))
    names = draw(
        st.lists(st.sampled_from([*FIELDS, "question", "other"]), min_size=1, max_size=5, unique=True)
    )
    arrays = {}
    for name in names:
        kind_of = draw(st.sampled_from(sorted(_columns)))
        values = draw(_columns[kind_of])
        values = (values * n_rows)[:n_rows]
        arrays[name] = pa.array(values, type=_ARROW_TYPES[kind_of])
    buffer = io.BytesIO()
    pq.write_table(pa.table(arrays), buffer)
    blob = buffer.getvalue()
    if kind == "truncated":
        blob = blob[: draw(st.integers(0, len(blob) - 1))]
    return blob


@FUZZ
@given(blob=_parquet_bytes(), on_bad_row=st.sampled_from(["error", "skip"]))
def test_parquet_loader_fuzz(blob: bytes, on_bad_row: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.parquet"
        path.write_bytes(blob)
        _check_load(path, on_bad_row, "parquet")


@FUZZ
@given(
    columns=st.dictionaries(
        st.one_of(st.text(max_size=6), st.integers()),
        st.one_of(st.sampled_from(FIELDS), st.text(max_size=6)),
        max_size=3,
    ),
    row=_rows,
)
def test_column_mapping_fuzz(columns: dict, row: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_bytes(_json_line(row) + b"\n")
        try:
            result = load_problems("jsonl", path, columns=columns, on_bad_row="skip")
        except DataError:
            return
        assert len(result.problems) == 1


# The inputs that escaped as other exceptions (or took unbounded time) before they were fixed, as plain checks
_FOUND_DATA = {
    "huge-int": b'{"problem": "x", "answer": '
    + b"9" * 5000
    + b"}",  # ValueError from json (4,300-digit limit)
    "deep": b"[" * 100_000,  # RecursionError from json
    "surrogate": b'{"problem": "\\ud800", "answer": "1"}',  # pydantic ValidationError from Problem
    "tilde-user": _json_line(
        {"problem": "<image> x", "answer": "1", "images": ["~nouser-cepo/x.png"]}
    ),  # RuntimeError
    "long-path": _json_line(
        {"problem": "<image> x", "answer": "1", "images": ["a" * 5000]}
    ),  # OSError: read error
    "metadata-huge-int": _json_line({"problem": "x", "answer": "1", "metadata": "9" * 5000}),  # ValueError
}


@pytest.mark.parametrize("name", sorted(_FOUND_DATA))
def test_found_data_rows(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(_FOUND_DATA[name] + b"\n")
    with pytest.raises(DataError, match=rf"^{path}: line 1"):
        load_problems("jsonl", path)
    path.write_bytes(_FOUND_DATA[name] + b"\n" + _json_line({"problem": "1+1?", "answer": 2}) + b"\n")
    result = load_problems("jsonl", path, on_bad_row="skip")
    assert [p.answer for p in result.problems] == ["2"] and [s.row for s in result.skipped] == [1]


@pytest.mark.parametrize(
    "override",
    [
        "x=" + "1" * 5000,
        "x=" + "[" * 1000,
        "name=!!float nope",
        "name=!!timestamp 2001-99-99",
        "name=2001-02-30",
        "name=!!bool x",
        "name=!!int x",
    ],
)
def test_found_overrides(override: str) -> None:
    with pytest.raises(ConfigError, match="is not valid YAML"):
        parse_override(override)


def test_found_config_files(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_BOMB)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"name: Input should be a valid string \(got \[\[\[") as caught:
        load_config(bomb)
    assert time.monotonic() - started < 5 and len(str(caught.value)) < 20_000
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: " + "[" * 1000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(deep)
