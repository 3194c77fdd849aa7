"""Problem loaders: JSONL, Parquet, Hugging Face folders, the Geo3k layout, column mapping and bad rows."""

from __future__ import annotations

import base64
import io
import json
import logging
import sys
import types
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cepo.config import DataConfig
from cepo.data import DataError, LoadResult, SkippedRow, from_config, load_problems, loaders
from cepo_proto.messages import Problem

# A 1×1 PNG, used when PIL is not installed.
_TINY_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def png_bytes(colour: tuple[int, int, int] = (255, 0, 0), size: int = 2) -> bytes:
    try:
        from PIL import Image
    except ImportError:
        return _TINY_PNG
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri_bytes(uri: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix), uri[:40]
    return base64.b64decode(uri[len(prefix) :])


def write_lines(path: Path, lines: list[Any]) -> Path:
    with path.open("wb") as handle:
        for line in lines:
            if isinstance(line, bytes):
                handle.write(line + b"\n")
            elif isinstance(line, str):
                handle.write(line.encode() + b"\n")
            else:
                handle.write(json.dumps(line).encode() + b"\n")
    return path


GOOD = [{"id": "g1", "problem": "What is 1+1?", "answer": "2"}, {"problem": "What is 2+3?", "answer": 5}]


# ---------------------------------------------------------------------------------------------------------
# JSONL


def test_jsonl_loads_records(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "train.jsonl",
        [
            *GOOD,
            "",
            {"problem": "Half of 5?", "answer": 2.5, "metadata": {"level": 1}},
            {"id": 7, "problem": "3.0?", "answer": 3.0},
        ],
    )
    result = load_problems("jsonl", path)
    assert isinstance(result, LoadResult)
    assert result.skipped == []
    assert [p.id for p in result.problems] == ["g1", "train:2", "train:4", "7"]
    assert [p.answer for p in result.problems] == ["2", "5", "2.5", "3"]
    assert all(isinstance(p, Problem) and p.images == [] for p in result.problems)
    third = result.problems[2]
    assert third.metadata == {
        "source": "jsonl",
        "file": str(path),
        "row": 4,
        "split": "train",
        "extra": {"level": 1},
    }
    assert "4 problems" in result.summary()


def test_jsonl_gzip(tmp_path: Path) -> None:
    import gzip

    path = tmp_path / "data.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("\n".join(json.dumps(row) for row in GOOD) + "\n")
    result = load_problems("jsonl", path)
    assert [p.id for p in result.problems] == ["g1", "data:2"]


# Each case: the third line of a file whose first two lines are GOOD; expected field and a reason fragment.
BAD_LINES: list[tuple[str, Any, str | None, str]] = [
    ("not_json", "{not json", None, "not valid JSON"),
    ("not_utf8", b'{"problem": "\xff\xfe", "answer": "1"}', None, "not valid UTF-8"),
    ("not_object", [1, 2], None, "expected an object, got list"),
    ("scalar", 17, None, "expected an object, got int"),
    ("missing_problem", {"answer": "1"}, "problem", "missing"),
    ("empty_problem", {"problem": "   ", "answer": "1"}, "problem", "is empty"),
    ("problem_type", {"problem": 5, "answer": "1"}, "problem", "expected a string, got int"),
    ("missing_answer", {"problem": "x"}, "answer", "missing"),
    ("null_answer", {"problem": "x", "answer": None}, "answer", "missing (null)"),
    ("empty_answer", {"problem": "x", "answer": ""}, "answer", "is empty"),
    ("bool_answer", {"problem": "x", "answer": True}, "answer", "boolean"),
    ("list_answer", {"problem": "x", "answer": [1]}, "answer", "expected a string or a number, got list"),
    ("nan_answer", '{"problem": "x", "answer": NaN}', "answer", "finite number"),
    ("id_type", {"id": 1.5, "problem": "x", "answer": "1"}, "id", "expected a string, got float"),
    ("empty_id", {"id": "", "problem": "x", "answer": "1"}, "id", "is empty"),
    (
        "duplicate_id",
        {"id": "g1", "problem": "x", "answer": "1"},
        "id",
        "duplicate id 'g1' (first seen at line 1)",
    ),
    ("placeholder_no_image", {"problem": "<image> x", "answer": "1"}, "images", "1 <image> placeholder(s)"),
    ("image_type", {"problem": "<image> x", "answer": "1", "images": [3]}, "images", "unsupported type int"),
    (
        "image_missing_file",
        {"problem": "<image> x", "answer": "1", "images": ["nope.png"]},
        "images",
        "not exist",
    ),
    (
        "image_bad_uri",
        {"problem": "<image>", "answer": "1", "images": ["data:text/plain,hi"]},
        "images",
        "data URI",
    ),
    ("metadata_type", {"problem": "x", "answer": "1", "metadata": [1]}, "metadata", "expected an object"),
    ("metadata_string", {"problem": "x", "answer": "1", "metadata": "{oops"}, "metadata", "not JSON"),
]


@pytest.mark.parametrize(
    ("line", "field", "reason"), [case[1:] for case in BAD_LINES], ids=[c[0] for c in BAD_LINES]
)
def test_jsonl_bad_row_errors_with_file_line_and_field(
    tmp_path: Path, line: Any, field: str | None, reason: str
) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [*GOOD, line])
    with pytest.raises(DataError) as info:
        load_problems("jsonl", path)
    message = str(info.value)
    where = f"{path}: line 3" + (f", field '{field}'" if field else ":")
    assert message.startswith(where), message
    assert reason in message


@pytest.mark.parametrize(
    ("line", "field", "reason"), [case[1:] for case in BAD_LINES], ids=[c[0] for c in BAD_LINES]
)
def test_jsonl_bad_row_skipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, line: Any, field: str | None, reason: str
) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [*GOOD, line, {"problem": "last", "answer": "9"}])
    with caplog.at_level(logging.WARNING, logger="cepo.data.loaders"):
        result = load_problems("jsonl", path, on_bad_row="skip")
    assert [p.id for p in result.problems] == ["g1", "bad:2", "bad:4"]
    assert len(result.skipped) == 1
    skipped = result.skipped[0]
    assert (skipped.file, skipped.row, skipped.field) == (str(path), 3, field)
    assert reason in skipped.reason
    assert "1 bad rows skipped" in result.summary()
    assert any("skipped 1 bad row(s) of 4" in record.getMessage() for record in caplog.records)


def test_jsonl_placeholder_count_must_match_images(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes())
    path = write_lines(
        tmp_path / "img.jsonl",
        [
            {"problem": "<image> and <image>", "answer": "1", "images": ["a.png", "a.png"]},
            {"problem": "no placeholder", "answer": "1", "images": ["a.png"]},
        ],
    )
    with pytest.raises(
        DataError, match=r"line 2, field 'images': the problem has 0 <image> placeholder\(s\) but"
    ):
        load_problems("jsonl", path)
    result = load_problems("jsonl", path, on_bad_row="skip")
    assert result.problems[0].images == [str((tmp_path / "a.png").resolve())] * 2
    assert [(s.row, s.field) for s in result.skipped] == [(2, "images")]


def test_jsonl_images_accept_paths_uris_and_a_single_value(tmp_path: Path) -> None:
    png = png_bytes()
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "p.png").write_bytes(png)
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    path = write_lines(
        tmp_path / "img.jsonl",
        [
            {
                "problem": "<image><image>",
                "answer": "1",
                "images": ["pics/p.png", str(tmp_path / "pics" / "p.png")],
            },
            {"problem": "<image>", "answer": "1", "images": uri},
            {"problem": "<image>", "answer": "1", "images": ["https://example.org/x.png"]},
        ],
    )
    problems = load_problems("jsonl", path).problems
    assert problems[0].images == [str((tmp_path / "pics" / "p.png").resolve())] * 2
    assert problems[1].images == [uri]
    assert problems[2].images == ["https://example.org/x.png"]


def test_every_row_bad_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "all_bad.jsonl", ["{", {"answer": "1"}])
    with pytest.raises(DataError, match=r"all_bad.jsonl: all 2 rows were bad and skipped"):
        load_problems("jsonl", path, on_bad_row="skip")


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty.jsonl holds no rows"):
        load_problems("jsonl", path, on_bad_row="skip")


def test_missing_paths_and_unknown_formats(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(DataError, match=rf"JSONL file {missing} does not exist"):
        load_problems("jsonl", missing)
    with pytest.raises(DataError, match=r"Parquet file .*missing.parquet does not exist"):
        load_problems("parquet", tmp_path / "missing.parquet")
    with pytest.raises(DataError, match=r"is a folder, not a JSONL file"):
        load_problems("jsonl", tmp_path)
    with pytest.raises(
        DataError, match=r"unknown data source 'csv' for .*x.csv; file sources: jsonl, parquet, hf"
    ):
        load_problems("csv", tmp_path / "x.csv")
    with pytest.raises(DataError, match=r"Hugging Face dataset folder .*nowhere does not exist"):
        load_problems("hf", str(tmp_path / "nowhere"))
    odd = tmp_path / "data.csv"
    odd.write_text("problem,answer\n")
    with pytest.raises(DataError, match=r"data.csv: unknown data file format"):
        load_problems("hf", odd)
    with pytest.raises(DataError, match="on_bad_row must be"):
        load_problems("jsonl", write_lines(tmp_path / "ok.jsonl", GOOD), on_bad_row="ignore")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# Column mapping


def test_column_mapping(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "mapped.jsonl",
        [
            {"uid": "q1", "question": "1+1?", "solution": 2, "answer": "ignored", "problem": "ignored"},
            {"uid": "q2", "question": "2+2?", "solution": "4"},
        ],
    )
    columns = {"question": "problem", "solution": "answer", "uid": "id"}
    problems = load_problems("jsonl", path, columns=columns).problems
    assert [(p.id, p.problem, p.answer) for p in problems] == [("q1", "1+1?", "2"), ("q2", "2+2?", "4")]


def test_column_mapping_names_the_source_column_of_a_bad_field(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "mapped.jsonl", [{"question": "1+1?", "solution": 2}, {"problem": "x", "solution": 1}]
    )
    with pytest.raises(DataError, match=r"line 2, field 'problem': missing \(source column 'question'\)"):
        load_problems("jsonl", path, columns={"question": "problem", "solution": "answer"})


def test_column_mapping_swapping_names(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "swap.jsonl", [{"problem": "4", "answer": "2+2?"}])
    (problem,) = load_problems("jsonl", path, columns={"problem": "answer", "answer": "problem"}).problems
    assert (problem.problem, problem.answer) == ("2+2?", "4")


def test_bad_column_mappings(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "x.jsonl", GOOD)
    with pytest.raises(DataError, match=r"'question' → 'prompt': unknown record field"):
        load_problems("jsonl", path, columns={"question": "prompt"})
    with pytest.raises(DataError, match=r"both 'a' and 'b' map onto field 'answer'"):
        load_problems("jsonl", path, columns={"a": "answer", "b": "answer"})


# ---------------------------------------------------------------------------------------------------------
# Parquet


def test_parquet_loads_and_reports_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    table = pa.table(
        {
            "question": ["1+1?", None, "2+2?", "3+3?"],
            "answer": pa.array([2, 3, 4, 6], type=pa.int64()),
        }
    )
    pq.write_table(table, path, row_group_size=2)
    with pytest.raises(DataError) as info:
        load_problems("parquet", path, columns={"question": "problem"})
    assert str(info.value).startswith(
        f"{path}: row 2, field 'problem': missing (null) (source column 'question')"
    )

    result = load_problems("parquet", path, columns={"question": "problem"}, on_bad_row="skip")
    assert [(p.id, p.answer) for p in result.problems] == [
        ("train:1", "2"),
        ("train:3", "4"),
        ("train:4", "6"),
    ]
    assert result.skipped == [
        SkippedRow(str(path), 2, "problem", "missing (null) (source column 'question')", "row")
    ]


def test_parquet_duplicate_ids_and_floats(tmp_path: Path) -> None:
    path = tmp_path / "ids.parquet"
    pq.write_table(
        pa.table({"id": ["a", "b", "a"], "problem": ["p", "q", "r"], "answer": [0.5, 1.0, 2.0]}), path
    )
    with pytest.raises(
        DataError, match=r"ids.parquet: row 3, field 'id': duplicate id 'a' \(first seen at row 1\)"
    ):
        load_problems("parquet", path)
    result = load_problems("parquet", path, on_bad_row="skip")
    assert [(p.id, p.answer) for p in result.problems] == [("a", "0.5"), ("b", "1")]


def test_parquet_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"cannot read Parquet file .*broken.parquet"):
        load_problems("parquet", path)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face folders and the Geo3k layout


def geo3k_rows(red: bytes, blue: bytes) -> dict[str, list[Any]]:
    return {
        "problem": ["<image>Find x.", "<image> and <image>: find the angle.", "No figure: 2+2?"],
        "answer": ["3", "45", "4"],
        "images": [
            [{"bytes": red, "path": None}],
            [{"bytes": red, "path": None}, {"bytes": blue, "path": None}],
            [],
        ],
    }


def geo3k_dataset(rows: dict[str, list[Any]]) -> Any:
    from datasets import Dataset, Features, Image, List, Value

    features = Features({"problem": Value("string"), "answer": Value("string"), "images": List(Image())})
    return Dataset.from_dict(rows, features=features)


def check_geo3k(problems: list[Problem], red: bytes, blue: bytes) -> None:
    assert [p.answer for p in problems] == ["3", "45", "4"]
    assert [len(p.images) for p in problems] == [1, 2, 0]
    assert [data_uri_bytes(uri) for uri in problems[1].images] == [red, blue]
    assert data_uri_bytes(problems[0].images[0]) == red
    for problem in problems:
        assert problem.problem.count("<image>") == len(problem.images)


def test_geo3k_dataset_dict_save_to_disk(tmp_path: Path) -> None:
    from datasets import DatasetDict

    red, blue = png_bytes((255, 0, 0)), png_bytes((0, 0, 255))
    rows = geo3k_rows(red, blue)
    test_rows = {key: values[:1] for key, values in rows.items()}
    folder = tmp_path / "geometry3k"
    DatasetDict({"train": geo3k_dataset(rows), "test": geo3k_dataset(test_rows)}).save_to_disk(str(folder))

    train = load_problems("hf", folder, split="train")
    check_geo3k(train.problems, red, blue)
    assert [p.id for p in train.problems] == [
        "geometry3k:train:1",
        "geometry3k:train:2",
        "geometry3k:train:3",
    ]
    assert train.problems[0].metadata == {
        "source": "hf",
        "file": f"{folder}[train]",
        "row": 1,
        "split": "train",
    }
    test = load_problems("hf", str(folder), split="test")
    assert [p.id for p in test.problems] == ["geometry3k:test:1"]
    with pytest.raises(DataError, match=r"has no split 'validation'; available: train, test"):
        load_problems("hf", folder, split="validation")


def test_geo3k_image_mismatch_in_a_saved_dataset(tmp_path: Path) -> None:
    red, blue = png_bytes((255, 0, 0)), png_bytes((0, 0, 255))
    rows = geo3k_rows(red, blue)
    rows["problem"][1] = "only one <image> here"
    folder = tmp_path / "geo"
    geo3k_dataset(rows).save_to_disk(str(folder))  # a single Dataset, no split recorded
    with pytest.raises(DataError) as info:
        load_problems("hf", folder)
    assert str(info.value).startswith(f"{folder}[train]: row 2, field 'images': the problem has 1 <image>")
    result = load_problems("hf", folder, on_bad_row="skip")
    assert [p.id for p in result.problems] == ["geo:train:1", "geo:train:3"]
    assert [(s.file, s.row, s.field) for s in result.skipped] == [(f"{folder}[train]", 2, "images")]


def test_image_paths_that_exist_win_over_bytes_and_pil_images_become_data_uris(tmp_path: Path) -> None:
    red = png_bytes((255, 0, 0))
    (tmp_path / "figs").mkdir()
    picture = tmp_path / "figs" / "figure.png"
    picture.write_bytes(red)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = [
        [{"bytes": red, "path": str(picture)}],  # an absolute path that exists wins
        [{"bytes": None, "path": "figs/figure.png"}],  # no bytes: relative to the data file's folder
        [{"bytes": red, "path": "figs/figure.png"}],  # bytes beat a relative name
        [{"bytes": None, "path": "figs/gone.png"}],  # neither
    ]
    table = pa.table(
        {"problem": ["<image>"] * 4, "answer": ["1"] * 4, "images": pa.array(images, type=pa.list_(image))}
    )
    path = tmp_path / "paths.parquet"
    pq.write_table(table, path)
    result = load_problems("parquet", path, on_bad_row="skip")
    first, second, third = result.problems
    assert first.images == second.images == [str(picture.resolve())]
    assert data_uri_bytes(third.images[0]) == red
    assert [(s.row, s.field) for s in result.skipped] == [(4, "images")]
    assert "no bytes and no existing path" in result.skipped[0].reason

    # save_to_disk embeds the bytes and keeps only the base name: the bytes are used.
    folder = tmp_path / "saved"
    geo3k_dataset(
        {"problem": ["<image>"], "answer": ["1"], "images": [[{"bytes": None, "path": str(picture)}]]}
    ).save_to_disk(str(folder))
    (saved,) = load_problems("hf", folder).problems
    assert data_uri_bytes(saved.images[0]) == red

    from PIL import Image as pil

    uri = loaders._image_to_str(pil.new("RGB", (3, 3), (0, 255, 0)), 0, None)
    assert pil.open(io.BytesIO(data_uri_bytes(uri))).size == (3, 3)


def test_hf_saved_dataset_with_another_split_is_refused(tmp_path: Path) -> None:
    from datasets import Dataset, NamedSplit

    folder = tmp_path / "test-split"
    Dataset.from_dict({"problem": ["p"], "answer": ["a"]}, split=NamedSplit("test")).save_to_disk(str(folder))
    assert [p.id for p in load_problems("hf", folder, split="test").problems] == ["test-split:test:1"]
    with pytest.raises(DataError, match=r"holds split 'test', not the requested 'train'"):
        load_problems("hf", folder, split="train")


def test_hub_style_parquet_folder(tmp_path: Path) -> None:
    red, blue = png_bytes((255, 0, 0)), png_bytes((0, 0, 255))
    folder = tmp_path / "hub"
    (folder / "data").mkdir(parents=True)
    rows = geo3k_rows(red, blue)
    geo3k_dataset(rows).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    geo3k_dataset({k: v[2:] for k, v in rows.items()}).to_parquet(
        str(folder / "data" / "test-00000-of-00001.parquet")
    )
    cache = tmp_path / "cache"

    train = load_problems("hf", folder, split="train", cache_dir=cache)
    check_geo3k(train.problems, red, blue)
    test = load_problems("hf", folder, split="test", cache_dir=cache)
    assert [p.problem for p in test.problems] == ["No figure: 2+2?"]
    with pytest.raises(DataError, match=r"Unknown split \"validation\""):
        load_problems("hf", folder, split="validation", cache_dir=cache)

    # A single parquet file of that layout loads directly, too (images stored as {bytes, path} structs).
    single = load_problems("parquet", folder / "data" / "train-00000-of-00001.parquet")
    check_geo3k(single.problems, red, blue)
    assert single.problems[0].id == "train-00000-of-00001:1"


def test_hub_style_jsonl_folder_with_mapping_and_bad_rows(tmp_path: Path) -> None:
    folder = tmp_path / "hubj"
    (folder / "data").mkdir(parents=True)
    write_lines(
        folder / "data" / "train.jsonl",
        [{"q": "1+1?", "a": "2"}, {"q": "", "a": "3"}, {"q": "2+2?", "a": "4"}],
    )
    columns = {"q": "problem", "a": "answer"}
    with pytest.raises(
        DataError, match=r"hubj\[train\]: row 2, field 'problem': is empty \(source column 'q'\)"
    ):
        load_problems("hf", folder, columns=columns, cache_dir=tmp_path / "cache")
    result = load_problems("hf", folder, columns=columns, on_bad_row="skip", cache_dir=tmp_path / "cache")
    assert [p.problem for p in result.problems] == ["1+1?", "2+2?"]
    assert [(s.row, s.field) for s in result.skipped] == [(2, "problem")]


def test_empty_data_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"cannot load a Hugging Face dataset from .*empty"):
        load_problems("hf", tmp_path / "empty", cache_dir=tmp_path / "cache")


def test_hub_name_that_cannot_be_fetched(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls: list[tuple[Any, ...]] = []

    def offline(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs.get("split")))
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(loaders, "hub_unreachable", lambda: None)  # the Hub answers, the load fails
    with pytest.raises(
        DataError, match=r"owner/no-such-dataset is not a local file or folder, and loading it"
    ):
        load_problems("hf", "owner/no-such-dataset", split="test")
    assert calls == [(("owner/no-such-dataset",), "test")]


# ---------------------------------------------------------------------------------------------------------
# from_config


def test_from_config_file_sources(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "cfg.jsonl", [{"question": "q", "answer": "1"}, {"question": "", "answer": "2"}]
    )
    config = DataConfig(source="jsonl", path=str(path), columns={"question": "problem"}, on_bad_row="skip")
    result = from_config(config)
    assert [p.problem for p in result.problems] == ["q"]
    assert [(s.row, s.field) for s in result.skipped] == [(2, "problem")]
    with pytest.raises(DataError, match="line 2, field 'problem'"):
        from_config(config.model_copy(update={"on_bad_row": "error"}))

    parquet = tmp_path / "cfg.parquet"
    pq.write_table(pa.table({"problem": ["p"], "answer": [1]}), parquet)
    result = from_config(DataConfig(source="parquet", path=str(parquet), split="test"))
    assert result.problems[0].metadata["split"] == "test"


def test_from_config_arithmetic_dispatches_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int, int]] = []

    def generate(split: str, n: int, seed: int) -> list[Problem]:
        calls.append((split, n, seed))
        return [Problem(id=f"a{i}", problem=f"{i}+1?", answer=str(i + 1)) for i in range(n)]

    fake = types.ModuleType("cepo.tasks.arithmetic")
    fake.generate = generate  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cepo.tasks.arithmetic", fake)
    result = from_config(DataConfig(source="arithmetic", path=None, size=4, seed=9), split="test")
    assert calls == [("test", 4, 9)]
    assert [p.id for p in result.problems] == ["a0", "a1", "a2", "a3"]

    fake.generate = lambda split, n, seed: [Problem(id="same", problem="p", answer="a")] * 2  # type: ignore[attr-defined]
    with pytest.raises(DataError, match="arithmetic generated the id 'same' twice"):
        from_config(DataConfig(source="arithmetic", path=None))


def test_from_config_reasoning_gym() -> None:
    config = DataConfig(
        source="reasoning_gym", path=None, tasks=["basic_arithmetic", "gsm_symbolic"], size=5, seed=3
    )
    train = from_config(config).problems
    assert [p.id for p in train] == [
        "rg:basic_arithmetic:3:0",
        "rg:basic_arithmetic:3:1",
        "rg:basic_arithmetic:3:2",
        "rg:gsm_symbolic:3:0",
        "rg:gsm_symbolic:3:1",
    ]
    assert all(p.metadata["split"] == "train" for p in train)
    test = from_config(config, split="test").problems
    assert {p.metadata["seed"] for p in test} != {3}
    assert [p.problem for p in test] != [p.problem for p in train]
    assert from_config(config).problems == train  # deterministic


# ---------------------------------------------------------------------------------------------------------
# Splits inside one file, held-out data of file sources, the Hub check


def split_rows(n_train: int = 6, n_test: int = 3) -> list[dict[str, Any]]:
    rows = [{"problem": f"train {i}?", "answer": str(i), "split": "train"} for i in range(n_train)]
    return rows + [{"problem": f"test {i}?", "answer": str(i), "split": "test"} for i in range(n_test)]


def test_split_column_selects_the_rows_of_a_split(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "all.jsonl", split_rows())
    train = load_problems("jsonl", path)  # split "train" by default
    assert [p.problem for p in train.problems] == [f"train {i}?" for i in range(6)]
    assert train.splits == {"train": 6, "test": 3} and train.skipped == []
    test = load_problems("jsonl", path, split="test")
    assert [p.problem for p in test.problems] == ["test 0?", "test 1?", "test 2?"]
    assert [p.metadata["row"] for p in test.problems] == [7, 8, 9]  # rows keep the file's numbering
    assert [p.id for p in test.problems] == ["all:7", "all:8", "all:9"]
    with pytest.raises(
        DataError,
        match=r"no row has split 'validation' \(column 'split' holds 'train' \(6 rows\), 'test' \(3 rows\)\)",
    ):
        load_problems("jsonl", path, split="validation")
    whole = load_problems("jsonl", path, split_column=None)
    assert len(whole.problems) == 9 and whole.splits is None
    assert loaders.load_jsonl(path).splits is None  # no split asked for: the whole file

    table = pa.table({k: [r[k] for r in split_rows()] for k in ("problem", "answer", "split")})
    parquet = tmp_path / "all.parquet"
    pq.write_table(table, parquet)
    assert len(load_problems("parquet", parquet, split="test").problems) == 3
    assert len(load_problems("hf", parquet, split="test").problems) == 3  # a single file through hf
    assert len(load_problems("hf", path, split="test").problems) == 3
    assert loaders.split_values("parquet", parquet) == {"train": 6, "test": 3}
    assert loaders.split_values("jsonl", path) == {"train": 6, "test": 3}
    assert loaders.split_values("hf", path) == {"train": 6, "test": 3}
    assert loaders.split_values("jsonl", path, None) is None
    plain = write_lines(tmp_path / "plain.jsonl", GOOD)
    assert loaders.split_values("jsonl", plain) is None
    pq.write_table(pa.table({"problem": ["p"], "answer": ["1"]}), tmp_path / "plain.parquet")
    assert loaders.split_values("parquet", tmp_path / "plain.parquet") is None
    file_without_split = load_problems("jsonl", plain, split="test")
    assert len(file_without_split.problems) == 2 and file_without_split.splits is None


def test_split_column_bad_values(tmp_path: Path) -> None:
    rows = [
        *split_rows(2, 1),
        {"problem": "none?", "answer": "1"},
        {"problem": "x?", "answer": "1", "split": 3},
    ]
    path = write_lines(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError, match=r"line 5, field 'split': the split column holds 3, not a split name"):
        load_problems("jsonl", path)
    result = load_problems("jsonl", path, on_bad_row="skip")
    assert [p.problem for p in result.problems] == ["train 0?", "train 1?"]
    assert [(s.row, s.field) for s in result.skipped] == [(4, "split"), (5, "split")]
    assert "names no split, while other rows do" in result.skipped[0].reason
    only_missing = write_lines(
        tmp_path / "missing.jsonl", [*split_rows(2, 1), {"problem": "n?", "answer": "1"}]
    )
    with pytest.raises(DataError, match=r"line 4, field 'split': names no split"):
        load_problems("jsonl", only_missing)
    bad_rows = write_lines(
        tmp_path / "bad.jsonl", [{"problem": "", "answer": "1", "split": "train"}, *split_rows(0, 1)]
    )
    with pytest.raises(DataError, match=r"all 1 rows of split 'train' were bad and skipped"):
        load_problems("jsonl", bad_rows, on_bad_row="skip")


def test_problem_key_normalises_text() -> None:
    key = loaders.problem_key
    assert key("What is  1+1?\n") == key("what is 1+1?") == key("ＷＨＡＴ is 1+1?")
    assert key("What is 1+1?") != key("What is 1+2?")


def heldout_config(path: Path, **changes: Any) -> DataConfig:
    return DataConfig(source="jsonl", path=str(path), eval_suites=["test"], **changes)


def test_load_heldout_from_the_split_column_or_a_file(tmp_path: Path) -> None:
    from cepo.data.loaders import check_heldout, load_heldout

    path = write_lines(tmp_path / "all.jsonl", split_rows())
    result, origin = load_heldout(heldout_config(path), "test")
    assert [p.problem for p in result.problems] == ["test 0?", "test 1?", "test 2?"]
    assert origin == f"{path} (split 'test')"
    check_heldout(heldout_config(path))

    plain = write_lines(tmp_path / "train.jsonl", GOOD)
    own = write_lines(tmp_path / "test.jsonl", [{"problem": "held out?", "answer": "1"}])
    config = heldout_config(plain, eval_paths={"test": str(own)})
    result, origin = load_heldout(config, "test")
    assert [p.problem for p in result.problems] == ["held out?"] and origin == str(own)
    check_heldout(config)

    # the issue: one file, no split column, no eval_paths — never the training rows
    message = (
        r"data.eval_suites: suite 'test' has no held-out data: data.path .*train.jsonl has no 'split' column"
    )
    with pytest.raises(DataError, match=message):
        load_heldout(heldout_config(plain), "test")
    with pytest.raises(DataError, match=message + r".*set data.eval_paths.test to the suite's own file"):
        check_heldout(heldout_config(plain))
    no_column = DataConfig.model_construct(**{**heldout_config(plain).model_dump(), "split_column": None})
    with pytest.raises(DataError, match=r"is one file and data.split_column is null"):
        load_heldout(no_column, "test")

    with pytest.raises(DataError, match=r"^data.eval_paths.test: JSONL file .*nope.jsonl does not exist$"):
        load_heldout(heldout_config(plain, eval_paths={"test": str(tmp_path / "nope.jsonl")}), "test")
    with pytest.raises(DataError, match=r"^data.eval_paths.test: JSONL file .*nope.jsonl does not exist$"):
        check_heldout(heldout_config(plain, eval_paths={"test": str(tmp_path / "nope.jsonl")}))
    with pytest.raises(DataError, match=r"suite 'validation': no row of .*all.jsonl \(data.path\) has split"):
        check_heldout(heldout_config(path).model_copy(update={"eval_suites": ["validation"]}))
    with pytest.raises(DataError, match=r"suite 'train' is the training split \(data.split\)"):
        load_heldout(heldout_config(path), "train")


def test_load_heldout_hf_splits(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    from cepo.data.loaders import check_heldout, load_heldout

    folder = tmp_path / "saved"
    DatasetDict(
        {
            "train": Dataset.from_dict({"problem": ["a?", "b?"], "answer": ["1", "2"]}),
            "test": Dataset.from_dict({"problem": ["c?"], "answer": ["3"]}),
        }
    ).save_to_disk(str(folder))
    config = DataConfig(source="hf", path=str(folder), eval_suites=["test"])
    check_heldout(config)
    result, origin = load_heldout(config, "test")
    assert [p.problem for p in result.problems] == ["c?"] and origin == f"{folder}[test]"
    with pytest.raises(
        DataError, match=r"suite 'validation' is not a split of the saved dataset .*: train, test"
    ):
        check_heldout(config.model_copy(update={"eval_suites": ["validation"]}))
    check_heldout(DataConfig(source="hf", path="owner/name", eval_suites=["test"]))  # a Hub name: not asked


def test_hub_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import time

    for name in (
        "HF_HUB_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "https_proxy",
        "HTTPS_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert loaders.hub_unreachable() == "HF_HUB_OFFLINE is set"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert loaders.hub_unreachable() is None
        monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")  # the proxy is what is asked
        assert loaders.hub_unreachable() is None
    monkeypatch.delenv("HTTPS_PROXY")
    started = time.monotonic()
    why = loaders.hub_unreachable(timeout=1.0)
    assert why is not None and why.startswith("hub.invalid:443 ")
    assert time.monotonic() - started < 2.0


def test_hub_dataset_is_refused_at_once_when_the_hub_cannot_be_reached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import datasets

    calls: list[Any] = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a))
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(loaders, "hub_unreachable", lambda: "huggingface.co:443 cannot be reached (no DNS)")
    with pytest.raises(
        DataError,
        match=r"^data.path 'hiyouga/geometry3k' is a dataset on the Hugging Face Hub, and huggingface.co:443 "
        r"cannot be reached \(no DNS\): set data.path to a local file or folder, or data.source",
    ):
        from_config(DataConfig())  # the paper's default: Geo3k on the Hub
    assert calls == []  # no retries: datasets was never asked

    def offline(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        raise ConnectionError("Couldn't reach 'hiyouga/geometry3k' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # offline: the cache is tried, once
    with pytest.raises(
        DataError, match=r"HF_DATASETS_OFFLINE is set but it is not in the Hugging Face cache: set data"
    ):
        from_config(DataConfig())
    assert len(calls) == 1
