"""An offline image task whose answer needs the picture: a digit x drawn in a small figure, and an addition chain
over x in the text — ``<image>Let x be the number in the figure. Compute x+3+2.`` → ``x=7. 7+3=10. 10+2=12.
\\boxed{12}``. Without the image the model can only guess x (one chance in nine).

Written in Geometry3K's on-disk layout (:func:`write_dataset`): a Hugging Face hub-style folder
``data/<split>-00000-of-00001.parquet`` with columns ``id``, ``problem`` (one ``<image>`` placeholder),
``answer`` and ``images`` (a list of ``{"bytes": PNG, "path": None}``), so training reads it through the same
loader path (``data.source: hf``) as the real dataset.

Splits are disjoint by a hash of the problem's text (its operands): no ``test`` problem's text is a training
problem's, whatever x its figure shows. ``train`` and ``test`` share the shape (x + one or two numbers);
``more_operands`` (x + three numbers) is a held-out shape.
The figure shows x as a digit on a background of x's legend colour (jittered); digit size and position vary.
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SIDE",
    "SUITES",
    "TASK_VERSION",
    "ImageProblem",
    "draw_digit",
    "generate",
    "inject_error",
    "solution",
    "write_dataset",
]

TASK_VERSION = "image-arith-v4"
SIDE = 28  # pixels: 2×2 patches of 14, one merged image token in a Qwen2-VL with merge size 2
SUITES = ("train", "test", "more_operands")
TEMPLATE = "<image>Let x be the number in the figure. Compute {expr}."
# x's legend colours (x = 1 … 9; 0 and 10+ reuse them), far apart in RGB
PALETTE = [
    (128, 128, 128),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (128, 64, 0),
]


@dataclass(frozen=True)
class ImageProblem:
    x: int
    operands: tuple[int, ...]
    style: int  # seeds the drawing (colours, size, offset)

    @property
    def key(self) -> str:
        return f"{self.x}|{'+'.join(map(str, self.operands))}"

    @property
    def problem(self) -> str:
        return TEMPLATE.format(expr="+".join(["x", *map(str, self.operands)]))

    @property
    def answer(self) -> str:
        return str(self.x + sum(self.operands))


def _bucket(key: str) -> float:
    return int(hashlib.sha256(f"{TASK_VERSION}/{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def _split_of(problem: ImageProblem) -> str:
    if len(problem.operands) >= 3:
        return "more_operands"
    # by the text alone (the operands), so no test problem's text is a training problem's
    return "test" if _bucket("+".join(map(str, problem.operands))) < 0.2 else "train"


def draw_digit(x: int, style: int) -> bytes:
    """A PNG of ``x`` drawn on a ``SIDE``×``SIDE`` canvas, colours, size and offset drawn from ``style``."""
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(f"style/{style}")
    # the background's hue is x's legend colour (jittered): a tiny vision tower trained from scratch in minutes
    # learns it, where the glyph alone moves its features too little; the digit is drawn over it as well
    background = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in PALETTE[x % len(PALETTE)])
    ink = (0, 0, 0) if sum(background) > 380 else (255, 255, 255)
    image = Image.new("RGB", (SIDE, SIDE), background)
    font = ImageFont.load_default(size=rng.randint(20, 25))
    centre = (SIDE // 2 + rng.randint(-2, 2), SIDE // 2 + rng.randint(-2, 2))
    ImageDraw.Draw(image).text(centre, str(x), font=font, fill=ink, anchor="mm")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def generate(split: str, size: int, seed: int = 0) -> list[ImageProblem]:
    """``size`` problems of ``split`` (deterministic for a seed), none of another split's content."""
    if split not in SUITES:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SUITES)}")
    rng = random.Random(f"{TASK_VERSION}/{split}/{seed}")
    out: list[ImageProblem] = []
    attempts = 0
    while len(out) < size:
        attempts += 1
        if attempts > 200 * size + 1000:
            raise RuntimeError(f"could not draw {size} problems of split {split!r}")
        n = 3 if split == "more_operands" else rng.choice((1, 2))
        candidate = ImageProblem(
            rng.randint(1, 9), tuple(rng.randint(1, 9) for _ in range(n)), rng.getrandbits(32)
        )
        if _split_of(candidate) == split:
            out.append(candidate)
    return out


def solution(problem: ImageProblem) -> str:
    """The one-line chain: read x, then add left to right."""
    steps, total = [f"x={problem.x}."], problem.x
    for b in problem.operands:
        steps.append(f"{total}+{b}={total + b}.")
        total += b
    return " ".join([*steps, f"\\boxed{{{total}}}"])


def inject_error(problem: ImageProblem, rng: random.Random) -> str:
    """A chain with one wrong addition (off by 1–2), the error carried to the boxed answer; x read right."""
    wrong_at = rng.randrange(len(problem.operands))
    steps, total = [f"x={problem.x}."], problem.x
    for k, b in enumerate(problem.operands):
        result = total + b
        if k == wrong_at:
            result += rng.choice((-2, -1, 1, 2))
            result = max(result, 0)
        steps.append(f"{total}+{b}={result}.")
        total = result
    return " ".join([*steps, f"\\boxed{{{total}}}"])


def write_dataset(folder: str | Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """Geo3k's layout: ``folder/data/<split>-00000-of-00001.parquet`` (id, problem, answer, images)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split, size in sizes.items():
        problems = generate(split, size, seed)
        table = pa.table(
            {
                "id": [f"{split}-{i:05d}" for i in range(len(problems))],
                "problem": [p.problem for p in problems],
                "answer": [p.answer for p in problems],
                "images": [[{"bytes": draw_digit(p.x, p.style), "path": None}] for p in problems],
            }
        )
        pq.write_table(table, folder / "data" / f"{split}-00000-of-00001.parquet")
    return folder
