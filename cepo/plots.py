"""``cepo plot --run DIR``: the figures of one run folder, drawn from ``metrics.jsonl`` and ``eval.jsonl``.

A run folder (written by the trainer) holds ``config.yaml``, ``metrics.jsonl`` (one
:class:`~cepo_proto.pipeline.StepReport` per step, ``step`` 0-based), ``eval.jsonl`` (one line per held-out
evaluation point and suite, ``step`` = steps done, 0 = the base policy) and, once finished, ``summary.json``.

:func:`plot_run` writes four PNGs into ``RUN/plots/``: ``reward_accuracy.png``, ``delta_fractions.png``,
``clip_rate.png`` and ``timing.png``. Every figure is written for every method; a run without teacher evidence
(GRPO) gets its Δ and evidence-clip panels with a note instead of being skipped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "FIG_DPI",
    "FIG_SIZE",
    "cli_plot",
    "eval_by_step",
    "evidence_note",
    "load_eval",
    "load_jsonl",
    "load_metrics",
    "plot_run",
    "run_method",
]

# Every figure has a fixed pixel size (no tight bounding box), so that its dimensions are predictable.
FIG_SIZE = (8.0, 5.0)
FIG_DPI = 100
PLOT_FILES = ("reward_accuracy.png", "delta_fractions.png", "clip_rate.png", "timing.png")


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=FIG_SIZE, dpi=FIG_DPI, layout="constrained", squeeze=False)
    return plt, fig, list(axes[0])


def _save(plt, fig, path: Path) -> Path:
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
    return [float(r.get(key, 0.0)) for r in metrics]


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
