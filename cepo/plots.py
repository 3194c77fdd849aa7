"""``cepo plot --run DIR``: the figures of one run folder, drawn from ``metrics.jsonl`` and ``eval.jsonl``.

A run folder (written by the trainer) holds ``config.yaml``, ``metrics.jsonl`` (one
:class:`~cepo_proto.pipeline.StepReport` per step, ``step`` 0-based), ``eval.jsonl`` (one line per held-out
evaluation point and suite, ``step`` = steps done, 0 = the base policy) and, once finished, ``summary.json``.

The x axis of every figure is **steps done**: the k-th training step (the step report whose ``step`` field is
k − 1) is drawn at k, a held-out evaluation after k steps at k (the base policy at 0), so an evaluation sits on
the step it follows; notes and legends name steps in the same numbering (:func:`step_number`).

:func:`plot_run` writes four PNGs into ``RUN/plots/``: ``reward_accuracy.png`` (train reward and accuracy
above, held-out accuracy ± standard error below), ``delta_fractions.png``, ``clip_rate.png`` (evidence-weight
clip above, PPO ratio clip below, each on its own y range) and ``timing.png``. :func:`run_figures` returns the
same figures unsaved (tests look at their lines).

What the figures promise a reader:

- **Gaps, not zeros.** Δ fractions and the evidence-weight clip exist only where the teacher scored the step:
  steps with λ = 0 and every step of a method without teacher evidence (GRPO, OPSD, SDPO) are NaN — gaps in
  the line — and a note on the panel says which steps and why.
- **Both train curves visible.** Reward and accuracy coincide under a 0/1 reward: reward is a thick pale line
  underneath, accuracy a dashed line with markers on top.
- **Held-out points are points.** Each evaluation is a marker with ± standard-error bars (``sampled_se``);
  consecutive points are joined by a solid line only when they are at most one evaluation interval
  (``eval.every``) apart, by a thin dashed line otherwise.
- **One colour per method.** :func:`method_color` is the single mapping (``METHOD_COLORS`` for the project's
  methods, a colour derived from the name for any other label, e.g. a ``cepo compare`` variant): the
  comparison's figures and a run's own accuracy lines use it.

The ``cepo compare`` report (:mod:`cepo.report`) draws its figures here too, from its collected results:
:func:`plot_curves` (held-out accuracy against the step, Figure 1) and :func:`plot_delta` (the Δ+/Δ− token
fractions, Figure 4). Every figure comes from the same :func:`_figure` / :func:`_save` pair.
"""

from __future__ import annotations

import colorsys
import hashlib
import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "FIG_DPI",
    "FIG_SIZE",
    "METHOD_COLORS",
    "cli_plot",
    "curves_figure",
    "delta_figure",
    "display_name",
    "eval_by_step",
    "evidence_note",
    "gap_note",
    "load_eval",
    "load_jsonl",
    "load_metrics",
    "method_color",
    "plot_curves",
    "plot_delta",
    "plot_run",
    "run_figures",
    "run_method",
    "step_number",
    "teacher_active",
]

# Every figure has a fixed pixel size (no tight bounding box), so that its dimensions are predictable.
FIG_SIZE = (8.0, 5.0)
FIG_DPI = 100
PLOT_FILES = ("reward_accuracy.png", "delta_fractions.png", "clip_rate.png", "timing.png")
# The x axis of every figure: training step k at k, an evaluation after k steps at k
STEP_LABEL = "steps done"

# One colour per method, in every figure (keys are lower-case method names or compare labels).
METHOD_COLORS: dict[str, str] = {
    "grpo": "#1f77b4",  # blue
    "rlsd": "#ff7f0e",  # orange
    "cepo": "#d62728",  # red
    "opsd": "#9467bd",  # purple
    "sdpo": "#8c564b",  # brown
}
# Held-out suites inside one run's figure: none of them a method's colour.
SUITE_COLORS = ("#2ca02c", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#393b79", "#637939", "#843c39")
# Quantities of one run (not methods).
REWARD_COLOR = "0.35"
DELTA_POS_COLOR = "#1a9850"  # the heatmap's green: evidence for the token
DELTA_NEG_COLOR = "#d73027"  # the heatmap's red: evidence against it
EVIDENCE_CLIP_COLOR = "#762a83"
PPO_CLIP_COLOR = "#01665e"
# Step stages (pastel, so that no stage looks like a method), in cepo_proto.pipeline.STAGES order.
STAGE_COLORS = (
    "#8dd3c7",
    "#ffffb3",
    "#bebada",
    "#fb8072",
    "#80b1d3",
    "#fdb462",
    "#b3de69",
    "#fccde5",
    "#d9d9d9",
)


# Hue bands (degrees) a derived colour may take: away from the fixed methods' hues (red/brown/orange 340–45,
# blue 185–225, purple 255–290), so that a variant never looks like one of them.
_FREE_HUES = ((45.0, 185.0), (225.0, 255.0), (290.0, 340.0))


def method_color(name: str) -> str:
    """The colour of a method or ``cepo compare`` label, the same in every figure: ``METHOD_COLORS`` for the
    project's methods, otherwise a colour derived from the name's SHA-256 (stable across runs and machines; its
    hue kept away from the fixed colours')."""
    key = str(name).strip().lower()
    if key in METHOD_COLORS:
        return METHOD_COLORS[key]
    digest = hashlib.sha256(key.encode()).digest()
    at = int.from_bytes(digest[:4], "big") / 2**32 * sum(b - a for a, b in _FREE_HUES)
    for a, b in _FREE_HUES:
        if at < b - a:
            hue = (a + at) / 360.0
            break
        at -= b - a
    else:  # pragma: no cover - at < the total width
        hue = _FREE_HUES[-1][1] / 360.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.6 + 0.3 * digest[4] / 255, 0.45 + 0.3 * digest[5] / 255)
    return "#{:02x}{:02x}{:02x}".format(*(round(255 * c) for c in (r, g, b)))


def display_name(method: str) -> str:
    """The paper's name of a method (``cepo`` → ``CEPO``): the registry's, or the name in capitals."""
    from cepo.algorithm.methods import get_method

    try:
        return get_method(method).display
    except ValueError:  # a run of a method registered elsewhere (e.g. by a script)
        return method.upper()


def load_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """The JSON objects of a ``.jsonl`` file, one per non-blank line; a missing file gives ``[]``.

    A line that is not a JSON object raises ``ValueError`` naming the file and the 1-based line number.
    """
    path = Path(path)
    if not path.exists():
        return []
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {lineno}: malformed JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def load_metrics(run_dir: Path | str) -> list[dict[str, Any]]:
    """The step reports of ``RUN/metrics.jsonl`` in file order (``[]`` if the file does not exist)."""
    return load_jsonl(Path(run_dir) / "metrics.jsonl")


def load_eval(run_dir: Path | str) -> list[dict[str, Any]]:
    """The held-out evaluation lines of ``RUN/eval.jsonl`` in file order (``[]`` if it does not exist)."""
    return load_jsonl(Path(run_dir) / "eval.jsonl")


def step_number(row: dict[str, Any]) -> int:
    """Where a step report (or a comparison's per-step point) sits on the x axis: the k-th training step at k,
    i.e. its ``step`` field (counted from 0) plus one."""
    return int(row["step"]) + 1


def eval_by_step(rows: Sequence[dict[str, Any]]) -> dict[int, dict[str, dict[str, Any]]]:
    """``{step: {suite: line}}`` sorted by step; a repeated (step, suite) keeps its last line."""
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(int(row["step"]), {})[str(row["suite"])] = row
    return dict(sorted(out.items()))


def _run_config(run_dir: Path | str) -> dict[str, Any]:
    """``RUN/config.yaml`` as a mapping ({} when missing or unreadable)."""
    cfg_path = Path(run_dir) / "config.yaml"
    if not cfg_path.exists():
        return {}
    import yaml

    try:
        cfg = yaml.safe_load(cfg_path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def run_method(run_dir: Path | str, metrics: Sequence[dict[str, Any]] | None = None) -> str:
    """The run's method: from its step reports, else ``config.yaml``'s ``algorithm.method``, else ``"?"``."""
    for row in metrics or ():
        if row.get("method"):
            return str(row["method"])
    method = (_run_config(run_dir).get("algorithm") or {}).get("method")
    return str(method) if method else "?"


def _eval_every(run_dir: Path | str) -> int | None:
    """``eval.every`` of the run's config.yaml (0: base and final only), None when the config does not say."""
    every = (_run_config(run_dir).get("eval") or {}).get("every")
    return int(every) if isinstance(every, int) and not isinstance(every, bool) else None


def _scores_evidence(method: str) -> bool | None:
    """Whether the method's teacher scores tokens (Δ exists); None for a method the registry does not know."""
    from cepo.algorithm.methods import get_method

    try:
        return get_method(method).scores_evidence
    except ValueError:
        return None


def _has_delta(row: dict[str, Any]) -> bool:
    return bool(row.get("delta_pos_frac") or row.get("delta_neg_frac"))


def teacher_active(metrics: Sequence[dict[str, Any]], method: str) -> list[bool]:
    """Per step report: did the teacher score the step? Not when λ = 0 (the controller skips the teacher) nor
    for a method without token evidence (GRPO, OPSD, SDPO); a method the registry does not know counts as
    scoring when any step recorded a non-zero Δ fraction."""
    scores = _scores_evidence(method)
    if scores is None:
        scores = any(_has_delta(r) for r in metrics)
    if not scores:
        return [False] * len(metrics)
    return [r.get("lam") is None or float(r["lam"]) > 0.0 for r in metrics]


def evidence_note(metrics: Sequence[dict[str, Any]], method: str) -> str | None:
    """The note drawn on the Δ and evidence-clip panels when no step of the run has teacher evidence, else
    None (:func:`gap_note` says which steps are missing when only some are)."""
    if any(teacher_active(metrics, method)) and any(_has_delta(r) for r in metrics):
        return None
    return f"no teacher evidence (method {method})"


def _ranges(numbers: Sequence[int]) -> str:
    """[0, 1, 2, 3, 7, 9, 10] → "0–3, 7, 9–10"."""
    parts: list[str] = []
    nums = sorted(numbers)
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        parts.append(str(nums[i]) if i == j else f"{nums[i]}–{nums[j]}")
        i = j + 1
    return ", ".join(parts)


def _skipped(metrics: Sequence[dict[str, Any]], method: str) -> list[int]:
    active = teacher_active(metrics, method)
    return [step_number(r) for r, on in zip(metrics, active, strict=True) if not on]


def gap_note(metrics: Sequence[dict[str, Any]], method: str) -> str | None:
    """``"gaps: λ = 0 at steps 25–49 (teacher skipped)"`` when some but not all steps lack teacher evidence:
    the legend entry of the shaded steps on the Δ and evidence-clip panels."""
    skipped = _skipped(metrics, method)
    if not skipped or len(skipped) == len(metrics):
        return None
    return f"gaps: λ = 0 at step{'s' if len(skipped) > 1 else ''} {_ranges(skipped)} (teacher skipped)"


# ------------------------------------------------------------------------------------------------ drawing


def _figure(ncols: int = 1, nrows: int = 1, sharex: bool = False):
    """A figure of ``nrows`` × ``ncols`` axes: ``FIG_SIZE`` for one column, 12 inches wide for more (same
    height). A plain :class:`matplotlib.figure.Figure` (no pyplot state): nothing to close."""
    from matplotlib.figure import Figure

    width = FIG_SIZE[0] if ncols == 1 else 12.0
    fig = Figure(figsize=(width, FIG_SIZE[1]), dpi=FIG_DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=sharex)
    return fig, [ax for row in axes for ax in row]


def _save(fig, path: Path | str) -> Path:
    """Write ``fig`` to ``path`` (creating its folder) at ``FIG_DPI``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=FIG_DPI)
    return path


def _note(ax, text: str) -> None:
    """A boxed note in the middle of the axes (the panel has nothing to show)."""
    ax.text(
        0.5,
        0.5,
        text,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=11,
        color="0.3",
        bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.6"},
        gid="note",
    )


def _skipped_spans(ax, steps: Sequence[int], label: str) -> None:
    """Shade the steps without teacher evidence (contiguous runs of ``steps``), one legend entry saying why."""
    runs: list[list[int]] = []
    for st in sorted(steps):
        if runs and st == runs[-1][1] + 1:
            runs[-1][1] = st
        else:
            runs.append([st, st])
    for i, (a, b) in enumerate(runs):
        span = ax.axvspan(
            a - 0.5, b + 0.5, color="0.6", alpha=0.15, linewidth=0, zorder=0, label=label if i == 0 else None
        )
        span.set_gid("teacher-skipped")


def _num(value: Any) -> float:
    """A float; None (a skipped update's NaN, as JSON writes it) and missing values are NaN."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def _col(metrics: Sequence[dict[str, Any]], key: str, active: Sequence[bool] | None = None) -> list[float]:
    """One metric per step; null, a missing value and a step outside ``active`` are NaN: gaps in the line."""
    out = [_num(r.get(key, 0.0)) for r in metrics]
    if active is not None:
        out = [v if on else math.nan for v, on in zip(out, active, strict=True)]
    return out


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _decorate(ax, ylabel: str, title: str | None, legend_loc: str | None) -> None:
    """Axis labels, title, grid and legend shared by every per-step figure."""
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend_loc and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc=legend_loc)


def _eval_interval(steps: Sequence[int], every: int | None) -> int | None:
    """The gap up to which two evaluation points are joined by a solid line: ``eval.every`` when the config
    says (``0``, base and final only: none), else the most common gap between the points (ties: the smallest)."""
    if every is not None:
        return every if every > 0 else None
    gaps = [b - a for a, b in itertools.pairwise(steps) if b > a]
    if not gaps:
        return None
    return min(set(gaps), key=lambda g: (-gaps.count(g), g))


def _heldout(
    ax,
    xs: Sequence[float],
    ys: Sequence[float],
    se: Sequence[float] | None,
    interval: int | None,
    *,
    color: str,
    label: str,
    gid: str,
    marker: str = "o",
    markersize: float = 4.5,
    linewidth: float = 1.4,
    zorder: float = 3,
) -> None:
    """Evaluation points as markers (``gid:points``) with ± s.e. bars (``gid:bars``), joined by a solid line (``gid:joined``) where
    consecutive points are at most ``interval`` steps apart and a thin dashed one (``gid:gap``) elsewhere."""
    pts = [(x, y, 0.0 if se is None else se[i]) for i, (x, y) in enumerate(zip(xs, ys, strict=True))]
    pts = [(x, y, e if math.isfinite(e) else 0.0) for x, y, e in pts if math.isfinite(y)]
    if not pts:
        return
    solid: list[tuple[float, float]] = [pts[0][:2]]
    dashed: list[tuple[float, float]] = []
    for (x0, y0, _), (x1, y1, _) in itertools.pairwise(pts):
        if interval is not None and x1 - x0 <= interval:
            solid.append((x1, y1))
        else:
            dashed += [(x0, y0), (x1, y1), (math.nan, math.nan)]
            solid += [(math.nan, math.nan), (x1, y1)]
    (joined,) = ax.plot(
        [p[0] for p in solid], [p[1] for p in solid], color=color, linewidth=linewidth, zorder=zorder
    )
    joined.set_gid(f"{gid}:joined")
    if dashed:
        (gap,) = ax.plot(
            [p[0] for p in dashed],
            [p[1] for p in dashed],
            color=color,
            linewidth=0.9,
            linestyle=(0, (3, 3)),
            alpha=0.8,
            zorder=zorder,
        )
        gap.set_gid(f"{gid}:gap")
    bars = ax.errorbar(
        [p[0] for p in pts],
        [p[1] for p in pts],
        yerr=[p[2] for p in pts],
        fmt=marker,
        markersize=markersize,
        color=color,
        ecolor=color,
        elinewidth=1.0,
        capsize=3,
        linestyle="none",
        label=label,
        zorder=zorder + 0.5,
    )
    bars.lines[0].set_gid(f"{gid}:points")
    for collection in bars.lines[2]:
        collection.set_gid(f"{gid}:bars")


# ------------------------------------------------------------------------------------------- one run


def _reward_accuracy_figure(metrics, evals, method: str, every: int | None, title: str):
    fig, (ax_train, ax_eval) = _figure(nrows=2, sharex=True)
    steps = [step_number(r) for r in metrics]
    colour = method_color(method)
    reward, accuracy = _col(metrics, "reward_mean"), _col(metrics, "accuracy")
    same = all(
        (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-12 for a, b in zip(reward, accuracy, strict=True)
    )
    (line,) = ax_train.plot(
        steps,
        reward,
        color=REWARD_COLOR,
        linewidth=4.0,
        alpha=0.35,
        solid_capstyle="round",
        zorder=2,
        label="train reward mean" + (" (= accuracy: 0/1 reward)" if same else ""),
    )
    line.set_gid("train:reward")
    (line,) = ax_train.plot(
        steps,
        accuracy,
        color=colour,
        linewidth=1.3,
        linestyle="--",
        marker=".",
        markersize=5,
        zorder=3,
        label="train accuracy",
    )
    line.set_gid("train:accuracy")
    _decorate(ax_train, "train", f"{title}: reward and accuracy", "best")
    ax_train.set_xlabel("")

    by_step = eval_by_step(evals)
    if by_step:
        suites = list(dict.fromkeys(s for lines in by_step.values() for s in lines))
        interval = _eval_interval(list(by_step), every)
        single = len(suites) == 1
        for i, suite in enumerate(suites):
            pts = [(st, lines[suite]) for st, lines in by_step.items() if suite in lines]
            _heldout(
                ax_eval,
                [st for st, _ in pts],
                [_num(line.get("sampled")) for _, line in pts],
                [_num(line.get("sampled_se", 0.0)) for _, line in pts],
                interval,
                color=colour if single else SUITE_COLORS[i % len(SUITE_COLORS)],
                label=f"{suite} (sampled)",
                gid=f"heldout:{suite}",
                markersize=3.5,
                linewidth=1.0,
            )
        complete = [(st, lines) for st, lines in by_step.items() if set(suites) <= set(lines)]
        if complete and not single:
            k = len(suites)
            _heldout(
                ax_eval,
                [st for st, _ in complete],
                [sum(_num(line.get("sampled")) for line in lines.values()) / k for _, lines in complete],
                [
                    math.sqrt(sum(_num(line.get("sampled_se", 0.0)) ** 2 for line in lines.values())) / k
                    for _, lines in complete
                ],
                interval,
                color=colour,
                label="average (sampled)",
                gid="heldout:average",
                marker="s",
                markersize=5.5,
                linewidth=2.2,
                zorder=5,
            )
        what = "held-out ± s.e." if interval is None else f"held-out ± s.e. (every {interval} steps)"
        _decorate(ax_eval, what, None, "best")
        if len(suites) > 3:
            ax_eval.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    else:
        _note(ax_eval, "no held-out evaluations (eval.jsonl)")
        _decorate(ax_eval, "held-out", None, None)
    if steps:
        ax_eval.set_xlim(min(0, *steps) - 0.5, max(steps + list(by_step)) + 0.5)
    return fig


def _delta_run_figure(metrics, method: str, title: str):
    fig, (ax,) = _figure()
    steps = [step_number(r) for r in metrics]
    active = teacher_active(metrics, method)
    note = evidence_note(metrics, method)
    for key, colour, label in (
        ("delta_pos_frac", DELTA_POS_COLOR, "Δ > 0 (evidence for the token)"),
        ("delta_neg_frac", DELTA_NEG_COLOR, "Δ < 0 (evidence against the token)"),
    ):
        (line,) = ax.plot(
            steps, _col(metrics, key, active), color=colour, marker=".", markersize=4, label=label
        )
        line.set_gid(key)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(min(steps) - 0.5, max(steps) + 0.5)
    if not note and (gap := gap_note(metrics, method)):
        _skipped_spans(ax, _skipped(metrics, method), gap)
    _decorate(ax, "fraction of scored tokens", f"{title}: tokens with positive / negative Δ", "upper right")
    if note:
        _note(ax, f"{note}:\nΔ is undefined, not 0")
    return fig


def _clip_figure(metrics, method: str, title: str):
    fig, (ax_w, ax_ppo) = _figure(nrows=2, sharex=True)
    steps = [step_number(r) for r in metrics]
    active = teacher_active(metrics, method)
    note = evidence_note(metrics, method)
    weight = _col(metrics, "weight_clip_frac", active)
    (line,) = ax_w.plot(
        steps, weight, color=EVIDENCE_CLIP_COLOR, marker=".", markersize=4, label="evidence weight clipped"
    )
    line.set_gid("weight_clip_frac")
    top = max([0.05, *_finite(weight)])
    ax_w.set_ylim(-0.03 * top, 1.3 * top)
    if not note and (gap := gap_note(metrics, method)):
        _skipped_spans(ax_w, _skipped(metrics, method), gap)
    _decorate(ax_w, "fraction of tokens", f"{title}: clip rates", "upper right")
    ax_w.set_xlabel("")
    if note:
        _note(ax_w, f"{note}: no evidence weights to clip")

    ppo = _col(metrics, "ppo_clip_frac")
    (line,) = ax_ppo.plot(
        steps, ppo, color=PPO_CLIP_COLOR, marker=".", markersize=4, label="PPO ratio clipped"
    )
    line.set_gid("ppo_clip_frac")
    top = max([0.01, *_finite(ppo)])
    ax_ppo.set_ylim(-0.03 * top, 1.3 * top)
    _decorate(ax_ppo, "fraction of tokens", None, "upper right")
    ax_ppo.set_xlim(min(steps) - 0.5, max(steps) + 0.5)
    if not any(v > 0 for v in _finite(ppo)):
        opt = [int(r["optimizer_steps"]) for r in metrics if r.get("optimizer_steps")]
        if opt and max(opt) <= 1:
            why = "one optimizer step per update\n(learner.mini_batches × ppo_epochs = 1): the ratio stays 1"
        else:
            why = "the ratio stayed within the clip range\n(learner.mini_batches = 1 would keep it at 1)"
        _note(ax_ppo, f"PPO ratio never clipped: {why}")
    return fig


def _timing_figure(metrics, title: str):
    fig, (ax,) = _figure()
    steps = [step_number(r) for r in metrics]
    from cepo_proto.pipeline import STAGES

    seen = list(dict.fromkeys(k for r in metrics for k in (r.get("stage_seconds") or {})))
    stages = [k for k in STAGES if k in seen] + [k for k in seen if k not in STAGES]
    extra = [k for k in stages if k not in STAGES]  # a stage the controller adds later
    colours = [
        STAGE_COLORS[(STAGES.index(k) if k in STAGES else len(STAGES) + extra.index(k)) % len(STAGE_COLORS)]
        for k in stages
    ]
    if stages:
        ys = [[float((r.get("stage_seconds") or {}).get(k, 0.0)) for r in metrics] for k in stages]
        if len(steps) == 1:  # a stack plot of one point is invisible: draw stacked bars instead
            bottom = 0.0
            for k, y, colour in zip(stages, ys, colours, strict=True):
                ax.bar(steps, y, bottom=bottom, label=k, width=0.6, color=colour)
                bottom += y[0]
        else:
            ax.stackplot(steps, ys, labels=stages, colors=colours, edgecolor="0.5", linewidth=0.3)
    else:
        _note(ax, "no stage timings recorded")
    if any("step_seconds" in r for r in metrics):
        ax.plot(steps, _col(metrics, "step_seconds"), color="black", linewidth=1.2, label="step total")
    _decorate(ax, "seconds", f"{title}: time per step by stage", None)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def run_figures(run_dir: Path | str) -> dict[str, Any]:
    """The four figures of a run folder, unsaved: ``{file name: matplotlib Figure}`` in ``PLOT_FILES`` order.

    Raises ``FileNotFoundError`` if ``RUN/metrics.jsonl`` is missing, ``ValueError`` if it has no steps or a
    malformed line.
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.exists():
        raise FileNotFoundError(f"{metrics_path}: no such file (is {run_dir} a run folder?)")
    metrics = sorted(load_metrics(run_dir), key=lambda r: int(r["step"]))
    if not metrics:
        raise ValueError(f"{metrics_path}: no steps recorded (empty file)")
    evals = load_eval(run_dir)
    method = run_method(run_dir, metrics)
    name = run_dir.name
    if name.startswith("seed"):  # OUT/<method>/seed<k>/ of a comparison
        name = f"{run_dir.parent.name}/{name}"
    title = f"{name} ({method})"
    return dict(
        zip(
            PLOT_FILES,
            (
                _reward_accuracy_figure(metrics, evals, method, _eval_every(run_dir), title),
                _delta_run_figure(metrics, method, title),
                _clip_figure(metrics, method, title),
                _timing_figure(metrics, title),
            ),
            strict=True,
        )
    )


def plot_run(run_dir: Path | str, out_dir: Path | str | None = None) -> list[Path]:
    """Write the four figures of a run folder (into ``RUN/plots/`` unless ``out_dir``); return their paths.

    Raises ``FileNotFoundError`` if ``RUN/metrics.jsonl`` is missing, ``ValueError`` if it has no steps or a
    malformed line.
    """
    run_dir = Path(run_dir)
    figures = run_figures(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    return [_save(fig, out / name) for name, fig in figures.items()]


def cli_plot(run_dir: Path | str, out_dir: Path | str | None, console) -> list[Path]:
    """``cepo plot``: draw the run's figures and print each written path on ``console`` (a rich Console)."""
    paths = plot_run(run_dir, out_dir)
    for path in paths:
        console.print(str(path), highlight=False, soft_wrap=True)
    return paths


# ------------------------------------------------------------------------------- figures of a comparison


def _run_paths(results: dict[str, Any], method: str) -> list[Path]:
    """The run folders a comparison collected for ``method`` (those still on this machine)."""
    runs = (results.get("runs") or {}).get(method) or {}
    paths = [Path(r["path"]) for r in runs.values() if isinstance(r, dict) and r.get("path")]
    return [p for p in paths if p.is_dir()]


def _compare_every(results: dict[str, Any]) -> int | None:
    """The comparison's ``eval.every``: its runs' when their folders are here (the largest, should they
    differ), else None (each curve's interval is then inferred from its steps)."""
    everies = {
        e
        for m in results.get("methods") or ()
        for p in _run_paths(results, m)
        if (e := _eval_every(p)) is not None
    }
    return max(everies) if everies else None


def curves_figure(results: dict[str, Any]):
    """Figure 1, unsaved (see :func:`plot_curves`)."""
    fig, (ax,) = _figure()
    drawn = 0
    every = _compare_every(results)
    for m in results["methods"]:
        curve = results["aggregate"].get(m, {}).get("curve") or []
        if not curve:
            continue
        n = results["aggregate"][m]["seeds"]
        steps = [int(p["step"]) for p in curve]  # held-out: already steps done
        _heldout(
            ax,
            steps,
            [100.0 * float(p["mean"]) for p in curve],
            [100.0 * _num(p.get("se", 0.0)) for p in curve],
            _eval_interval(steps, every),
            color=method_color(m),
            label=f"{display_name(m)} (n={n})",
            gid=f"curve:{m}",
        )
        drawn += 1
    base = results["base"]["sampled"].get("average")
    if base:
        ax.axhline(100 * base["mean"], color="0.4", linestyle=":", linewidth=1.2, label="base", zorder=1)
    if not drawn:
        ax.text(0.5, 0.5, "no finished runs", transform=ax.transAxes, ha="center", va="center", color="0.3")
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel("held-out accuracy, average over suites (%)")
    ax.set_title("Held-out accuracy during training (mean ± s.e. over seeds)")
    ax.grid(alpha=0.3)
    if drawn or base:
        ax.legend(fontsize=9, loc="best")
    return fig


def plot_curves(results: dict[str, Any], path: Path | str) -> Path:
    """Figure 1: held-out average sampled accuracy vs training step, one colour per method
    (:func:`method_color`): each evaluation point the mean over seeds with ± standard-error bars, joined where
    points are at most one evaluation interval apart (dashed across a longer gap); the base policy as a dotted
    horizontal line."""
    return _save(curves_figure(results), path)


def _has_evidence(delta: Sequence[dict[str, float]]) -> bool:
    return any(p["pos"] != 0.0 or p["neg"] != 0.0 for p in delta)


def _skipped_steps(results: dict[str, Any], method: str, delta: Sequence[dict[str, float]]) -> set[int]:
    """Steps of ``method`` without teacher evidence: λ = 0 in every seed's metrics.jsonl (when the run folders
    are here), or no token with Δ ≠ 0 in any seed (both fractions exactly 0 with no spread)."""
    lam: dict[int, list[float]] = {}
    for path in _run_paths(results, method):
        for row in load_metrics(path):
            if row.get("lam") is not None:
                lam.setdefault(step_number(row), []).append(float(row["lam"]))
    skipped = {st for st, values in lam.items() if all(v <= 0.0 for v in values)}
    for p in delta:
        if p["pos"] == 0.0 and p["neg"] == 0.0 and not p.get("pos_se") and not p.get("neg_se"):
            skipped.add(step_number(p))
    return skipped


def delta_figure(results: dict[str, Any]):
    """Figure 4, unsaved (see :func:`plot_delta`)."""
    fig, (ax_pos, ax_neg) = _figure(ncols=2)
    drawn: list[str] = []
    gaps: dict[str, list[int]] = {}
    all_steps: set[int] = set()
    for m in results["methods"]:
        delta = results["aggregate"].get(m, {}).get("delta") or []
        if not _has_evidence(delta):
            continue
        skipped = _skipped_steps(results, m, delta)
        if skipped:
            gaps[m] = sorted(skipped)
        steps = [step_number(p) for p in delta]
        all_steps.update(steps)
        for ax, key in ((ax_pos, "pos"), (ax_neg, "neg")):
            ys = [math.nan if st in skipped else float(p[key]) for st, p in zip(steps, delta, strict=True)]
            se = [_num(p.get(f"{key}_se", 0.0)) for p in delta]
            se = [e if math.isfinite(e) else 0.0 for e in se]
            colour = method_color(m)
            (line,) = ax.plot(
                steps, ys, color=colour, marker=".", markersize=4, label=display_name(m), zorder=3
            )
            line.set_gid(f"delta:{key}:{m}")
            ax.fill_between(
                steps,
                [y - e for y, e in zip(ys, se, strict=True)],
                [y + e for y, e in zip(ys, se, strict=True)],
                color=colour,
                alpha=0.2,
                linewidth=0,
            )
        drawn.append(m)
    label = None
    if gaps:
        ranges = {_ranges(v) for v in gaps.values()}
        label = "gaps: teacher skipped (λ = 0), steps " + (
            ranges.pop()
            if len(ranges) == 1 and len(gaps) == len(drawn)
            else "; ".join(f"{display_name(m)} {_ranges(v)}" for m, v in gaps.items())
        )
    for ax, sign in ((ax_pos, "positive"), (ax_neg, "negative")):
        if gaps:
            _skipped_spans(ax, sorted(set().union(*gaps.values())), label)
        ax.set_xlabel(STEP_LABEL)
        ax.set_ylabel("fraction of scored tokens")
        ax.set_title(f"tokens with {sign} Δ (mean ± s.e. over seeds)")
        ax.set_ylim(-0.02, 1.02)
        if all_steps:
            ax.set_xlim(min(all_steps) - 0.5, max(all_steps) + 0.5)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=9, loc="upper right")
        else:
            _note(ax, "no method with teacher evidence")
    return fig


def plot_delta(results: dict[str, Any], path: Path | str) -> Path:
    """Figure 4: fractions of tokens with positive (left) and negative (right) Δ over training steps, for each
    method with teacher evidence (non-zero Δ fractions: CEPO, RLSD) in its :func:`method_color`, mean over
    seeds with a ± s.e. band; steps where the teacher was skipped (λ = 0) are gaps, named in a note."""
    return _save(delta_figure(results), path)
