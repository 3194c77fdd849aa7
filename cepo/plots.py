"""``cepo plot --run DIR``: the figures of one run folder, drawn from ``metrics.jsonl`` and ``eval.jsonl``.

A run folder (written by the trainer) holds ``config.yaml``, ``metrics.jsonl`` (one
:class:`~cepo_proto.pipeline.StepReport` per step, ``step`` 0-based), ``eval.jsonl`` (one line per held-out
evaluation point and suite, ``step`` = steps done, 0 = the base policy) and, once finished, ``summary.json``.

:func:`plot_run` writes four PNGs into ``RUN/plots/``: ``reward_accuracy.png``, ``delta_fractions.png``,
``clip_rate.png`` and ``timing.png``. Every figure is written for every method; a run without teacher evidence
(GRPO) gets its Δ and evidence-clip panels with a note instead of being skipped.

The ``cepo compare`` report (:mod:`cepo.report`) draws its figures here too, from its collected results:
:func:`plot_curves` (held-out accuracy against the step, Figure 1) and :func:`plot_delta` (the Δ+/Δ− token
fractions, Figure 4). Every figure comes from the same :func:`_figure` / :func:`_save` pair.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "FIG_DPI",
    "FIG_SIZE",
    "cli_plot",
    "display_name",
    "eval_by_step",
    "evidence_note",
    "load_eval",
    "load_jsonl",
    "load_metrics",
    "plot_curves",
    "plot_delta",
    "plot_run",
    "run_method",
]

# Every figure has a fixed pixel size (no tight bounding box), so that its dimensions are predictable.
FIG_SIZE = (8.0, 5.0)
FIG_DPI = 100
PLOT_FILES = ("reward_accuracy.png", "delta_fractions.png", "clip_rate.png", "timing.png")


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


def eval_by_step(rows: Sequence[dict[str, Any]]) -> dict[int, dict[str, dict[str, Any]]]:
    """``{step: {suite: line}}`` sorted by step; a repeated (step, suite) keeps its last line."""
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(int(row["step"]), {})[str(row["suite"])] = row
    return dict(sorted(out.items()))


def run_method(run_dir: Path | str, metrics: Sequence[dict[str, Any]] | None = None) -> str:
    """The run's method: from its step reports, else ``config.yaml``'s ``algorithm.method``, else ``"?"``."""
    for row in metrics or ():
        if row.get("method"):
            return str(row["method"])
    cfg_path = Path(run_dir) / "config.yaml"
    if cfg_path.exists():
        import yaml

        cfg = yaml.safe_load(cfg_path.read_text()) or {}
        method = (cfg.get("algorithm") or {}).get("method") if isinstance(cfg, dict) else None
        if method:
            return str(method)
    return "?"


def evidence_note(metrics: Sequence[dict[str, Any]], method: str) -> str | None:
    """The note drawn on the Δ and evidence-clip panels when the run has no teacher evidence, else None."""
    has_delta = any(
        float(r.get("delta_pos_frac", 0.0)) != 0.0 or float(r.get("delta_neg_frac", 0.0)) != 0.0
        for r in metrics
    )
    if has_delta:
        return None
    return f"no teacher evidence (method {method})"


def _figure(ncols: int = 1):
    """A figure of ``ncols`` axes side by side: ``FIG_SIZE`` for one, 12 inches wide for more (same height)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = FIG_SIZE[0] if ncols == 1 else 12.0
    fig, axes = plt.subplots(
        1, ncols, figsize=(width, FIG_SIZE[1]), dpi=FIG_DPI, layout="constrained", squeeze=False
    )
    return plt, fig, list(axes[0])


def _save(plt, fig, path: Path | str) -> Path:
    """Write ``fig`` to ``path`` (creating its folder) at ``FIG_DPI`` and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=FIG_DPI)
    finally:
        plt.close(fig)
    return path


def _note(ax, text: str) -> None:
    ax.text(
        0.5,
        0.5,
        text,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=12,
        color="0.3",
        bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.6"},
    )


def _col(metrics: Sequence[dict[str, Any]], key: str) -> list[float]:
    """One metric per step; null (a skipped update's NaN stats, as JSON writes them) is a gap in the line."""
    return [math.nan if r.get(key, 0.0) is None else float(r.get(key, 0.0)) for r in metrics]


def _decorate(ax, ylabel: str, title: str, legend_loc: str) -> None:
    """Axis labels, title, grid and legend shared by every per-step figure."""
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc=legend_loc)


def _plot_reward_accuracy(metrics, evals, title: str, path: Path) -> Path:
    plt, fig, (ax,) = _figure()
    steps = [int(r["step"]) for r in metrics]
    ax.plot(steps, _col(metrics, "reward_mean"), label="train reward mean", color="C0")
    ax.plot(steps, _col(metrics, "accuracy"), label="train accuracy", color="C1")
    by_step = eval_by_step(evals)
    if by_step:
        suites = list(dict.fromkeys(s for lines in by_step.values() for s in lines))
        for i, suite in enumerate(suites):
            pts = [(st, float(lines[suite]["sampled"])) for st, lines in by_step.items() if suite in lines]
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                markersize=3,
                linewidth=1,
                alpha=0.7,
                color=f"C{i + 2}",
                label=f"held-out {suite} (sampled)",
            )
        avg = [
            (st, sum(float(line["sampled"]) for line in lines.values()) / len(lines))
            for st, lines in by_step.items()
            if set(suites) <= set(lines)
        ]
        if avg and len(suites) > 1:
            ax.plot(
                [p[0] for p in avg],
                [p[1] for p in avg],
                marker="s",
                linestyle="--",
                linewidth=2,
                color="black",
                label="held-out average (sampled)",
            )
    _decorate(ax, "reward / accuracy", f"{title}: reward and accuracy", "best")
    return _save(plt, fig, path)


def _plot_delta(metrics, note: str | None, title: str, path: Path) -> Path:
    plt, fig, (ax,) = _figure()
    steps = [int(r["step"]) for r in metrics]
    ax.plot(steps, _col(metrics, "delta_pos_frac"), label="Δ > 0 (evidence for the token)", color="C2")
    ax.plot(steps, _col(metrics, "delta_neg_frac"), label="Δ < 0 (evidence against the token)", color="C3")
    ax.set_ylim(-0.02, 1.02)
    _decorate(ax, "fraction of response tokens", f"{title}: tokens with positive / negative Δ", "upper right")
    if note:
        _note(ax, note)
    return _save(plt, fig, path)


def _plot_clip(metrics, note: str | None, title: str, path: Path) -> Path:
    plt, fig, (ax,) = _figure()
    steps = [int(r["step"]) for r in metrics]
    ax.plot(steps, _col(metrics, "weight_clip_frac"), label="evidence weight clipped", color="C4")
    ax.plot(steps, _col(metrics, "ppo_clip_frac"), label="PPO ratio clipped", color="C5")
    ax.set_ylim(bottom=0.0)
    _decorate(ax, "fraction of tokens", f"{title}: clip rates", "upper right")
    if note:
        _note(ax, f"{note}: evidence-weight clip is 0")
    return _save(plt, fig, path)


def _plot_timing(metrics, title: str, path: Path) -> Path:
    plt, fig, (ax,) = _figure()
    steps = [int(r["step"]) for r in metrics]
    stages = list(dict.fromkeys(k for r in metrics for k in (r.get("stage_seconds") or {})))
    if stages:
        ys = [[float((r.get("stage_seconds") or {}).get(k, 0.0)) for r in metrics] for k in stages]
        if len(steps) == 1:  # a stack plot of one point is invisible: draw stacked bars instead
            bottom = 0.0
            for k, y in zip(stages, ys, strict=True):
                ax.bar(steps, y, bottom=bottom, label=k, width=0.6)
                bottom += y[0]
        else:
            ax.stackplot(steps, ys, labels=stages, alpha=0.85)
    else:
        _note(ax, "no stage timings recorded")
    if any("step_seconds" in r for r in metrics):
        ax.plot(steps, _col(metrics, "step_seconds"), color="black", linewidth=1.2, label="step total")
    _decorate(ax, "seconds", f"{title}: time per step by stage", "upper right")
    return _save(plt, fig, path)


def plot_run(run_dir: Path | str, out_dir: Path | str | None = None) -> list[Path]:
    """Write the four figures of a run folder (into ``RUN/plots/`` unless ``out_dir``); return their paths.

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
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    method = run_method(run_dir, metrics)
    name = run_dir.name
    if name.startswith("seed"):  # OUT/<method>/seed<k>/ of a comparison
        name = f"{run_dir.parent.name}/{name}"
    title = f"{name} ({method})"
    note = evidence_note(metrics, method)
    return [
        _plot_reward_accuracy(metrics, evals, title, out / PLOT_FILES[0]),
        _plot_delta(metrics, note, title, out / PLOT_FILES[1]),
        _plot_clip(metrics, note, title, out / PLOT_FILES[2]),
        _plot_timing(metrics, title, out / PLOT_FILES[3]),
    ]


def cli_plot(run_dir: Path | str, out_dir: Path | str | None, console) -> list[Path]:
    """``cepo plot``: draw the run's figures and print each written path on ``console`` (a rich Console)."""
    paths = plot_run(run_dir, out_dir)
    for path in paths:
        console.print(str(path), highlight=False, soft_wrap=True)
    return paths


# ------------------------------------------------------------------------------- figures of a comparison


def _band(ax, points: Sequence[dict[str, float]], key: str, se_key: str, scale: float, **style) -> None:
    xs = [p["step"] for p in points]
    ys = [scale * p[key] for p in points]
    se = [scale * p[se_key] for p in points]
    (line,) = ax.plot(xs, ys, **style)
    ax.fill_between(
        xs,
        [y - e for y, e in zip(ys, se, strict=True)],
        [y + e for y, e in zip(ys, se, strict=True)],
        color=line.get_color(),
        alpha=0.2,
        linewidth=0,
    )


def plot_curves(results: dict[str, Any], path: Path | str) -> Path:
    """Figure 1: held-out average sampled accuracy vs training step, one line per method (mean over seeds with
    a ± standard-error band), the base policy as a dashed horizontal line."""
    plt, fig, (ax,) = _figure()
    drawn = 0
    for i, m in enumerate(results["methods"]):
        curve = results["aggregate"].get(m, {}).get("curve") or []
        if not curve:
            continue
        n = results["aggregate"][m]["seeds"]
        label = f"{display_name(m)} (n={n})"
        _band(ax, curve, "mean", "se", 100.0, color=f"C{i}", marker="o", markersize=3, label=label)
        drawn += 1
    base = results["base"]["sampled"].get("average")
    if base:
        ax.axhline(100 * base["mean"], color="0.4", linestyle="--", linewidth=1.2, label="base")
    if not drawn:
        ax.text(0.5, 0.5, "no finished runs", transform=ax.transAxes, ha="center", va="center", color="0.3")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out accuracy, average over suites (%)")
    ax.set_title("Held-out accuracy during training (mean ± s.e. over seeds)")
    ax.grid(alpha=0.3)
    if drawn or base:
        ax.legend(fontsize=9, loc="best")
    return _save(plt, fig, path)


def _has_evidence(delta: Sequence[dict[str, float]]) -> bool:
    return any(p["pos"] != 0.0 or p["neg"] != 0.0 for p in delta)


def plot_delta(results: dict[str, Any], path: Path | str) -> Path:
    """Figure 4: fractions of tokens with positive (left) and negative (right) Δ over training steps, for each
    method with teacher evidence (non-zero Δ fractions: CEPO, RLSD), mean over seeds with a ± s.e. band."""
    plt, fig, (ax_pos, ax_neg) = _figure(ncols=2)
    drawn = []
    for i, m in enumerate(results["methods"]):
        delta = results["aggregate"].get(m, {}).get("delta") or []
        if not _has_evidence(delta):
            continue
        _band(ax_pos, delta, "pos", "pos_se", 1.0, color=f"C{i}", label=display_name(m))
        _band(ax_neg, delta, "neg", "neg_se", 1.0, color=f"C{i}", label=display_name(m))
        drawn.append(m)
    for ax, sign in ((ax_pos, "positive"), (ax_neg, "negative")):
        ax.set_xlabel("training step")
        ax.set_ylabel("fraction of response tokens")
        ax.set_title(f"tokens with {sign} Δ")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=9, loc="best")
        else:
            ax.text(
                0.5,
                0.5,
                "no method with teacher evidence",
                transform=ax.transAxes,
                ha="center",
                va="center",
                color="0.3",
            )
    return _save(plt, fig, path)
