"""``cepo inspect``: a token-credit heatmap of one training step (the paper's Figure 5).

The controller records every step in ``RUN_DIR/steps/step_{index:05d}.json``: the rollouts of the step with, for
each response token, log P_S(y_t), log P_T⁺(y_t), log P_T⁻(y_t), Δ_t (Eq. 5) and the clipped evidence weights of
CEPO (Eq. 7) and RLSD (Eq. 4) before λ mixing. This module

- computes those per-token numbers (:func:`token_weights`, pure numpy, for the writer and for rows whose file
  left them out),
- reads and checks one step file (:func:`load_step`), and
- renders it as one self-contained HTML page (:func:`render_heatmap`, :func:`write_heatmap`): per rollout the
  prompt, r⁺, r⁻, reward and advantage, and two token lines, CEPO and RLSD, each token coloured by its weight,
  with Δ, P_T⁺, P_T⁻, P_S and both weights on hover.

Numbering. What a user sees and types is the k-th training step, k = 1, 2, …: ``cepo inspect --step K`` reads
``steps/step_{K-1:05d}.json`` (the file's index and its ``step`` field count from 0, like the step reports in
``metrics.jsonl``), and the page, its default file ``inspect/step_{K:05d}.html`` and every error message say
"step K". The functions below that take ``index`` take the stored, 0-based one.

Colours. Intensity is |w − 1| / ε_w (full colour at the clip). The default view, *credit*, colours by the
direction in which the evidence moves the token relative to plain GRPO, sign(A)·(w − 1): green when the token
is pushed up more (more credit where A > 0, less blame where A < 0), red when it is pushed down more (less credit
where A > 0, more blame where A < 0) — for a correct rollout that is exactly "green above 1, red below 1", and
for a wrong one the token the evidence blames is red. The *weight* view colours by w − 1 alone (green above 1,
red below 1 in every row). Both are selectable on the page.
"""

from __future__ import annotations

import functools
import html
import importlib.resources
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "InspectError",
    "StepFormatError",
    "StepNotFoundError",
    "cli_inspect",
    "load_step",
    "recorded_steps",
    "render_heatmap",
    "step_path",
    "step_summary",
    "token_weights",
    "write_heatmap",
]

# The float32 range: where the learner's evidence_delta maps a one-sided ±inf.
_F32_MAX = float(np.finfo(np.float32).max)
# A stored weight this close to 1 ± ε_w counts as clipped (writers may round through float32).
_CLIP_TOL = 1e-6
_ARRAY_FIELDS = ("logp_student", "logp_pos", "logp_neg", "delta", "w_cepo", "w_rlsd")


class InspectError(Exception):
    """A step record cannot be inspected; the message says which file and what is wrong."""


class StepNotFoundError(InspectError, FileNotFoundError):
    """The run folder, its steps/ folder or the requested step file does not exist."""


class StepFormatError(InspectError, ValueError):
    """A step file is not valid JSON or does not follow the step record format."""


# --------------------------------------------------------------------------------------------------------------
# The per-token numbers


def _as_logp(values: Any, name: str) -> np.ndarray:
    arr = np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of numbers")
    return arr


def _delta(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num − den exactly as the learner computes Δ (``advantages.evidence_delta``)."""
    import torch

    from cepo.algorithm.advantages import evidence_delta

    mask = torch.ones(1, num.size)
    return evidence_delta(torch.from_numpy(num)[None], torch.from_numpy(den)[None], mask)[0].double().numpy()


def _weights(advantage: float, delta: np.ndarray, eps_w: float) -> np.ndarray:
    """The clipped evidence weight exactly as the learner computes it (``advantages.evidence_weights``)."""
    import torch

    from cepo.algorithm.advantages import evidence_weights

    adv = torch.tensor([float(advantage)])
    return evidence_weights(adv, torch.from_numpy(delta)[None], eps_w)[0].double().numpy()


def token_weights(
    advantage: float,
    logp_pos: Any,
    logp_neg: Any,
    logp_student: Any,
    eps_w: float,
) -> dict[str, list[float] | None]:
    """Per-token evidence of one rollout: ``{"delta", "w_cepo", "w_rlsd"}``, each a list of floats or None.

    - ``delta``  Δ_t = log P_T⁺(y_t) − log P_T⁻(y_t)                                    (Eq. 5)
    - ``w_cepo`` clip(exp(sign(A)·Δ_t), 1 − ε_w, 1 + ε_w)                                   (Eq. 7, before λ)
    - ``w_rlsd`` clip(exp(sign(A)·(log P_T⁺(y_t) − log P_S(y_t))), 1 − ε_w, 1 + ε_w)       (Eq. 4, before λ)

    Non-finite log-probs are treated as ``cepo.algorithm.advantages`` treats them: a NaN difference (NaN
    input, or −inf on both sides: a token impossible in both contexts) is no evidence, Δ = 0; a one-sided −inf
    gives Δ = ±float32 max, whose weight is the clip bound. ``None`` entries count as NaN. With A = 0 every
    weight is 1. ``logp_pos`` None (row not scored) gives all three None; ``logp_neg`` None gives ``delta`` and
    ``w_cepo`` None. Computed by the learner's own functions (float32), so the page shows what it applied.
    """
    if not 0.0 < float(eps_w) < 1.0:
        raise ValueError(f"eps_w must lie in (0, 1), got {eps_w}")
    if not math.isfinite(float(advantage)):
        raise ValueError(f"advantage must be finite, got {advantage}")
    student = _as_logp(logp_student, "logp_student")
    if logp_pos is None:
        return {"delta": None, "w_cepo": None, "w_rlsd": None}
    pos = _as_logp(logp_pos, "logp_pos")
    if pos.shape != student.shape:
        raise ValueError(f"logp_pos has {pos.size} entries but logp_student has {student.size}")
    w_rlsd = _weights(advantage, _delta(pos, student), eps_w)
    if logp_neg is None:
        return {"delta": None, "w_cepo": None, "w_rlsd": w_rlsd.tolist()}
    neg = _as_logp(logp_neg, "logp_neg")
    if neg.shape != student.shape:
        raise ValueError(f"logp_neg has {neg.size} entries but logp_student has {student.size}")
    delta = _delta(pos, neg)
    return {
        "delta": delta.tolist(),
        "w_cepo": _weights(advantage, delta, eps_w).tolist(),
        "w_rlsd": w_rlsd.tolist(),
    }


# --------------------------------------------------------------------------------------------------------------
# Reading a step record


def step_path(run_dir: Path | str, index: int) -> Path:
    """The record of the step with 0-based ``index`` (the user's step ``index + 1``)."""
    return Path(run_dir) / "steps" / f"step_{int(index):05d}.json"


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 3, 4, 7, 9, 10] → "0-4, 7, 9-10"."""
    if not numbers:
        return "none"
    parts: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(parts)


def _available_steps(steps_dir: Path) -> list[int]:
    """The 0-based indices of the step records in ``steps_dir``."""
    found = []
    for path in steps_dir.glob("step_*.json"):
        digits = path.stem.removeprefix("step_")
        if digits.isdigit():
            found.append(int(digits))
    return sorted(found)


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _check_rollout(path: Path, index: int, row: Any) -> None:
    where = f"{path}: rollouts[{index}]"
    if not isinstance(row, dict):
        raise StepFormatError(f"{where} must be an object, got {type(row).__name__}")
    tokens = row.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise StepFormatError(f"{where}.tokens must be a list of strings")
    for field in ("prompt", "response"):
        if field in row and not isinstance(row[field], str):
            raise StepFormatError(f"{where}.{field} must be a string")
    for field in ("answer", "negative"):
        if row.get(field) is not None and not isinstance(row[field], str):
            raise StepFormatError(f"{where}.{field} must be a string or null")
    for field in ("reward", "advantage"):
        if field in row and (row[field] is None or not _is_number(row[field])):
            raise StepFormatError(f"{where}.{field} must be a number, got {row[field]!r}")
    if row.get("advantage") is not None and not math.isfinite(row["advantage"]):
        raise StepFormatError(f"{where}.advantage must be finite, got {row['advantage']!r}")
    for field in ("correct", "scored"):
        if field in row and not isinstance(row[field], bool):
            raise StepFormatError(f"{where}.{field} must be true or false, got {row[field]!r}")
    if row.get("logp_student") is None:
        raise StepFormatError(f"{where}.logp_student is missing (it is always recorded)")
    for field in _ARRAY_FIELDS:
        values = row.get(field)
        if values is None:
            continue
        if not isinstance(values, list):
            raise StepFormatError(f"{where}.{field} must be a list of numbers or null")
        if len(values) != len(tokens):
            raise StepFormatError(
                f"{where}.{field} has {len(values)} entries but tokens has {len(tokens)}: length mismatch"
            )
        bad = next((i for i, v in enumerate(values) if not _is_number(v)), None)
        if bad is not None:
            raise StepFormatError(f"{where}.{field}[{bad}] is {values[bad]!r}, not a number")


def recorded_steps(run_dir: Path | str) -> list[int]:
    """The steps recorded in ``RUN_DIR/steps/``, numbered as the user names them (1 = the first step)."""
    steps_dir = Path(run_dir) / "steps"
    return [i + 1 for i in _available_steps(steps_dir)] if steps_dir.is_dir() else []


def load_step(run_dir: Path | str, index: int) -> dict:
    """Read and check ``RUN_DIR/steps/step_{index:05d}.json``, the record of step ``index + 1``.

    Raises :class:`StepNotFoundError` when the run folder, its ``steps/`` folder or the step is missing (the
    message says "step index + 1" and lists the recorded steps in the same numbering, e.g. ``recorded
    steps: 1-5``) and :class:`StepFormatError` naming the file, the rollout index and the field when the record
    is malformed.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise StepNotFoundError(f"run folder {run_dir} does not exist")
    steps_dir = run_dir / "steps"
    if not steps_dir.is_dir():
        raise StepNotFoundError(f"{run_dir} has no steps/ folder: no step was recorded in this run")
    path = step_path(run_dir, index)
    if not path.is_file():
        raise StepNotFoundError(
            f"step {int(index) + 1} was not recorded in {run_dir} (no {path.relative_to(run_dir)}); recorded "
            f"steps: {_ranges(recorded_steps(run_dir))} (step k is the k-th training step)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise StepFormatError(f"{path}: not UTF-8 text ({exc})") from None
    except json.JSONDecodeError as exc:
        raise StepFormatError(f"{path}: malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise StepFormatError(f"{path}: the top level must be an object, got {type(data).__name__}")
    rollouts = data.get("rollouts")
    if not isinstance(rollouts, list):
        raise StepFormatError(f"{path}: rollouts must be a list")
    for field in ("lam", "eps_w"):
        if data.get(field) is not None and not _is_number(data[field]):
            raise StepFormatError(f"{path}: {field} must be a number, got {data[field]!r}")
    eps_w = data.get("eps_w")
    if eps_w is not None and not 0.0 < eps_w < 1.0:
        raise StepFormatError(f"{path}: eps_w must lie in (0, 1), got {eps_w!r}")
    for index, row in enumerate(rollouts):
        _check_rollout(path, index, row)
    return data


# --------------------------------------------------------------------------------------------------------------
# Rendering


def _is_scored(row: dict) -> bool:
    if "scored" in row:
        return bool(row["scored"])
    return row.get("logp_pos") is not None or row.get("w_cepo") is not None


def _prepared_rows(step_data: dict) -> list[dict]:
    """The rollouts, each with Δ and both weights filled in from the log-probs where the file left them out."""
    eps_w = step_data.get("eps_w")
    rows = []
    for row in step_data.get("rollouts", []):
        row = dict(row)
        row["scored"] = _is_scored(row)
        missing = any(row.get(k) is None for k in ("delta", "w_cepo", "w_rlsd"))
        if row["scored"] and missing and row.get("logp_pos") is not None and eps_w is not None:
            computed = token_weights(
                float(row.get("advantage") or 0.0),
                row["logp_pos"],
                row.get("logp_neg"),
                row["logp_student"],
                float(eps_w),
            )
            for key, values in computed.items():
                if row.get(key) is None:
                    row[key] = values
        rows.append(row)
    return rows


def _is_clipped(w: Any, eps_w: float) -> bool:
    if not _is_number(w) or w is None or math.isnan(w):
        return False
    return w <= 1.0 - eps_w + _CLIP_TOL or w >= 1.0 + eps_w - _CLIP_TOL


def step_summary(step_data: dict) -> dict:
    """Counts and the clip rates of the CEPO and RLSD weights over scored tokens (rows scored with A ≠ 0)."""
    rows = _prepared_rows(step_data)
    eps_w = step_data.get("eps_w")
    scored_tokens = 0
    clipped = {"w_cepo": 0, "w_rlsd": 0}
    counted = {"w_cepo": 0, "w_rlsd": 0}
    for row in rows:
        if not row["scored"] or not row.get("advantage"):
            continue
        scored_tokens += len(row["tokens"])
        for key in clipped:
            values = row.get(key)
            if values is None or eps_w is None:
                continue
            counted[key] += len(values)
            clipped[key] += sum(_is_clipped(w, eps_w) for w in values)
    return {
        "rollouts": len(rows),
        "groups": len({row.get("group") for row in rows}),
        "correct": sum(1 for row in rows if row.get("correct") is True),
        "wrong": sum(1 for row in rows if row.get("correct") is False),
        "scored_rows": sum(1 for row in rows if row["scored"]),
        "unscored_rows": sum(1 for row in rows if not row["scored"]),
        "tokens": sum(len(row["tokens"]) for row in rows),
        "scored_tokens": scored_tokens,
        "clip_rate_cepo": clipped["w_cepo"] / counted["w_cepo"] if counted["w_cepo"] else None,
        "clip_rate_rlsd": clipped["w_rlsd"] / counted["w_rlsd"] if counted["w_rlsd"] else None,
    }


def _json_safe(value: Any) -> Any:
    """Non-finite floats become the strings "Infinity", "-Infinity", "NaN" (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _embed_json(payload: Any) -> str:
    """JSON safe inside <script>: no '<', '>' or '&' survives, so no '</script>' or '<!--' can end the block."""
    text = json.dumps(_json_safe(payload), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


# The page's stylesheet and script live in cepo/assets/ (package data) and are inlined into every page.
@functools.cache
def _asset(name: str) -> str:
    """The text of ``cepo/assets/<name>``, read once."""
    return (importlib.resources.files("cepo") / "assets" / name).read_text(encoding="utf-8")


def render_heatmap(step_data: dict, *, title: str, run: str | None = None) -> str:
    """One self-contained HTML page showing the token credit of one step: no network, the CSS and JS of
    ``cepo/assets/heatmap.css`` and ``heatmap.js`` inlined.

    The data is embedded as JSON in ``<script type="application/json" id="cepo-data">`` with ``<``, ``>`` and
    ``&`` escaped; the page's script builds the header, the filters and one card per rollout. Every token is
    a ``<span class="tok">`` with ``data-w-cepo``, ``data-w-rlsd`` and ``data-delta`` (scored rows) and a
    ``title`` holding the hover text.
    """
    rows = _prepared_rows(step_data)
    step_meta = {k: v for k, v in step_data.items() if k != "rollouts"}
    index = step_meta.get("step")
    payload = {
        "title": title,
        "run": run,
        # the page names the step as the user does: the k-th step (the record's field counts from 0)
        "step_number": index + 1 if isinstance(index, int) and not isinstance(index, bool) else None,
        "step": step_meta,
        "summary": step_summary(step_data),
        "rows": rows,
    }
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n"
        f"<style>\n{_asset('heatmap.css')}</style>\n</head>\n<body>\n"
        '<div id="app"></div>\n'
        "<noscript><p>This page needs JavaScript to draw the heatmap.</p></noscript>\n"
        f'<script type="application/json" id="cepo-data">{_embed_json(payload)}</script>\n'
        f"<script>\n{_asset('heatmap.js')}</script>\n"
        "</body>\n</html>\n"
    )


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_heatmap(run_dir: Path | str, index: int, out: Path | None = None) -> Path:
    """Render the record ``steps/step_{index:05d}.json`` of ``run_dir`` — step ``k = index + 1`` — to ``out``
    (default ``RUN_DIR/inspect/step_{k:05d}.html``), written atomically; returns the path. Raises
    :class:`InspectError` like :func:`load_step`."""
    run_dir = Path(run_dir)
    data = load_step(run_dir, index)
    run_name = run_dir.resolve().name
    number = int(index) + 1
    page = render_heatmap(data, title=f"CEPO token credit: {run_name}, step {number}", run=run_name)
    target = Path(out) if out is not None else run_dir / "inspect" / f"step_{number:05d}.html"
    _write_atomic(target, page)
    return target


def cli_inspect(run_dir: Path, step: int, out: Path | None, console) -> Path:
    """What ``cepo inspect --run RUN --step K [--out FILE]`` runs: write the page of the K-th training step
    (``steps/step_{K-1:05d}.json``) and print its path.

    On a step number below 1, or a missing or malformed step record, it prints the error and exits with status
    2 (``typer.Exit``).
    """
    try:
        if step < 1:
            recorded = recorded_steps(run_dir)
            raise StepNotFoundError(
                f"--step {step}: steps count from 1 (step k is the k-th training step)"
                + (f"; recorded steps in {run_dir}: {_ranges(recorded)}" if recorded else "")
            )
        path = write_heatmap(run_dir, step - 1, out)
    except InspectError as exc:
        import typer
        from rich.markup import escape

        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(f"wrote {path}", highlight=False, soft_wrap=True, markup=False)
    return path
