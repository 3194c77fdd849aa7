"""``cepo inspect``: a token-credit heatmap of one training step (the paper's Figure 5).

The controller records every step in ``RUN_DIR/steps/step_{step:05d}.json``: the rollouts of the step with, for
each response token, log P_S(y_t), log P_T⁺(y_t), log P_T⁻(y_t), Δ_t (Eq. 5) and the clipped evidence weights of
CEPO (Eq. 7) and RLSD (Eq. 4) before λ mixing. This module

- computes those per-token numbers (:func:`token_weights`, pure numpy, for the writer and for rows whose file
  left them out),
- reads and checks one step file (:func:`load_step`), and
- renders it as one self-contained HTML page (:func:`render_heatmap`, :func:`write_heatmap`): per rollout the
  prompt, r⁺, r⁻, reward and advantage, and two token lines, CEPO and RLSD, each token coloured by its weight,
  with Δ, P_T⁺, P_T⁻, P_S and both weights on hover.

Colours. Intensity is |w − 1| / ε_w (full colour at the clip). The default view, *credit*, colours by the
direction in which the evidence moves the token relative to plain GRPO, sign(A)·(w − 1): green when the token
is pushed up more (more credit where A > 0, less blame where A < 0), red when it is pushed down more (less credit
where A > 0, more blame where A < 0) — for a correct rollout that is exactly "green above 1, red below 1", and
for a wrong one the token the evidence blames is red. The *weight* view colours by w − 1 alone (green above 1,
red below 1 in every row). Both are selectable on the page.
"""

from __future__ import annotations

import html
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

    from services.learner.advantages import evidence_delta

    mask = torch.ones(1, num.size)
    return evidence_delta(torch.from_numpy(num)[None], torch.from_numpy(den)[None], mask)[0].double().numpy()


def _weights(advantage: float, delta: np.ndarray, eps_w: float) -> np.ndarray:
    """The clipped evidence weight exactly as the learner computes it (``advantages.evidence_weights``)."""
    import torch

    from services.learner.advantages import evidence_weights

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

    Non-finite log-probs are treated as ``services.learner.advantages`` treats them: a NaN difference (NaN
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


def step_path(run_dir: Path | str, step: int) -> Path:
    return Path(run_dir) / "steps" / f"step_{int(step):05d}.json"


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


def load_step(run_dir: Path | str, step: int) -> dict:
    """Read and check ``RUN_DIR/steps/step_{step:05d}.json``.

    Raises :class:`StepNotFoundError` when the run folder, its ``steps/`` folder or the step is missing (the
    message lists the steps that are there, e.g. ``available: 0-4``) and :class:`StepFormatError` naming the
    file, the rollout index and the field when the record is malformed.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise StepNotFoundError(f"run folder {run_dir} does not exist")
    steps_dir = run_dir / "steps"
    if not steps_dir.is_dir():
        raise StepNotFoundError(f"{run_dir} has no steps/ folder: no step was recorded in this run")
    path = step_path(run_dir, step)
    if not path.is_file():
        raise StepNotFoundError(
            f"step {step} not in {steps_dir}; available: {_ranges(_available_steps(steps_dir))}"
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


_CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --card: #ffffff; --bg: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; padding: 16px 20px 40px; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
h1 { font-size: 20px; margin: 0 0 6px; }
.meta { display: flex; flex-wrap: wrap; gap: 4px 18px; margin: 4px 0; color: var(--muted); }
.meta b { color: var(--fg); font-weight: 600; }
.controls { display: flex; flex-wrap: wrap; gap: 8px 18px; align-items: center; margin: 12px 0;
  padding: 8px 10px; background: var(--card); border: 1px solid var(--line); border-radius: 6px; }
.legend { display: inline-flex; align-items: center; gap: 6px; color: var(--muted); }
.swatch { display: inline-block; width: 18px; height: 12px; border: 1px solid var(--line);
  vertical-align: middle; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px;
  margin: 12px 0; }
.card.hidden { display: none; }
.card-head { display: flex; flex-wrap: wrap; gap: 4px 14px; align-items: baseline; margin-bottom: 6px; }
.badge { padding: 0 8px; border-radius: 10px; font-weight: 600; font-size: 12px; }
.badge.ok { background: #e6f4ea; color: #1e5631; }
.badge.bad { background: #fbeaea; color: #7a1f1f; }
.badge.none { background: #eef0f2; color: var(--muted); }
.field { margin: 2px 0; }
.field .k { display: inline-block; min-width: 92px; color: var(--muted); }
.prompt { white-space: pre-wrap; word-break: break-word; margin: 2px 0 6px; padding: 4px 8px;
  background: var(--bg); border-radius: 4px; max-height: 9em; overflow: auto; }
.line { display: grid; grid-template-columns: 64px 1fr; gap: 8px; margin-top: 6px; align-items: start; }
.line-label { font-weight: 700; font-size: 12px; padding-top: 3px; color: var(--muted); }
.toks { font: 15px/1.9 ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; white-space: pre-wrap;
  word-break: break-word; }
.tok { padding: 1px 0; border-radius: 2px; cursor: default; }
.tok:hover { outline: 1px solid #1f2328; }
.tok .mark { color: #8c959f; }
.note { color: var(--muted); font-style: italic; margin-top: 6px; }
#tip { position: fixed; z-index: 10; display: none; pointer-events: none; max-width: 360px;
  padding: 6px 9px; border-radius: 6px; background: #1f2328; color: #f6f8fa; white-space: pre;
  font: 12px/1.5 ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace;
  box-shadow: 0 2px 8px rgba(0, 0, 0, .25); }
"""

_JS = r"""
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("cepo-data").textContent);
  const step = data.step, rows = data.rows, summary = data.summary;
  const eps = typeof step.eps_w === "number" ? step.eps_w : null;
  const GREEN = [34, 197, 94], RED = [239, 68, 68];

  function num(x) {
    if (typeof x === "number") return x;
    if (x === "Infinity") return Infinity;
    if (x === "-Infinity") return -Infinity;
    if (x === "NaN") return NaN;
    return null;
  }
  function at(arr, i) { return arr == null ? null : num(arr[i]); }
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text != null) node.textContent = text;
    return node;
  }
  function fmtSigned(x, digits) {
    if (x == null || Number.isNaN(x)) return "n/a";
    if (Math.abs(x) >= 1e30) return x > 0 ? "+\u221e" : "\u2212\u221e";
    const text = x.toFixed(digits);
    return x > 0 ? "+" + text : Number(text) === 0 ? Math.abs(x).toFixed(digits) : text;
  }
  function fmtProb(logp) {
    if (logp == null || Number.isNaN(logp)) return "n/a";
    const p = Math.exp(logp);
    if (p === 0) return "0";
    if (p >= 0.001) return p.toFixed(4);
    return p.toExponential(2);
  }
  function fmtW(w) { return w == null || Number.isNaN(w) ? "n/a" : w.toFixed(3); }
  function fmtRate(r) { return r == null ? "n/a" : (100 * r).toFixed(1) + "%"; }
  function fmtNum(x, d) { const v = num(x); return v == null ? "n/a" : v.toFixed(d); }

  // Colour of one weight. mode "credit": by sign(A)·(w − 1); mode "weight": by w − 1. |w − 1|/ε_w → intensity.
  function colour(w, adv, mode) {
    if (w == null || !Number.isFinite(w) || eps == null) return null;
    let d = w - 1;
    if (mode === "credit" && adv < 0) d = -d;
    const t = Math.min(1, Math.abs(d) / eps);
    const target = d > 0 ? GREEN : RED;
    const mix = target.map(function (c) { return Math.round(255 + (c - 255) * t); });
    return "rgb(" + mix.join(", ") + ")";
  }

  function showText(tok, node) {
    if (tok === "") { node.appendChild(el("span", "mark", "\u2205")); return; }
    if (/^[ \t]+$/.test(tok)) {
      node.appendChild(el("span", "mark", tok.replace(/ /g, "\u2423").replace(/\t/g, "\u21e5")));
      return;
    }
    const parts = tok.split(/(\n|\r|\t)/);
    for (const part of parts) {
      if (part === "\n") node.appendChild(el("span", "mark", "\u21b5\n"));
      else if (part === "\r") node.appendChild(el("span", "mark", "\u240d"));
      else if (part === "\t") node.appendChild(el("span", "mark", "\u21e5"));
      else if (part) node.appendChild(document.createTextNode(part));
    }
  }

  function tipText(row, i) {
    const tok = row.tokens[i];
    const lines = ["token " + i + ": " + JSON.stringify(tok)];
    if (row.scored) {
      lines.push("\u0394 = " + fmtSigned(at(row.delta, i), 3));
      lines.push("P_T\u207a = " + fmtProb(at(row.logp_pos, i)));
      lines.push("P_T\u207b = " + fmtProb(at(row.logp_neg, i)));
    }
    lines.push("P_S = " + fmtProb(at(row.logp_student, i)));
    if (row.scored) {
      lines.push("w_CEPO = " + fmtW(at(row.w_cepo, i)));
      lines.push("w_RLSD = " + fmtW(at(row.w_rlsd, i)));
    }
    return lines.join("\n");
  }

  const tip = el("div");
  tip.id = "tip";
  document.body.appendChild(tip);
  document.addEventListener("mouseover", function (ev) {
    const span = ev.target.closest ? ev.target.closest(".tok") : null;
    if (!span) { tip.style.display = "none"; return; }
    tip.textContent = span.getAttribute("title");
    tip.style.display = "block";
  });
  document.addEventListener("mousemove", function (ev) {
    if (tip.style.display !== "block") return;
    const x = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 4);
    const y = ev.clientY + 18 + tip.offsetHeight > window.innerHeight ? ev.clientY - tip.offsetHeight - 10
      : ev.clientY + 18;
    tip.style.left = Math.max(0, x) + "px";
    tip.style.top = Math.max(0, y) + "px";
  });

  // ---- header
  const root = document.getElementById("app");
  root.appendChild(el("h1", null, data.title));
  const meta = el("div", "meta");
  function metaItem(parent, label, value, id) {
    const item = el("span");
    if (id) item.id = id;
    item.appendChild(document.createTextNode(label + " "));
    item.appendChild(el("b", null, value));
    parent.appendChild(item);
  }
  metaItem(meta, "run", data.run == null ? "n/a" : String(data.run));
  metaItem(meta, "step", step.step == null ? "n/a" : String(step.step));
  metaItem(meta, "method", step.method == null ? "n/a" : String(step.method));
  metaItem(meta, "\u03bb", fmtNum(step.lam, 3));
  metaItem(meta, "\u03b5_w", fmtNum(step.eps_w, 3));
  if (step.policy_version != null) metaItem(meta, "policy version", String(step.policy_version));
  root.appendChild(meta);
  const counts = el("div", "meta");
  counts.id = "counts";
  metaItem(counts, "rollouts", String(summary.rollouts));
  metaItem(counts, "groups", String(summary.groups));
  metaItem(counts, "correct", String(summary.correct));
  metaItem(counts, "wrong", String(summary.wrong));
  metaItem(counts, "scored rows", String(summary.scored_rows));
  metaItem(counts, "unscored rows", String(summary.unscored_rows));
  metaItem(counts, "scored tokens", String(summary.scored_tokens));
  root.appendChild(counts);
  const clip = el("div", "meta");
  clip.id = "clip-rate";
  metaItem(clip, "clip rate (w at 1 \u00b1 \u03b5_w, scored tokens): CEPO", fmtRate(summary.clip_rate_cepo),
    "clip-cepo");
  metaItem(clip, "RLSD", fmtRate(summary.clip_rate_rlsd), "clip-rlsd");
  root.appendChild(clip);

  // ---- controls
  const controls = el("div", "controls");
  function select(id, label, options) {
    const wrap = el("label", null, label + " ");
    const sel = el("select");
    sel.id = id;
    for (const [value, text] of options) {
      const opt = el("option", null, text);
      opt.value = value;
      sel.appendChild(opt);
    }
    wrap.appendChild(sel);
    controls.appendChild(wrap);
    return sel;
  }
  const filterSel = select("filter", "show", [["all", "all"], ["correct", "only correct"], ["wrong", "only wrong"]]);
  const sortSel = select("sort", "order", [["index", "as sampled"], ["absadv", "by |A|, largest first"]]);
  const modeSel = select("colour", "colour", [["credit", "credit: sign(A)\u00b7(w\u22121)"],
    ["weight", "weight: w\u22121"]]);
  const legend = el("span", "legend");
  function swatch(rgb, text) {
    const s = el("span", "swatch");
    s.style.backgroundColor = "rgb(" + rgb.join(", ") + ")";
    legend.appendChild(s);
    legend.appendChild(document.createTextNode(text));
  }
  swatch(RED, "pushed down more");
  swatch([255, 255, 255], "w = 1");
  swatch(GREEN, "pushed up more (full colour at the clip 1 \u00b1 \u03b5_w)");
  controls.appendChild(legend);
  root.appendChild(controls);

  // ---- cards
  const list = el("div");
  list.id = "rollouts";
  root.appendChild(list);
  const cards = [];
  const colourable = [];

  function field(parent, key, value, cls) {
    const div = el("div", "field");
    div.appendChild(el("span", "k", key));
    div.appendChild(el("span", cls || null, value));
    parent.appendChild(div);
  }

  function tokenLine(card, label, row, wKey) {
    const line = el("div", "line");
    line.appendChild(el("div", "line-label", label));
    const toks = el("div", "toks");
    toks.dataset.line = wKey || "plain";
    const adv = num(row.advantage) || 0;
    row.tokens.forEach(function (tok, i) {
      const span = el("span", "tok");
      showText(tok, span);
      span.dataset.i = String(i);
      span.title = tipText(row, i);
      if (row.scored) {
        span.dataset.wCepo = String(at(row.w_cepo, i));
        span.dataset.wRlsd = String(at(row.w_rlsd, i));
        span.dataset.delta = String(at(row.delta, i));
      }
      if (wKey) colourable.push([span, at(row[wKey], i), adv]);
      toks.appendChild(span);
    });
    line.appendChild(toks);
    card.appendChild(line);
  }

  rows.forEach(function (row, index) {
    const card = el("div", "card");
    card.dataset.index = String(index);
    card.dataset.correct = row.correct === true ? "true" : row.correct === false ? "false" : "unknown";
    const adv = num(row.advantage);
    card.dataset.absAdv = String(adv == null ? 0 : Math.abs(adv));
    const head = el("div", "card-head");
    head.appendChild(el("b", null, "rollout " + index + (row.group != null ? " \u00b7 group " + row.group : "")));
    head.appendChild(el("span", "badge " + (row.correct === true ? "ok" : row.correct === false ? "bad" : "none"),
      row.correct === true ? "correct" : row.correct === false ? "wrong" : "unverified"));
    head.appendChild(el("span", null, "reward " + fmtNum(row.reward, 3)));
    head.appendChild(el("span", null, "A = " + fmtSigned(adv, 3)));
    if (!row.scored) head.appendChild(el("span", "badge none", "not scored"));
    card.appendChild(head);
    card.appendChild(el("div", "prompt", row.prompt == null ? "" : row.prompt));
    field(card, "r\u207a (answer)", row.answer == null ? "n/a" : row.answer);
    field(card, "r\u207b (negative)", row.negative == null
      ? "none: no wrong rollout in the group (P_T\u207b := P_S, CEPO = RLSD)" : row.negative);
    if (row.scored && row.w_cepo != null && row.w_rlsd != null) {
      tokenLine(card, "CEPO", row, "w_cepo");
      tokenLine(card, "RLSD", row, "w_rlsd");
    } else {
      tokenLine(card, "tokens", row, null);
      card.appendChild(el("div", "note", row.scored
        ? "no evidence weights recorded for this row: tokens are uncoloured"
        : "not scored by the teacher (A = 0, GRPO or \u03bb = 0): every token keeps the sequence advantage A; " +
          "tokens are uncoloured"));
    }
    list.appendChild(card);
    cards.push(card);
  });
  if (!rows.length) list.appendChild(el("div", "note", "this step recorded no rollouts"));

  function recolour() {
    const mode = modeSel.value;
    for (const [span, w, adv] of colourable) {
      const c = colour(w, adv, mode);
      if (c) span.style.backgroundColor = c;
      else span.style.removeProperty("background-color");
    }
  }
  function refilter() {
    const f = filterSel.value;
    for (const card of cards) {
      const hide = (f === "correct" && card.dataset.correct !== "true") ||
        (f === "wrong" && card.dataset.correct !== "false");
      card.classList.toggle("hidden", hide);
    }
  }
  function resort() {
    const ordered = cards.slice();
    if (sortSel.value === "absadv") {
      ordered.sort(function (a, b) {
        return Number(b.dataset.absAdv) - Number(a.dataset.absAdv) || Number(a.dataset.index) - Number(b.dataset.index);
      });
    }
    for (const card of ordered) list.appendChild(card);
  }
  filterSel.addEventListener("change", refilter);
  sortSel.addEventListener("change", resort);
  modeSel.addEventListener("change", recolour);
  recolour();
  document.body.dataset.ready = "1";
})();
"""


def render_heatmap(step_data: dict, *, title: str, run: str | None = None) -> str:
    """One self-contained HTML page (inline CSS and JS, no network) showing the token credit of one step.

    The data is embedded as JSON in ``<script type="application/json" id="cepo-data">`` with ``<``, ``>`` and
    ``&`` escaped; the page's script builds the header, the filters and one card per rollout. Every token is
    a ``<span class="tok">`` with ``data-w-cepo``, ``data-w-rlsd`` and ``data-delta`` (scored rows) and a
    ``title`` holding the hover text.
    """
    rows = _prepared_rows(step_data)
    step_meta = {k: v for k, v in step_data.items() if k != "rollouts"}
    payload = {
        "title": title,
        "run": run,
        "step": step_meta,
        "summary": step_summary(step_data),
        "rows": rows,
    }
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n"
        f"<style>{_CSS}</style>\n</head>\n<body>\n"
        '<div id="app"></div>\n'
        "<noscript><p>This page needs JavaScript to draw the heatmap.</p></noscript>\n"
        f'<script type="application/json" id="cepo-data">{_embed_json(payload)}</script>\n'
        f"<script>{_JS}</script>\n"
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


def write_heatmap(run_dir: Path | str, step: int, out: Path | None = None) -> Path:
    """Render step ``step`` of ``run_dir`` to ``out`` (default ``RUN_DIR/inspect/step_{step:05d}.html``),
    written atomically; returns the path. Raises :class:`InspectError` like :func:`load_step`."""
    run_dir = Path(run_dir)
    data = load_step(run_dir, step)
    run_name = run_dir.resolve().name
    page = render_heatmap(data, title=f"CEPO token credit: {run_name}, step {step}", run=run_name)
    target = Path(out) if out is not None else run_dir / "inspect" / f"step_{int(step):05d}.html"
    _write_atomic(target, page)
    return target


def cli_inspect(run_dir: Path, step: int, out: Path | None, console) -> Path:
    """What ``cepo inspect RUN_DIR --step N [--out FILE]`` runs: write the page and print its path.

    On a missing or malformed step record it prints the error and exits with status 2 (``typer.Exit``).
    """
    try:
        path = write_heatmap(run_dir, step, out)
    except InspectError as exc:
        import typer
        from rich.markup import escape

        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(f"wrote {path}", highlight=False, soft_wrap=True, markup=False)
    return path
