"""``cepo plot`` and the ``cepo compare`` report, on synthetic run folders (no training)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from matplotlib.colors import to_hex
from matplotlib.container import ErrorbarContainer
from PIL import Image
from rich.console import Console

from cepo.plots import (
    FIG_DPI,
    FIG_SIZE,
    METHOD_COLORS,
    cli_plot,
    curves_figure,
    delta_figure,
    evidence_note,
    gap_note,
    load_eval,
    load_metrics,
    method_color,
    plot_curves,
    plot_delta,
    plot_run,
    run_figures,
    teacher_active,
)
from cepo.report import collect, paired_interval, t_quantile, table_markdown, write_report
from cepo.stats import auc, mean_se

SUITES = ("test", "long")
PNG_SIZE = (int(FIG_SIZE[0] * FIG_DPI), int(FIG_SIZE[1] * FIG_DPI))


def write_run(
    root: Path,
    method: str,
    seed: int,
    *,
    steps: int = 4,
    final: dict[str, float] | None = None,
    base: dict[str, float] | None = None,
    greedy: float = 0.9,
    eval_every: int = 2,
    delta: tuple[float, float] | None = None,
    finished: bool = True,
    label: str | None = None,
    config_extra: str = "",
) -> Path:
    """A run folder as the trainer writes it: held-out accuracy moves linearly from ``base`` to ``final``.
    ``label``: the folder (a variant's; default the method); ``config_extra``: more config.yaml lines."""
    run = root / (label or method) / f"seed{seed}"
    run.mkdir(parents=True)
    run.joinpath("config.yaml").write_text(
        f"name: {method}-s{seed}\nseed: {seed}\nalgorithm:\n  method: {method}\n  steps: {steps}\n"
        + config_extra
    )
    final = final or dict.fromkeys(SUITES, 0.5)
    base = base or dict.fromkeys(SUITES, 0.2)
    if delta is None:
        delta = (0.0, 0.0) if method == "grpo" else (0.3, 0.1)
    with run.joinpath("metrics.jsonl").open("w") as fh:
        for i in range(steps):
            row = {
                "step": i,
                "policy_version": i + 1,
                "method": method,
                "lam": 0.5,
                "reward_mean": 0.3 + 0.05 * i,
                "accuracy": 0.3 + 0.05 * i,
                "zero_variance_groups": 1,
                "groups": 4,
                "tokens": 1000,
                "stage_seconds": {"gen": 1.0, "teacher": 0.5 if method != "grpo" else 0.0, "update": 2.0},
                "step_seconds": 3.6,
                "tokens_per_s": 300.0,
                "delta_pos_frac": delta[0],
                "delta_neg_frac": delta[1] + 0.01 * i * (delta[1] > 0),
                "weight_clip_frac": 0.02 if method != "grpo" else 0.0,
                "abs_adv_before": 0.4,
                "abs_adv_after": 0.45,
                "negatives_found": 3,
                "loss": 0.1,
                "grad_norm": 1.0,
                "ppo_clip_frac": 0.01,
                "lr": 1e-5,
            }
            fh.write(json.dumps(row) + "\n")
    points = sorted({*range(0, steps + 1, eval_every), steps})
    last: dict[str, float] = {}
    with run.joinpath("eval.jsonl").open("w") as fh:
        for st in points:
            for suite in SUITES:
                acc = base[suite] + (final[suite] - base[suite]) * st / steps
                g = greedy if st else 0.8
                line = {"step": st, "policy_version": st, "suite": suite, "sampled": acc, "sampled_se": 0.03}
                line |= {"greedy": g, "greedy_se": 0.02, "n": 200, "samples": 1}
                fh.write(json.dumps(line) + "\n")
                last[suite] = acc
    if finished:
        trained = dict(last, average=sum(last.values()) / len(last))
        summary = {
            "method": method,
            "steps": steps,
            "base": dict(base, average=sum(base.values()) / len(base)),
            "trained": trained,
            "base_greedy": dict.fromkeys([*SUITES, "average"], 0.8),
            "trained_greedy": dict.fromkeys([*SUITES, "average"], greedy),
        }
        run.joinpath("summary.json").write_text(json.dumps(summary))
    return run


def assert_png(path: Path, size: tuple[int, int] = PNG_SIZE) -> None:
    assert path.exists() and path.stat().st_size > 0, path
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == size
        im.verify()


# ------------------------------------------------------------------------------------------------ statistics


def test_mean_se_by_hand():
    assert mean_se([0.4]) == (0.4, 0.0)
    m, se = mean_se([0.4, 0.5])
    assert m == pytest.approx(0.45) and se == pytest.approx(0.05)  # std √0.005, / √2
    m, se = mean_se([1.0, 2.0, 3.0, 6.0])
    assert m == pytest.approx(3.0) and se == pytest.approx(math.sqrt(14 / 3) / 2)
    with pytest.raises(ValueError):
        mean_se([])


def test_auc_by_hand():
    # a constant curve: its AUC is the constant
    assert auc([(0, 0.3), (10, 0.3)], 10) == pytest.approx(0.3)
    # 0 → 1 linearly over 10 steps: mean 0.5; order of the points does not matter
    assert auc([(10, 1.0), (0, 0.0)], 10) == pytest.approx(0.5)
    # two trapezoids: [0, 2] mean 0.2, [2, 6] mean 0.6 → (2·0.2 + 4·0.6) / 6
    assert auc([(0, 0.0), (2, 0.4), (6, 0.8)], 6) == pytest.approx((0.4 + 2.4) / 6)
    # horizon between points: interpolate at 5 (0.5 on the segment 0.4 → 0.8 from 2 to 6 gives 0.7)
    want = (2 * 0.2 + 3 * (0.4 + 0.7) / 2) / 5
    assert auc([(0, 0.0), (2, 0.4), (6, 0.8), (8, 0.0)], 5) == pytest.approx(want)
    # points beyond the horizon are ignored
    assert auc([(0, 0.2), (4, 0.6), (9, 0.0)], 4) == pytest.approx(0.4)


def test_auc_errors():
    with pytest.raises(ValueError, match="step 0"):
        auc([(2, 0.4), (6, 0.8)], 4)
    with pytest.raises(ValueError, match="step 0"):
        auc([], 4)
    with pytest.raises(ValueError, match="before the horizon"):
        auc([(0, 0.4), (2, 0.8)], 4)
    with pytest.raises(ValueError, match="positive"):
        auc([(0, 0.4), (2, 0.8)], 0)


# ----------------------------------------------------------------------------------------------- plot_run


def test_malformed_line_names_file_and_line(tmp_path):
    run = write_run(tmp_path, "cepo", 1)
    text = run.joinpath("metrics.jsonl").read_text().splitlines()
    text[2] = text[2][:-5]  # truncated JSON on line 3
    run.joinpath("metrics.jsonl").write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 3"):
        load_metrics(run)
    run.joinpath("eval.jsonl").write_text('{"step": 0}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"eval\.jsonl: line 2"):
        load_eval(run)
    with pytest.raises(ValueError, match="line 3"):
        plot_run(run)


def test_loaders_missing_files(tmp_path):
    assert load_metrics(tmp_path) == [] and load_eval(tmp_path) == []


def test_plot_run_missing_or_empty_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "metrics.jsonl")):
        plot_run(tmp_path)
    tmp_path.joinpath("metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no steps"):
        plot_run(tmp_path)


@pytest.mark.parametrize("method", ["cepo", "grpo"])
def test_plot_run(tmp_path, method):
    run = write_run(tmp_path, method, 1, steps=6)
    paths = plot_run(run)
    names = ["reward_accuracy.png", "delta_fractions.png", "clip_rate.png", "timing.png"]
    assert [p.name for p in paths] == names
    for p in paths:
        assert p.parent == run / "plots"
        assert_png(p)
    note = evidence_note(load_metrics(run), method)
    assert note == ("no teacher evidence (method grpo)" if method == "grpo" else None)


def test_a_skipped_update_is_summarised_and_plotted(tmp_path):
    """A skipped update's NaN loss, norm and clip fraction reach metrics.jsonl as null (JSON has no NaN): the
    run's timing summary and its figures still work, the figures showing a gap."""
    from cepo.stats import median_stages
    from cepo_proto.pipeline import StepReport

    run = write_run(tmp_path, "cepo", 1, steps=3)
    rows = load_metrics(run)
    nan = float("nan")
    fields = {k: rows[-1][k] for k in StepReport.model_fields if k in rows[-1]}
    fields.update(step=3, adapter_version=3, loss=nan, grad_norm=nan, ppo_clip_frac=nan, update_skipped=True)
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write(StepReport(**fields).model_dump_json() + "\n")
    skipped = load_metrics(run)[-1]
    assert skipped["loss"] is None and skipped["update_skipped"]
    assert median_stages(load_metrics(run))["step_s"] == 3.6
    for path in plot_run(run):
        assert_png(path)


def test_plot_run_without_eval_and_cli(tmp_path):
    run = write_run(tmp_path, "rlsd", 1, steps=1, finished=False)
    run.joinpath("eval.jsonl").unlink()
    out = tmp_path / "figs"
    console = Console(record=True, width=400)
    paths = cli_plot(run, out, console)
    assert len(paths) == 4 and all(p.parent == out for p in paths)
    for p in paths:
        assert_png(p)
    printed = console.export_text()
    assert all(str(p) in printed for p in paths)

    from typer.testing import CliRunner

    from cepo.cli import app

    done = CliRunner().invoke(app, ["plot", "--run", str(run)])
    assert done.exit_code == 0 and (run / "plots" / "timing.png").is_file()
    # the same run by its id under --root (its path below the root, or a unique prefix of it)
    for name in ("rlsd/seed1", "rlsd/se", "seed1"):
        out = tmp_path / "by-id" / name.replace("/", "_")
        done = CliRunner().invoke(app, ["plot", "--run", name, "--root", str(tmp_path), "--out", str(out)])
        assert done.exit_code == 0 and (out / "timing.png").is_file(), done.output
    done = CliRunner().invoke(app, ["plot", "--run", "rlsb/seed1", "--root", str(tmp_path)])
    assert (
        done.exit_code == 2
        and "no run 'rlsb/seed1'" in done.output
        and "close matches: rlsd/seed1" in done.output
    )
    done = CliRunner().invoke(app, ["plot", "--run", str(tmp_path / "nothing")])
    assert done.exit_code == 2 and f"no run folder {tmp_path / 'nothing'}: no such folder" in done.output
    (tmp_path / "empty").mkdir()
    done = CliRunner().invoke(app, ["plot", "--run", str(tmp_path / "empty")])
    assert done.exit_code == 2 and "metrics.jsonl" in done.output  # a folder: the command says what it lacks


# ------------------------------------------------------------------------------ what the figures promise


def _lines(fig, gid: str) -> list:
    return [line for ax in fig.axes for line in ax.get_lines() if line.get_gid() == gid]


def _line(fig, gid: str):
    (line,) = _lines(fig, gid)
    return line


def _skip_teacher_from(run: Path, first: int) -> None:
    """From step ``first`` on λ = 0: the controller skips the teacher, the step report has zero Δ fractions."""
    rows = load_metrics(run)
    for row in rows[first:]:
        row.update(lam=0.0, delta_pos_frac=0.0, delta_neg_frac=0.0, weight_clip_frac=0.0)
    run.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_teacher_skipped_steps_are_gaps_not_zeros(tmp_path):
    run = write_run(tmp_path, "cepo", 1, steps=6)
    _skip_teacher_from(run, 3)
    figs = run_figures(run)
    delta, clip = figs["delta_fractions.png"], figs["clip_rate.png"]
    for fig, gid in ((delta, "delta_pos_frac"), (delta, "delta_neg_frac"), (clip, "weight_clip_frac")):
        line = _line(fig, gid)
        assert list(line.get_xdata()) == list(range(1, 7))  # steps done: the k-th step at k
        ys = list(line.get_ydata())
        assert all(math.isfinite(y) and y > 0 for y in ys[:3]), (gid, ys)
        assert all(math.isnan(y) for y in ys[3:]), (gid, ys)
    # the gaps are shaded and the legend says why
    for fig in (delta, clip):
        labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
        assert "gaps: λ = 0 at steps 4–6 (teacher skipped)" in labels  # the 4th to the 6th step
        assert any(p.get_gid() == "teacher-skipped" for ax in fig.axes for p in ax.patches)
    assert gap_note(load_metrics(run), "cepo") == "gaps: λ = 0 at steps 4–6 (teacher skipped)"
    assert teacher_active(load_metrics(run), "cepo") == [True] * 3 + [False] * 3
    # the PPO clip rate keeps its zeros-free values on its own panel, with a y range that shows them
    ppo = _line(clip, "ppo_clip_frac")
    assert list(ppo.get_ydata()) == [0.01] * 6
    assert ppo.axes is not _line(clip, "weight_clip_frac").axes
    assert ppo.axes.get_ylim()[1] == pytest.approx(1.3 * 0.01)


@pytest.mark.parametrize("method", ["grpo", "opsd"])
def test_a_method_without_teacher_has_no_delta_at_all(tmp_path, method):
    run = write_run(tmp_path, method, 1, steps=4, delta=(0.0, 0.0))
    figs = run_figures(run)
    for fig, gid in (
        (figs["delta_fractions.png"], "delta_pos_frac"),
        (figs["clip_rate.png"], "weight_clip_frac"),
    ):
        assert all(math.isnan(y) for y in _line(fig, gid).get_ydata())
        notes = [t.get_text() for ax in fig.axes for t in ax.texts if t.get_gid() == "note"]
        assert any(f"no teacher evidence (method {method})" in n for n in notes), notes
    assert teacher_active(load_metrics(run), method) == [False] * 4  # λ = 0.5 in every step: still no teacher


def test_ppo_clip_note_with_one_optimizer_step(tmp_path):
    run = write_run(tmp_path, "cepo", 1, steps=3)
    rows = [dict(r, ppo_clip_frac=0.0, optimizer_steps=1) for r in load_metrics(run)]
    run.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    clip = run_figures(run)["clip_rate.png"]
    ax = _line(clip, "ppo_clip_frac").axes
    assert ax.get_ylim()[0] < 0.0 < ax.get_ylim()[1]  # the zero line sits above the axis, not on it
    assert any("learner.mini_batches × ppo_epochs = 1" in t.get_text() for t in ax.texts)


def test_train_reward_and_accuracy_both_visible_when_equal(tmp_path):
    run = write_run(tmp_path, "cepo", 1, steps=5)
    fig = run_figures(run)["reward_accuracy.png"]
    reward, accuracy = _line(fig, "train:reward"), _line(fig, "train:accuracy")
    assert list(reward.get_ydata()) == list(accuracy.get_ydata())  # a 0/1 reward: the same numbers
    assert reward.get_linestyle() == "-" and accuracy.get_linestyle() == "--"
    assert (
        accuracy.get_marker() not in (None, "None", "")
        and reward.get_linewidth() > 2 * accuracy.get_linewidth()
    )
    assert accuracy.get_zorder() > reward.get_zorder()
    assert reward.get_color() != accuracy.get_color()
    assert "(= accuracy: 0/1 reward)" in reward.get_label()


def test_heldout_points_have_error_bars_and_are_not_joined_across_gaps(tmp_path):
    run = write_run(tmp_path, "cepo", 1, steps=8, eval_every=2, config_extra="eval:\n  every: 2\n")
    rows = [r for r in load_eval(run) if r["step"] not in (4, 6)]  # a gap of 6 steps in the evaluations
    run.joinpath("eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = run_figures(run)["reward_accuracy.png"]
    ax = _line(fig, "heldout:average:points").axes
    labels = [c.get_label() for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert labels == ["test (sampled)", "long (sampled)", "average (sampled)"]
    for c in ax.containers:
        assert c.has_yerr
        segments = c.lines[2][0].get_segments()
        assert [seg[0][0] for seg in segments] == [0, 2, 8]  # one bar per evaluation point
        heights = [s[1][1] - s[0][1] for s in segments]
        se = 0.03 if c.get_label() != "average (sampled)" else math.sqrt(2 * 0.03**2) / 2
        assert heights == pytest.approx([2 * se] * len(heights))
    joined = _line(fig, "heldout:average:joined")
    xs = list(joined.get_xdata())
    assert xs[:2] == [0, 2] and math.isnan(joined.get_ydata()[2]) and xs[3:] == [8]
    gap = _line(fig, "heldout:average:gap")
    assert list(gap.get_xdata())[:2] == [2, 8] and gap.get_linestyle() == "--"


def test_x_axis_is_steps_done(tmp_path):
    """Training step k (report step k − 1) at k, held-out after k steps at k: the last evaluation of a 30-step
    run sits on the last training step, not one past the end of a 0–29 axis."""
    run = write_run(tmp_path, "cepo", 1, steps=30, eval_every=10)
    figs = run_figures(run)
    fig = figs["reward_accuracy.png"]
    train = _line(fig, "train:accuracy")
    assert list(train.get_xdata()) == list(range(1, 31))
    points = _line(fig, "heldout:average:points")
    assert list(points.get_xdata()) == [0, 10, 20, 30]  # eval.jsonl's steps done, the base policy at 0
    assert max(train.get_xdata()) == max(points.get_xdata())
    lo, hi = points.axes.get_xlim()
    assert lo == pytest.approx(-0.5) and hi == pytest.approx(30.5)
    for name, fig in figs.items():
        assert all(ax.get_xlabel() in ("steps done", "") for ax in fig.axes), name
        assert any(ax.get_xlabel() == "steps done" for ax in fig.axes), name
    assert list(_line(figs["clip_rate.png"], "ppo_clip_frac").get_xdata()) == list(range(1, 31))


def test_compare_delta_figure_gaps_where_lambda_is_zero(tmp_path):
    for seed in (1, 2):
        run = write_run(tmp_path, "cepo", seed, steps=6)
        _skip_teacher_from(run, 4)
        write_run(tmp_path, "grpo", seed, steps=6)
    results = collect(tmp_path, ["grpo", "cepo"], [1, 2])
    fig = delta_figure(results)
    for key in ("pos", "neg"):
        ys = list(_line(fig, f"delta:{key}:cepo").get_ydata())
        assert all(math.isfinite(y) for y in ys[:4]) and all(math.isnan(y) for y in ys[4:]), ys
    assert not _lines(fig, "delta:pos:grpo")  # no teacher: not drawn
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "gaps: teacher skipped (λ = 0), steps 5–6" in labels  # reports 4 and 5: the 5th and 6th steps
    assert list(_line(fig, "delta:pos:cepo").get_xdata()) == list(range(1, 7))
    assert fig.axes[0].get_xlabel() == "steps done"
    # the run folders gone (a results.json read elsewhere): steps with both fractions exactly 0 are gaps too
    for seed in (1, 2):
        results["runs"]["cepo"][str(seed)]["path"] = str(tmp_path / "elsewhere")
    ys = list(_line(delta_figure(results), "delta:pos:cepo").get_ydata())
    assert all(math.isnan(y) for y in ys[4:])


def test_a_method_has_one_colour_in_every_figure(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for m in ("grpo", "cepo"):
        write_run(a, m, 1)
    for m in ("rlsd", "cepo", "grpo"):
        write_run(b, m, 1)
    write_run(b, "cepo", 1, label="cepo-rollout")
    first = collect(a, ["grpo", "cepo"], [1])
    second = collect(b, ["cepo", "rlsd", "cepo-rollout", "grpo"], [1])  # another order, a variant
    colours: dict[str, set[str]] = {}

    def note(m: str, artist) -> None:
        colours.setdefault(m, set()).add(to_hex(artist.get_color()))

    for results in (first, second):
        curves, delta = curves_figure(results), delta_figure(results)
        for m in results["methods"]:
            note(m, _line(curves, f"curve:{m}:points"))
            note(m, _line(curves, f"curve:{m}:joined"))
            for line in _lines(delta, f"delta:pos:{m}") + _lines(delta, f"delta:neg:{m}"):
                note(m, line)
    note("cepo", _line(run_figures(a / "cepo" / "seed1")["reward_accuracy.png"], "heldout:average:points"))
    note("cepo", _line(run_figures(a / "cepo" / "seed1")["reward_accuracy.png"], "train:accuracy"))
    for m, seen in colours.items():
        assert seen == {method_color(m)}, (m, seen)
    assert method_color("cepo") == METHOD_COLORS["cepo"] and method_color("CEPO") == METHOD_COLORS["cepo"]
    # a variant label: a colour of its own, derived from the name (the same in another process)
    variant = method_color("cepo-rollout")
    assert variant == method_color("CEPO-ROLLOUT") and variant not in METHOD_COLORS.values()
    assert len({method_color(f"variant-{i}") for i in range(20)}) == 20


# ------------------------------------------------------------------------------------------------- report


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """grpo seeds at average 0.40 / 0.50, cepo at 0.60 / 0.70, rlsd seed 2 unfinished, sdpo absent."""
    for seed, acc in ((1, 0.40), (2, 0.50)):
        write_run(tmp_path, "grpo", seed, final=dict.fromkeys(SUITES, acc), greedy=0.85)
    write_run(tmp_path, "cepo", 1, final={"test": 0.7, "long": 0.5}, greedy=0.95)
    write_run(tmp_path, "cepo", 2, final={"test": 0.8, "long": 0.6}, greedy=0.93)
    write_run(tmp_path, "rlsd", 1, final=dict.fromkeys(SUITES, 0.52), base=dict.fromkeys(SUITES, 0.26))
    write_run(tmp_path, "rlsd", 2, base=dict.fromkeys(SUITES, 0.26), finished=False)
    tmp_path.joinpath("compare.json").write_text('{"argv": ["cepo", "compare"]}')
    return tmp_path


METHODS = ["grpo", "sdpo", "rlsd", "cepo"]


def test_collect_numbers(out_dir):
    r = collect(out_dir, METHODS, 2)
    assert r["suites"] == list(SUITES) and r["horizon"] == 2 and r["steps"] == [4]
    assert r["samples"] == [1] and r["n"] == [200]
    grpo = r["aggregate"]["grpo"]
    assert grpo["seeds"] == 2
    assert grpo["sampled"]["average"]["mean"] == pytest.approx(0.45)
    assert grpo["sampled"]["average"]["se"] == pytest.approx(0.05)
    assert grpo["greedy"]["average"]["mean"] == pytest.approx(0.85)
    cepo = r["aggregate"]["cepo"]
    assert cepo["sampled"]["test"]["mean"] == pytest.approx(0.75)
    assert cepo["sampled"]["average"]["mean"] == pytest.approx(0.65)
    # AUC@2 for cepo seed 1: average goes 0.2 → 0.6 over 4 steps, so over [0, 2] it averages 0.3
    assert r["runs"]["cepo"]["1"]["auc"] == pytest.approx(0.3)
    assert r["runs"]["grpo"]["1"]["curve"] == [
        [0, pytest.approx(0.2)],
        [2, pytest.approx(0.3)],
        [4, pytest.approx(0.4)],
    ]
    # base: step 0 of every run found, the unfinished rlsd seed 2 included (4 runs at 0.2, 2 at 0.26)
    assert r["base"]["runs"] == 6
    assert r["base"]["sampled"]["average"]["mean"] == pytest.approx((4 * 0.2 + 2 * 0.26) / 6)
    assert r["base"]["greedy"]["average"]["mean"] == pytest.approx(0.8)
    missing = {(m["method"], m["seed"]): m["reason"] for m in r["missing"]}
    assert set(missing) == {("sdpo", 1), ("sdpo", 2), ("rlsd", 2)}
    assert "unfinished" in missing[("rlsd", 2)] and "no run folder" in missing[("sdpo", 1)]
    assert r["aggregate"]["sdpo"]["seeds"] == 0 and r["aggregate"]["rlsd"]["seeds"] == 1
    delta = r["aggregate"]["cepo"]["delta"]
    assert [d["step"] for d in delta] == [0, 1, 2, 3] and delta[0]["pos"] == pytest.approx(0.3)
    assert delta[3]["neg"] == pytest.approx(0.13)
    json.dumps(r)  # plain JSON
    assert collect(out_dir, ["grpo"], [1], horizon=4)["runs"]["grpo"]["1"]["auc"] == pytest.approx(0.3)


def test_collect_checks_summary_against_eval(out_dir):
    run = out_dir / "grpo" / "seed1"
    summary = json.loads(run.joinpath("summary.json").read_text())
    summary["trained"]["test"] = 0.99
    run.joinpath("summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match=r"summary\.json"):
        collect(out_dir, ["grpo"], [1])


def test_table_markdown(out_dir):
    r = collect(out_dir, METHODS, 2)
    table = table_markdown(r)
    main, rest = table.split("**Paired differences from GRPO.**")
    paired, efficiency = rest.split("**Sample efficiency.**")
    lines = main.splitlines()
    header = next(line for line in lines if line.startswith("| Method"))
    assert header == "| Method | test | long | Average | Greedy avg | AUC@2 |"
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ")}
    assert list(rows)[:6] == ["Method", "---", "Base", "GRPO", "SDPO", "RLSD"]
    assert "| 45.0 ± 5.0 | 45.0 ± 5.0 | 45.0 ± 5.0 | 85.0 ± 0.0 |" in rows["GRPO"]
    base_avg = 100 * (4 * 0.2 + 2 * 0.26) / 6
    assert rows["Base"].startswith("| Base |") and f"{base_avg:.1f} ± " in rows["Base"]
    # the best method mean of each column is bold, and only there
    assert "**75.0 ± 5.0**" in rows["CEPO"] and "**65.0 ± 5.0**" in rows["CEPO"]
    assert "**94.0 ± 1.0**" in rows["CEPO"] and "**" not in rows["GRPO"] and "**" not in rows["Base"]
    assert "**55.0 ± 5.0**" in rows["CEPO"]  # long: cepo 0.5 / 0.6 beats rlsd 0.52
    # AUC@2: rlsd climbs 0.26 → 0.39 over steps 0–2 (32.5), cepo 0.2 → 0.4 / 0.45 (30.0 / 32.5)
    assert rows["RLSD"].endswith("| **32.5 ± 0.0** |") and rows["CEPO"].endswith(
        "| {:.1f} ± {:.1f} |".format(*(100 * x for x in mean_se([0.3, 0.325])))
    )
    assert rows["SDPO"].count("—") == 5
    assert "2 seeds" in table and "4 training steps" in table and "1 sample per problem" in table
    assert "AUC@2" in table and "steps 0–2" in table
    # sample-efficiency table: one column per evaluated step
    assert "| Method | step 0 | step 2 | step 4 |" in efficiency
    assert "| GRPO | 20.0 ± 0.0 | 32.5 ± 2.5 | 45.0 ± 5.0 |" in efficiency
    assert "rlsd/seed2: unfinished" in table and "sdpo/seed1: no run folder" in table
    # paired with GRPO by seed: CEPO is 20 points ahead on both seeds, RLSD has one seed, SDPO none
    assert "| CEPO | 2 | +20.0 [+20.0, +20.0] | +5.0 [+5.0, +5.0] |" in paired
    assert "| RLSD | 1 | +12.0 [n/a] |" in paired and "| SDPO | 0 | — | — | — | — |" in paired


def test_report_figures_and_files(out_dir):
    paths = write_report(out_dir, METHODS, [1, 2])
    assert set(paths) == {"table", "figure1", "figure4", "results"}
    assert paths["table"].read_text().startswith("**Table 2.**")
    assert_png(paths["figure1"])
    assert_png(paths["figure4"], (12 * FIG_DPI, PNG_SIZE[1]))
    results = json.loads(paths["results"].read_text())
    assert results["aggregate"]["grpo"]["sampled"]["average"]["mean"] == pytest.approx(0.45)
    assert table_markdown(results) == paths["table"].read_text()  # the table can be rebuilt from results.json


def test_report_with_nothing_finished(tmp_path):
    write_run(tmp_path, "cepo", 1, finished=False)
    r = collect(tmp_path, ["cepo"], 1)
    assert r["horizon"] is None and r["base"]["runs"] == 1 and len(r["missing"]) == 1
    assert "| CEPO | — | — | — | — | — |" in table_markdown(r)
    assert_png(plot_curves(r, tmp_path / "f1.png"))
    assert_png(plot_delta(r, tmp_path / "f4.png"), (12 * FIG_DPI, PNG_SIZE[1]))


def test_compare_keeps_finished_runs_and_redoes_unfinished_ones(tmp_path, monkeypatch):
    """`cepo compare` resumes: finished (method, seed) runs are kept, an interrupted one starts over.

    Training itself is replaced by a writer of finished run folders here; the real training path runs in
    test_train_cli.py and test_methods_pipeline.py.
    """
    import cepo.run
    from cepo.compare import parse_methods, run_compare
    from cepo.config import load_config

    out = tmp_path / "cmp"
    write_run(out, "grpo", 1)
    write_run(out, "cepo", 1)
    stale = out / "cepo" / "seed2"
    stale.mkdir(parents=True)
    (stale / "metrics.jsonl").write_text('{"step": 0}\n')  # interrupted: no summary.json
    trained = []

    def fake_train(cfg, run_dir, *, steps=None, console=None):
        trained.append((cfg.algorithm.method, cfg.seed, cfg.data.seed, run_dir.name))
        assert not run_dir.exists()  # the interrupted folder was cleared first
        write_run(out, cfg.algorithm.method, cfg.seed)

    monkeypatch.setattr(cepo.run, "train", fake_train)
    cfg = load_config(None, ["data.source=arithmetic"])
    console = Console(file=io.StringIO(), width=200)
    paths = run_compare(cfg, out, ["grpo", "cepo"], 2, command="cepo compare …", console=console)
    assert trained == [("grpo", 2, 2, "seed2"), ("cepo", 2, 2, "seed2")]
    assert paths["table"].read_text().count("± ") > 0 and paths["figure1"].is_file()
    assert json.loads((out / "compare.json").read_text())["command"] == "cepo compare …"

    trained.clear()  # a second invocation redoes nothing
    run_compare(cfg, out, ["grpo", "cepo"], 2, console=console)
    assert trained == []
    other = load_config(None, ["data.source=arithmetic", "algorithm.eps_w=0.2"])
    with pytest.raises(ValueError, match="another configuration"):
        run_compare(other, out, ["grpo", "cepo"], 2, console=console)
    with pytest.raises(ValueError, match="unknown"):
        parse_methods("grpo,ppo")
    with pytest.raises(ValueError, match="twice"):
        parse_methods("grpo,grpo")


# ------------------------------------------------------------------------ variants and paired differences


def test_t_quantile_against_tables():
    # two-sided 95 % critical values of Student's t (R: qt(0.975, df))
    known = {
        1: 12.706204736174700,
        2: 4.302652729749460,
        3: 3.182446305283710,
        4: 2.776445105197790,
        5: 2.570581835636310,
        10: 2.228138851986270,
        20: 2.085963447265860,
        30: 2.042272456301240,
        100: 1.983971518523550,
    }
    for df, want in known.items():
        assert t_quantile(0.975, df) == pytest.approx(want, rel=1e-9), df
    assert t_quantile(0.995, 5) == pytest.approx(4.032142983557536, rel=1e-9)
    assert t_quantile(0.95, 10) == pytest.approx(1.812461122811676, rel=1e-9)
    assert t_quantile(0.025, 4) == pytest.approx(-2.776445105197790, rel=1e-9)
    assert t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-12)
    assert 1.959 < t_quantile(0.975, 5000) < 1.961  # tends to the normal's 1.95996
    for q, df in ((0.0, 3), (1.0, 3), (0.9, 0), (0.9, 2.5)):
        with pytest.raises(ValueError):
            t_quantile(q, df)


def test_paired_interval_by_hand():
    r = paired_interval([1, 2, 3, 4, 5])
    sd = math.sqrt(2.5)  # squared deviations 4+1+0+1+4 = 10, over n−1 = 4
    half = 2.776445105197790 * sd / math.sqrt(5)  # = 1.96324…
    assert r["n"] == 5 and r["mean"] == pytest.approx(3.0) and r["sd"] == pytest.approx(sd)
    assert r["half_width"] == pytest.approx(half) and half == pytest.approx(1.963243, abs=1e-6)
    assert (r["low"], r["high"]) == (pytest.approx(3 - half), pytest.approx(3 + half))
    assert r["zero_inside"] is False
    r = paired_interval([-1, 0.5, 2])  # mean 0.5, sd 1.5: 0.5 ± 4.3027·1.5/√3 contains 0
    assert (
        r["half_width"] == pytest.approx(4.302652729749460 * 1.5 / math.sqrt(3)) and r["zero_inside"] is True
    )
    r = paired_interval([0.04])  # one seed: no interval
    assert r["mean"] == pytest.approx(0.04) and r["half_width"] is None and r["zero_inside"] is None
    with pytest.raises(ValueError):
        paired_interval([])


ROLLOUT = {"teacher.negative_scope": "rollout"}
ROLLOUT_VARIANT = {"method": "cepo", "overrides": ["teacher.negative_scope=rollout"], "changes": ROLLOUT}
# final held-out averages per seed 1..3; GRPO is the baseline
FINALS = {
    "grpo": (0.40, 0.50, 0.45),
    "rlsd": (0.50, 0.60, 0.56),  # +10, +10, +11 points: the interval excludes 0
    "cepo": (0.42, 0.53, 0.50),  # +2, +3, +5: the interval contains 0
    "cepo-rollout": (0.45, 0.55, 0.45),  # +5, +5, 0
}


@pytest.fixture
def variant_dir(tmp_path) -> Path:
    """3 seeds × grpo, rlsd, cepo, and the variant cepo-rollout (CEPO with teacher.negative_scope=rollout),
    as `cepo train --run-dir OUT/<label>/seed<k>` leaves them (no compare.json)."""
    for label, finals in FINALS.items():
        for seed, acc in enumerate(finals, start=1):
            method = "cepo" if label == "cepo-rollout" else label
            extra = "teacher:\n  negative_scope: rollout\n" if label == "cepo-rollout" else ""
            delta = (0.2, 0.05) if label == "cepo-rollout" else None
            kw = {"label": label, "config_extra": extra, "delta": delta}
            write_run(tmp_path, method, seed, final=dict.fromkeys(SUITES, acc), **kw)
    return tmp_path


VARIANT_ROWS = ["grpo", "rlsd", "cepo", "cepo-rollout"]


def test_paired_differences_from_grpo(variant_dir):
    r = collect(variant_dir, VARIANT_ROWS, 3, variants={"cepo-rollout": ROLLOUT_VARIANT})
    assert r["variants"] == {"cepo-rollout": ROLLOUT_VARIANT} and r["horizon"] == 2
    assert r["aggregate"]["cepo-rollout"]["seeds"] == 3 and not r["warnings"]
    paired = r["paired"]
    assert paired["baseline"] == "grpo" and paired["level"] == 0.95
    assert paired["metrics"] == ["average", "auc", "delta_pos", "delta_neg"]
    assert set(paired["rows"]) == {"rlsd", "cepo", "cepo-rollout"}
    for label, finals in FINALS.items():
        if label == "grpo":
            continue
        diffs = [a - b for a, b in zip(finals, FINALS["grpo"], strict=True)]
        row = paired["rows"][label]
        want = paired_interval(diffs)
        assert row["average"]["seeds"] == [1, 2, 3] and row["average"]["diffs"] == pytest.approx(diffs)
        for key in ("mean", "sd", "half_width", "low", "high"):
            assert row["average"][key] == pytest.approx(want[key]), (label, key)
        assert row["average"]["zero_inside"] is want["zero_inside"]
        # AUC@2 of a curve from 0.2 rising linearly to the final at step 4 is 0.2 + (final − 0.2) / 4
        assert row["auc"]["mean"] == pytest.approx(want["mean"] / 4)
        assert row["auc"]["half_width"] == pytest.approx(want["half_width"] / 4)
    assert paired["rows"]["rlsd"]["average"]["zero_inside"] is False
    assert paired["rows"]["cepo"]["average"]["zero_inside"] is True
    assert paired["rows"]["cepo"]["average"]["half_width"] == pytest.approx(
        4.302652729749460 * math.sqrt(7 / 3) / 100 / math.sqrt(3)
    )
    # evidence: GRPO has no teacher (Δ fractions 0); CEPO's Δ>0 is 0.3 at every step of every seed
    pos = paired["rows"]["cepo"]["delta_pos"]
    assert pos["mean"] == pytest.approx(0.3) and pos["half_width"] == pytest.approx(0.0)
    assert pos["zero_inside"] is False
    assert paired["rows"]["cepo"]["delta_neg"]["mean"] == pytest.approx(0.1 + 0.015)  # 0.10, 0.11, 0.12, 0.13
    assert paired["rows"]["cepo-rollout"]["delta_pos"]["mean"] == pytest.approx(0.2)

    table = table_markdown(r)
    section = table.split("**Paired differences from GRPO.**")[1].split("**Sample efficiency.**")[0]
    rows = {line.split(" | ")[0][2:]: line for line in section.splitlines() if line.startswith("| ")}
    assert rows["Method"] == "| Method | Seeds | Average | AUC@2 | Δ > 0 tokens | Δ < 0 tokens |"
    assert list(rows)[2:] == ["RLSD", "CEPO", "CEPO-ROLLOUT"]
    assert rows["RLSD"].startswith("| RLSD | 3 | +10.3 [+8.9, +11.8] | +2.6 [+2.2, +2.9] |")
    assert rows["CEPO"].startswith("| CEPO | 3 | +3.3 [-0.5, +7.1] not significant |")
    assert "| +30.0 [+30.0, +30.0] |" in rows["CEPO"]
    assert rows["CEPO-ROLLOUT"].startswith("| CEPO-ROLLOUT | 3 | +3.3 [-3.8, +10.5] not significant |")
    assert "95 % confidence interval" in section and "n−1 degrees of freedom" in section
    # the variant's row in Table 2 and what it is
    assert "| CEPO-ROLLOUT | " in table.split("**Paired differences")[0]
    assert "- CEPO-ROLLOUT (`cepo-rollout/`): CEPO with `teacher.negative_scope=rollout`" in table

    # one seed: a difference, no interval
    one = table_markdown(collect(variant_dir, VARIANT_ROWS, [2], variants={"cepo-rollout": ROLLOUT_VARIANT}))
    assert "| RLSD | 1 | +10.0 [n/a] | +2.5 [n/a] |" in one
    # no baseline among the rows: no paired table
    no_base = collect(variant_dir, ["rlsd", "cepo"], 3)
    assert no_base["paired"] is None and "Paired differences" not in table_markdown(no_base)
    # another baseline
    vs_cepo = collect(variant_dir, VARIANT_ROWS, 3, baseline="cepo")["paired"]
    assert set(vs_cepo["rows"]) == {"grpo", "rlsd", "cepo-rollout"}
    assert vs_cepo["rows"]["grpo"]["average"]["mean"] == pytest.approx(-0.1 / 3)


def test_report_of_variant_runs_made_by_cepo_train(variant_dir):
    """No compare.json: the variant's method comes from its runs; with one, its settings are checked."""
    paths = write_report(variant_dir, VARIANT_ROWS, 3)
    results = json.loads(paths["results"].read_text())
    assert results["variants"] == {"cepo-rollout": {"method": "cepo", "overrides": None, "changes": None}}
    assert results["paired"]["rows"]["cepo-rollout"]["average"]["n"] == 3
    assert table_markdown(results) == paths["table"].read_text()  # rebuilt from results.json
    assert "CEPO with settings as in its runs' config.yaml" in paths["table"].read_text()
    assert_png(paths["figure1"])

    # compare.json's variants are read when none are passed
    record = {"command": "cepo compare", "variants": {"cepo-rollout": ROLLOUT_VARIANT}}
    variant_dir.joinpath("compare.json").write_text(json.dumps(record))
    assert collect(variant_dir, VARIANT_ROWS, 3)["variants"] == {"cepo-rollout": ROLLOUT_VARIANT}
    # a run whose config.yaml contradicts the variant is refused, naming the file and the key
    config = variant_dir / "cepo-rollout" / "seed2" / "config.yaml"
    config.write_text(config.read_text().replace("rollout", "group"))
    with pytest.raises(ValueError, match=r"seed2/config\.yaml: teacher\.negative_scope is 'group'"):
        collect(variant_dir, VARIANT_ROWS, 3)
    # a config.yaml that does not record the key (an older run) is a warning
    config.write_text(config.read_text().replace("teacher:\n  negative_scope: group\n", ""))
    r = collect(variant_dir, VARIANT_ROWS, 3)
    assert any("does not record teacher.negative_scope" in w for w in r["warnings"])
    # a run of another method in the variant's folder is refused
    config.write_text(config.read_text().replace("method: cepo", "method: rlsd"))
    with pytest.raises(ValueError, match=r"algorithm\.method 'rlsd', but the folder says 'cepo'"):
        collect(variant_dir, VARIANT_ROWS, 3)


def test_parse_methods_variants():
    from cepo.compare import Entry, parse_methods

    got = parse_methods("grpo, rlsd,cepo,cepo-rollout=cepo:teacher.negative_scope=rollout")
    assert got == [
        Entry("grpo", "grpo"),
        Entry("rlsd", "rlsd"),
        Entry("cepo", "cepo"),
        Entry("cepo-rollout", "cepo", ("teacher.negative_scope=rollout",)),
    ]
    assert [e.is_variant for e in got] == [False, False, False, True]
    # ';' between settings; commas inside brackets and quotes stay in the value
    got = parse_methods("cepo,c2=cepo:algorithm.lambda0=0.0;data.eval_suites=[test, unseen_mix];name='a,b'")
    assert got[1] == Entry(
        "c2", "cepo", ("algorithm.lambda0=0.0", "data.eval_suites=[test, unseen_mix]", "name='a,b'")
    )
    assert parse_methods("plain=grpo") == [Entry("plain", "grpo")]
    bad = {
        "grpo,ppo": "unknown",
        "grpo,grpo": "twice",
        "x=cepo:a.b=1,x=rlsd:c.d=2": "twice",
        "cepo:teacher.negative_scope=rollout": "no label",
        "rlsd=cepo:teacher.negative_scope=rollout": "is a method's name",
        "CEPO=cepo:teacher.negative_scope=rollout": "is a method's name",
        "a/b=cepo:teacher.negative_scope=rollout": "folder name",
        "x=ppo:teacher.negative_scope=rollout": "unknown method 'ppo'",
        "x=cepo:teacher.negative_scope": "dotted.key=value",
        "x=cepo:algorithm.method=rlsd": "set by the comparison",
        "x=cepo:seed=3": "set by the comparison",
        "x=cepo:data.seed=3": "set by the comparison",
        "": "unknown",
    }
    for text, message in bad.items():
        with pytest.raises(ValueError, match=message):
            parse_methods(text)


def test_compare_runs_a_variant_into_its_folder(tmp_path, monkeypatch):
    import cepo.run
    from cepo.compare import parse_methods, run_compare
    from cepo.config import ConfigError, load_config

    out = tmp_path / "cmp"
    trained = []

    def fake_train(cfg, run_dir, *, steps=None, console=None):
        trained.append(
            (run_dir.parent.name, cfg.algorithm.method, cfg.seed, cfg.teacher.negative_scope, cfg.name)
        )
        label = run_dir.parent.name
        extra = f"teacher:\n  negative_scope: {cfg.teacher.negative_scope}\n"
        write_run(out, cfg.algorithm.method, cfg.seed, label=label, config_extra=extra)

    monkeypatch.setattr(cepo.run, "train", fake_train)
    cfg = load_config(None, ["data.source=arithmetic"])
    console = Console(file=io.StringIO(), width=200)

    # a bad key fails before anything runs, naming the key; so does a bad value
    for spec, message in (
        ("grpo,x=cepo:teacher.negative_scop=rollout", "unknown key 'teacher.negative_scop'"),
        ("grpo,x=cepo:teacher.negative_scope=nobody", "teacher.negative_scope: got 'nobody'"),
    ):
        with pytest.raises(ConfigError, match=message):
            run_compare(cfg, out, parse_methods(spec), 2, console=console)
        assert trained == [] and not (out / "compare.json").exists()

    rows = parse_methods("grpo,cepo,cepo-rollout=cepo:teacher.negative_scope=rollout")
    paths = run_compare(cfg, out, rows, 2, command="cepo compare …", console=console)
    assert [t[:4] for t in trained] == [
        ("grpo", "grpo", 1, "group"),
        ("cepo", "cepo", 1, "group"),
        ("cepo-rollout", "cepo", 1, "rollout"),
        ("grpo", "grpo", 2, "group"),
        ("cepo", "cepo", 2, "group"),
        ("cepo-rollout", "cepo", 2, "rollout"),
    ]
    assert trained[2][4].endswith("-cepo-rollout-seed1")
    record = json.loads((out / "compare.json").read_text())
    assert record["methods"] == ["grpo", "cepo", "cepo-rollout"]
    assert record["variants"] == {"cepo-rollout": ROLLOUT_VARIANT}
    table = paths["table"].read_text()
    assert "| CEPO-ROLLOUT | " in table and "**Paired differences from GRPO.**" in table
    assert "`teacher.negative_scope=rollout`" in table
    results = json.loads(paths["results"].read_text())
    assert set(results["paired"]["rows"]) == {"cepo", "cepo-rollout"}

    trained.clear()  # finished runs are kept; the same variant again runs nothing
    run_compare(cfg, out, rows, 2, console=console)
    assert trained == []
    # the same label with other settings is refused; so is a kept run that is not what its row says
    with pytest.raises(
        ValueError, match=r"variant 'cepo-rollout' run as cepo with teacher\.negative_scope=rollout"
    ):
        run_compare(
            cfg, out, parse_methods("cepo-rollout=cepo:teacher.negative_scope=group"), 2, console=console
        )
    config = out / "cepo-rollout" / "seed1" / "config.yaml"
    config.write_text(config.read_text().replace("negative_scope: rollout", "negative_scope: group"))
    with pytest.raises(ValueError, match="negative_scope is 'group'"):
        run_compare(cfg, out, rows, 2, console=console)
    assert trained == []
