"""The ``cepo compare`` report: Table 2, Figure 1 and Figure 4 of the paper from a folder of finished runs.

Layout: ``OUT/<method>/seed<k>/`` is a run folder (``config.yaml``, ``metrics.jsonl``, ``eval.jsonl``,
``summary.json``); anything else in ``OUT`` (``compare.json``, the command line) is ignored.

Per method and seed, :func:`collect` reads the final held-out accuracy (the last evaluation point of
``eval.jsonl``, checked against ``summary.json``'s ``trained``), the curve of the average sampled accuracy over
the suites against the training step, its AUC over the first ``H`` steps and the Δ+/Δ− token fractions of every
step. The base row is the step-0 evaluation of every run found (all runs start from the same policy). A missing
or unfinished run is listed under ``"missing"`` rather than failing the report.

Every number in the result is a fraction in [0, 1]; the table shows percent. The statistics are
:mod:`cepo.stats`; the figures (:func:`~cepo.plots.plot_curves`, :func:`~cepo.plots.plot_delta`) are drawn by
:mod:`cepo.plots`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cepo.plots import display_name, eval_by_step, load_eval, load_metrics, plot_curves, plot_delta
from cepo.stats import auc, mean_se

__all__ = [
    "collect",
    "table_markdown",
    "write_report",
]

# ``summary.json`` and ``eval.jsonl`` both store floats written by json; they agree to far better than this.
_TOL = 1e-6
_DASH = "—"


# --------------------------------------------------------------------------------------------------- collect


def _seed_list(seeds: int | Iterable[int]) -> list[int]:
    return list(range(1, seeds + 1)) if isinstance(seeds, int) else [int(s) for s in seeds]


def _avg(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _point(lines: dict[str, dict[str, Any]], suites: Sequence[str], key: str) -> dict[str, float] | None:
    """``{suite: acc, ..., "average": acc}`` of one evaluation point, or None if any suite lacks ``key``."""
    vals = {}
    for s in suites:
        v = lines[s].get(key)
        if v is None:
            return None
        vals[s] = float(v)
    vals["average"] = _avg(list(vals.values()))
    return vals


def _run(path: Path, method: str) -> dict[str, Any]:
    """Everything the report needs from one finished run folder (its AUC is filled in by :func:`collect`)."""
    summary = json.loads((path / "summary.json").read_text())
    if summary.get("method") not in (None, method):
        raise ValueError(
            f"{path / 'summary.json'}: method {summary['method']!r}, but the folder says {method!r}"
        )
    by_step = eval_by_step(load_eval(path))
    suites = list(dict.fromkeys(s for lines in by_step.values() for s in lines))
    # an evaluation point counts only when every suite was evaluated there (a killed run may leave half of one)
    complete = {st: lines for st, lines in by_step.items() if set(suites) <= set(lines)}
    if not complete:
        raise ValueError(f"{path / 'eval.jsonl'}: no evaluation point covers every suite {suites}")
    curve = [[st, _point(lines, suites, "sampled")["average"]] for st, lines in complete.items()]
    greedy_curve = [
        [st, g["average"]]
        for st, lines in complete.items()
        if (g := _point(lines, suites, "greedy")) is not None
    ]
    last_step = max(complete)
    final = _point(complete[last_step], suites, "sampled")
    final_greedy = _point(complete[last_step], suites, "greedy")
    for key, got in (("trained", final), ("trained_greedy", final_greedy)):
        want = summary.get(key)
        if not want or got is None:
            continue
        for name, value in got.items():
            if name in want and abs(float(want[name]) - value) > _TOL:
                raise ValueError(
                    f"{path}: eval.jsonl's last point (step {last_step}) has {name} = {value:.6f} but "
                    f"summary.json's {key} has {float(want[name]):.6f}"
                )
    lines0 = complete.get(0)
    metrics = sorted(load_metrics(path), key=lambda r: int(r["step"]))
    return {
        "path": str(path),
        "steps": int(summary.get("steps", len(metrics))),
        "suites": suites,
        "final_step": last_step,
        "final": {"sampled": final, "greedy": final_greedy},
        "base": None
        if lines0 is None
        else {"sampled": _point(lines0, suites, "sampled"), "greedy": _point(lines0, suites, "greedy")},
        "curve": curve,
        "greedy_curve": greedy_curve,
        "auc": None,
        "delta": [
            [int(r["step"]), float(r.get("delta_pos_frac", 0.0)), float(r.get("delta_neg_frac", 0.0))]
            for r in metrics
        ],
        "samples": sorted(
            {int(line.get("samples", 1)) for lines in complete.values() for line in lines.values()}
        ),
        "n": sorted(
            {int(line["n"]) for lines in complete.values() for line in lines.values() if "n" in line}
        ),
    }


def _base_points(path: Path) -> dict[str, Any] | None:
    """The step-0 evaluation of a run folder (finished or not), or None."""
    by_step = eval_by_step(load_eval(path))
    lines0 = by_step.get(0)
    if not lines0:
        return None
    suites = list(lines0)
    return {"sampled": _point(lines0, suites, "sampled"), "greedy": _point(lines0, suites, "greedy")}


def _stat(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    m, se = mean_se(values)
    return {"mean": m, "se": se, "n": len(values)}


def _stats_by_key(dicts: Sequence[dict[str, float] | None], keys: Sequence[str]) -> dict[str, Any]:
    return {k: _stat([d[k] for d in dicts if d is not None and k in d]) for k in keys}


def _curve_stats(curves: Sequence[Sequence[Sequence[float]]]) -> list[dict[str, float]]:
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for st, v in curve:
            by_step.setdefault(int(st), []).append(float(v))
    return [{"step": st, **_stat(vs)} for st, vs in sorted(by_step.items())]


def _delta_stats(deltas: Sequence[Sequence[Sequence[float]]]) -> list[dict[str, float]]:
    by_step: dict[int, list[tuple[float, float]]] = {}
    for rows in deltas:
        for st, pos, neg in rows:
            by_step.setdefault(int(st), []).append((float(pos), float(neg)))
    out = []
    for st, vs in sorted(by_step.items()):
        pos_m, pos_se = mean_se([p for p, _ in vs])
        neg_m, neg_se = mean_se([q for _, q in vs])
        out.append({"step": st, "pos": pos_m, "pos_se": pos_se, "neg": neg_m, "neg_se": neg_se, "n": len(vs)})
    return out


def collect(
    out_dir: Path | str, methods: Sequence[str], seeds: int | Iterable[int], horizon: int | None = None
) -> dict[str, Any]:
    """Read ``OUT/<method>/seed<k>/`` for every method and seed; return every number of the report.

    ``seeds`` is a count ``S`` (seeds 1..S) or the seed numbers. ``horizon`` (H of AUC@H) defaults to half the
    steps of the shortest finished run. The result is plain JSON (string keys, lists): ``base`` (step-0 accuracy,
    mean ± se over every run found), ``runs[method][seed]`` (one run's numbers), ``aggregate[method]`` (mean ±
    se over its seeds), ``missing`` (runs absent or unfinished, with the reason) and ``warnings``.
    """
    out_dir = Path(out_dir)
    seed_list = _seed_list(seeds)
    runs: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in methods}
    missing: list[dict[str, Any]] = []
    warnings: list[str] = []
    base_found: list[dict[str, Any]] = []
    for method in methods:
        for seed in seed_list:
            path = out_dir / method / f"seed{seed}"
            entry = {"method": method, "seed": seed, "path": str(path)}
            if not path.is_dir():
                missing.append({**entry, "reason": "no run folder"})
                continue
            if not (path / "summary.json").exists():
                missing.append({**entry, "reason": "unfinished (no summary.json)"})
                if (base := _base_points(path)) is not None:
                    base_found.append(base)
                continue
            if not load_eval(path):
                missing.append({**entry, "reason": "no held-out evaluations (eval.jsonl missing or empty)"})
                continue
            run = _run(path, method)
            runs[method][str(seed)] = run
            if run["base"] is not None:
                base_found.append(run["base"])
            else:
                warnings.append(f"{path}: no step-0 evaluation (not in the base row, no AUC)")

    finished = [r for per in runs.values() for r in per.values()]
    if horizon is None and finished:
        horizon = max(1, min(r["steps"] for r in finished) // 2)
    suites = list(dict.fromkeys(s for r in finished for s in r["suites"]))
    if not suites:
        suites = list(dict.fromkeys(s for b in base_found for s in b["sampled"] if s != "average"))
    for method, per in runs.items():
        for seed, run in per.items():
            if horizon is None or run["base"] is None:
                continue
            try:
                run["auc"] = auc([(s, v) for s, v in run["curve"]], horizon)
            except ValueError as exc:
                warnings.append(f"{method}/seed{seed}: no AUC@{horizon}: {exc}")

    keys = [*suites, "average"]
    aggregate = {}
    for method, per in runs.items():
        rs = list(per.values())
        aggregate[method] = {
            "seeds": len(rs),
            "sampled": _stats_by_key([r["final"]["sampled"] for r in rs], keys),
            "greedy": _stats_by_key([r["final"]["greedy"] for r in rs], keys),
            "auc": _stat([r["auc"] for r in rs if r["auc"] is not None]),
            "curve": _curve_stats([r["curve"] for r in rs]),
            "greedy_curve": _curve_stats([r["greedy_curve"] for r in rs]),
            "delta": _delta_stats([r["delta"] for r in rs]),
        }
    return {
        "out_dir": str(out_dir),
        "methods": list(methods),
        "seeds": seed_list,
        "horizon": horizon,
        "suites": suites,
        "steps": sorted({r["steps"] for r in finished}),
        "samples": sorted({s for r in finished for s in r["samples"]}),
        "n": sorted({n for r in finished for n in r["n"]}),
        "base": {
            "runs": len(base_found),
            "sampled": _stats_by_key([b["sampled"] for b in base_found], keys),
            "greedy": _stats_by_key([b["greedy"] for b in base_found], keys),
        },
        "runs": runs,
        "aggregate": aggregate,
        "missing": missing,
        "warnings": warnings,
    }


# ---------------------------------------------------------------------------------------------------- tables


def _cell(stat: dict[str, float] | None, bold: bool = False) -> str:
    if not stat:
        return _DASH
    text = f"{100 * stat['mean']:.1f} ± {100 * stat['se']:.1f}"
    return f"**{text}**" if bold else text


def _span(values: Sequence[int], unit: str) -> str:
    if not values:
        return f"? {unit}s"
    text = str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"
    return f"{text} {unit}{'' if values == [1] else 's'}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def table_markdown(results: dict[str, Any]) -> str:
    """Table 2 of the paper in markdown, then a sample-efficiency table and the list of missing runs.

    Rows: Base, then the methods in order; columns: each held-out suite, Average, Greedy avg and AUC@H. Cells are
    percent, mean ± standard error over seeds; the best mean of each column among the methods is bold.
    """
    suites = list(results["suites"])
    methods = list(results["methods"])
    agg = results["aggregate"]
    h = results["horizon"]
    h_text = "H" if h is None else str(h)
    columns: list[tuple[str, Any]] = [(s, ("sampled", s)) for s in suites]
    columns += [("Average", ("sampled", "average")), ("Greedy avg", ("greedy", "average"))]
    columns.append((f"AUC@{h_text}", ("auc", None)))

    def stat(method: str, col: tuple[str, str | None]) -> dict[str, float] | None:
        kind, key = col
        a = agg.get(method)
        if not a:
            return None
        return a["auc"] if kind == "auc" else a[kind].get(key)

    best: dict[int, float] = {}
    for i, (_, col) in enumerate(columns):
        means = [s["mean"] for m in methods if (s := stat(m, col))]
        if means:
            best[i] = max(means)

    seeds = results["seeds"]
    found = sorted({a["seeds"] for a in agg.values()})
    seeds_text = f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}"
    if found and found != [len(seeds)]:
        per = ", ".join(f"{display_name(m)} {agg[m]['seeds']}" for m in methods if m in agg)
        seeds_text += f" requested (found: {per})"
    samples = results.get("samples") or []
    n = results.get("n") or []
    caption = (
        f"Held-out accuracy (%), mean ± standard error over {seeds_text}; {_span(results['steps'], 'training step')}; "
        f"{_span(samples, 'sample')} per problem (sampled at temperature 1.0"
        + (f", {_span(n, 'problem')} per suite" if n else "")
        + f"); Greedy avg: greedy decoding, average over suites; AUC@{h_text}: mean held-out average sampled "
        f"accuracy over training steps 0–{h_text} (trapezoid rule). Base: the step-0 evaluation of "
        f"{results['base']['runs']} run(s). Bold: best mean among the methods."
    )
    lines = [f"**Table 2.** {caption}", ""]
    lines.append(_row(["Method", *(name for name, _ in columns)]))
    lines.append(_row(["---", *("---:" for _ in columns)]))
    base = results["base"]
    base_cells = [_cell(base["sampled"].get(s)) for s in suites]
    base_cells += [_cell(base["sampled"].get("average")), _cell(base["greedy"].get("average")), _DASH]
    lines.append(_row(["Base", *base_cells]))
    for m in methods:
        cells = []
        for i, (_, col) in enumerate(columns):
            s = stat(m, col)
            cells.append(_cell(s, bold=s is not None and i in best and abs(s["mean"] - best[i]) <= 1e-12))
        lines.append(_row([display_name(m), *cells]))

    # sample efficiency: held-out average sampled accuracy at every evaluated step
    steps = sorted({p["step"] for m in methods if m in agg for p in agg[m]["curve"]})
    lines += [
        "",
        "**Sample efficiency.** Held-out average sampled accuracy (%) at each evaluated training step, "
        "mean ± standard error over seeds.",
        "",
    ]
    if steps:
        lines.append(_row(["Method", *(f"step {st}" for st in steps)]))
        lines.append(_row(["---", *("---:" for _ in steps)]))
        for m in methods:
            at = {p["step"]: p for p in agg.get(m, {}).get("curve", [])}
            lines.append(_row([display_name(m), *(_cell(at.get(st)) for st in steps)]))
    else:
        lines.append("(no finished runs)")

    if results["missing"]:
        lines += ["", "**Missing runs** (not in the tables):", ""]
        lines += [f"- {x['method']}/seed{x['seed']}: {x['reason']}" for x in results["missing"]]
    if results.get("warnings"):
        lines += ["", "**Warnings:**", ""]
        lines += [f"- {w}" for w in results["warnings"]]
    return "\n".join(lines) + "\n"


def write_report(
    out_dir: Path | str, methods: Sequence[str], seeds: int | Iterable[int], horizon: int | None = None
) -> dict[str, Path]:
    """Collect the runs under ``out_dir`` and write ``table.md``, ``figure1_heldout_accuracy.png``,
    ``figure4_delta_fractions.png`` and ``results.json`` there; return ``{"table", "figure1", "figure4",
    "results"}`` → path."""
    out_dir = Path(out_dir)
    results = collect(out_dir, methods, seeds, horizon)
    paths = {
        "table": out_dir / "table.md",
        "figure1": out_dir / "figure1_heldout_accuracy.png",
        "figure4": out_dir / "figure4_delta_fractions.png",
        "results": out_dir / "results.json",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    paths["table"].write_text(table_markdown(results), encoding="utf-8")
    plot_curves(results, paths["figure1"])
    plot_delta(results, paths["figure4"])
    paths["results"].write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return paths
