"""The offline image task: Geo3k's on-disk layout read by the project's loader, disjoint held-out suites, the
answer in the figure and not in the text."""

from __future__ import annotations

import io
import random

from PIL import Image

from cepo.data.loaders import load_problems, problem_key
from cepo.tasks import image_arith
from cepo_services.verifier import grade


def test_geo3k_layout_through_the_loader(tmp_path):
    folder = image_arith.write_dataset(tmp_path / "ds", {"train": 40, "test": 10, "more_operands": 5})
    assert sorted(p.name for p in (folder / "data").iterdir()) == [
        "more_operands-00000-of-00001.parquet",
        "test-00000-of-00001.parquet",
        "train-00000-of-00001.parquet",
    ]
    for split, n in (("train", 40), ("test", 10), ("more_operands", 5)):
        problems = load_problems("hf", str(folder), split=split).problems
        assert len(problems) == n
        for p in problems:
            assert p.problem.count("<image>") == 1 and len(p.images) == 1
            assert p.images[0].startswith("data:image/png;base64,")


def test_suites_are_disjoint_by_text():
    texts = {s: {problem_key(p.problem) for p in image_arith.generate(s, 300)} for s in image_arith.SUITES}
    assert not texts["train"] & texts["test"]
    assert not texts["train"] & texts["more_operands"]


def test_the_answer_needs_the_figure():
    problems = image_arith.generate("train", 200)
    by_text: dict[str, set[str]] = {}
    for p in problems:
        by_text.setdefault(p.problem, set()).add(p.answer)
    assert max(len(a) for a in by_text.values()) > 3  # one text, many answers: x is only in the image
    p = problems[0]
    image = Image.open(io.BytesIO(image_arith.draw_digit(p.x, p.style)))
    assert image.size == (image_arith.SIDE, image_arith.SIDE)
    assert grade(image_arith.solution(p), p.answer).correct
    wrong = image_arith.inject_error(p, random.Random(0))
    assert wrong.startswith(f"x={p.x}.") and not grade(wrong, p.answer).correct
