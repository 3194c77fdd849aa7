"""The ``cepo compare`` report: Table 2, Figure 1 and Figure 4 of the paper from a folder of finished runs.

Layout: ``OUT/<label>/seed<k>/`` is a run folder (``config.yaml``, ``metrics.jsonl``, ``eval.jsonl``,
``summary.json``) — ``cepo compare`` writes them, ``cepo train --run-dir`` into the same folders does too. A label
is a method's name or a variant's (the method under other settings, :mod:`cepo.compare`); the variants are
passed in or read from ``OUT/compare.json``, and each variant run's ``config.yaml`` is checked against its
settings. A label that is neither takes its method from the run's ``summary.json``.

Per method and seed, :func:`collect` reads the final held-out accuracy (the last evaluation point of
``eval.jsonl``, checked against ``summary.json``'s ``trained``), the curve of the average sampled accuracy over
the suites against the training step, its AUC over the first ``H`` steps and the Δ+/Δ− token fractions of every
step. The base row is the step-0 evaluation of every run found (all runs start from the same policy). A missing
or unfinished run is listed under ``"missing"`` rather than failing the report.

Paired differences from the baseline (GRPO): runs with the same seed start from the same data order and initial
rollouts, so each method's final average, AUC@H and mean Δ+/Δ− fractions are compared with the baseline's seed
by seed — the mean of the differences with a Student-t confidence interval on n−1 degrees of freedom
(:func:`paired_interval`, :func:`t_quantile`).

Every number in the result is a fraction in [0, 1]; the table shows percent. The statistics are
:mod:`cepo.stats`; the figures (:func:`~cepo.plots.plot_curves`, :func:`~cepo.plots.plot_delta`) are drawn by
:mod:`cepo.plots`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from cepo.plots import display_name, eval_by_step, load_eval, load_metrics, plot_curves, plot_delta
from cepo.stats import auc, mean_se

__all__ = [
    "PAIRED_METRICS",
    "check_run_folder",
    "collect",
    "paired_interval",
    "t_quantile",
    "table_markdown",
    "write_report",
]

# ``summary.json`` and ``eval.jsonl`` both store floats written by json; they agree to far better than this.
_TOL = 1e-6
_DASH = "—"
_MISSING = object()
LEVEL = 0.95
# the paired comparison with the baseline: (key, column title; "{h}" is AUC's horizon)
PAIRED_METRICS = (
    ("average", "Average"),
    ("auc", "AUC@{h}"),
    ("delta_pos", "Δ > 0 tokens"),
    ("delta_neg", "Δ < 0 tokens"),
)


# ------------------------------------------------------------------------------------------------ intervals


def _t_abs_cdf(t: float, df: int) -> float:
    """P(|T| ≤ t), t ≥ 0, for Student's t with an integer ``df`` ≥ 1: the closed form of Abramowitz & Stegun
    26.7.3–4 in θ = atan(t / √df)."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:  # (2/π)(θ + sin θ (cos θ + 2/3 cos³θ + … + 2·4⋯(df−3) / 1·3⋯(df−2) cos^(df−2) θ))
        if df == 1:
            return 2 * theta / math.pi
        total = term = math.cos(theta)
        for k in range(3, df - 1, 2):
            term *= c2 * (k - 1) / k
            total += term
        return 2 / math.pi * (theta + s * total)
    total = term = 1.0  # sin θ (1 + 1/2 cos²θ + … + 1·3⋯(df−3) / 2·4⋯(df−2) cos^(df−2) θ)
    for k in range(2, df - 1, 2):
        term *= c2 * (k - 1) / k
        total += term
    return s * total


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t distribution with ``df`` (a positive integer) degrees of freedom, e.g.
    ``t_quantile(0.975, 4)`` = 2.776…: the exact distribution function inverted by bisection."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    if int(df) != df or df < 1:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    df = int(df)
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    target = 2.0 * q - 1.0  # P(|T| ≤ t) at the quantile
    lo, hi = 0.0, 1.0
    while _t_abs_cdf(hi, df) < target:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if _t_abs_cdf(mid, df) < target else (lo, mid)
    return (lo + hi) / 2


def paired_interval(diffs: Sequence[float], level: float = LEVEL) -> dict[str, Any]:
    """Mean of paired differences with its two-sided Student-t confidence interval (n−1 degrees of freedom).

    Returns ``n``, ``mean``, ``sd`` (sample standard deviation), ``t`` (the quantile used), ``half_width``,
    ``low``, ``high`` and ``zero_inside`` (0 lies in the interval: not significant at this level). With one
    difference there is no interval: those are None.
    """
    xs = [float(d) for d in diffs]
    if not xs:
        raise ValueError("paired_interval of no differences")
    n = len(xs)
    mean = sum(xs) / n
    out: dict[str, Any] = {"n": n, "mean": mean, "level": level}
    if n == 1:
        return out | dict.fromkeys(("sd", "t", "half_width", "low", "high", "zero_inside"))
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    t = t_quantile(1.0 - (1.0 - level) / 2.0, n - 1)
    half = t * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    return out | {
        "sd": sd,
        "t": t,
        "half_width": half,
        "low": low,
        "high": high,
        "zero_inside": low <= 0 <= high,
    }


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


def _same(a: Any, b: Any) -> bool:
    numbers = (int, float)
    if (
        isinstance(a, numbers)
        and isinstance(b, numbers)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def check_run_folder(
    path: Path | str, method: str | None, changes: Mapping[str, Any] | None = None, seed: int | None = None
) -> list[str]:
    """Check a finished run folder against its row: ``summary.json``'s and ``config.yaml``'s method is
    ``method`` and, for a variant, ``config.yaml`` holds every overridden value of ``changes`` (dotted key →
    resolved value); ValueError naming the file and key otherwise. Returns warnings: a setting the
    ``config.yaml`` does not record, a seed other than the folder's (runs are paired by the folder's seed)."""
    path = Path(path)
    warnings: list[str] = []
    summary_path, config_path = path / "summary.json", path / "config.yaml"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if method is not None and summary.get("method") not in (None, method):
        raise ValueError(f"{summary_path}: method {summary['method']!r}, but the folder says {method!r}")
    if not config_path.exists():
        if changes:
            warnings.append(f"{path}: no config.yaml, so the variant's settings are not checked")
        return warnings
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_path}: not readable YAML ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: not a mapping")
    got_method = (config.get("algorithm") or {}).get("method")
    if method is not None and got_method not in (None, method):
        raise ValueError(f"{config_path}: algorithm.method {got_method!r}, but the folder says {method!r}")
    for key, want in (changes or {}).items():
        node: Any = config
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is _MISSING:
            warnings.append(f"{config_path}: does not record {key} (the variant sets {want!r})")
        elif not _same(node, want):
            raise ValueError(
                f"{config_path}: {key} is {node!r}, but the variant {path.parent.name!r} sets {want!r}; "
                "the folder holds another run (delete it to redo it)"
            )
    if seed is not None and config.get("seed") not in (None, seed):
        warnings.append(
            f"{config_path}: seed {config['seed']}, in folder seed{seed} (paired with the others' seed {seed})"
        )
    return warnings


def _run(path: Path, method: str | None) -> dict[str, Any]:
    """Everything the report needs from one finished run folder (its AUC is filled in by :func:`collect`)."""
    summary = json.loads((path / "summary.json").read_text())
    if method is not None and summary.get("method") not in (None, method):
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
    evidence = None
    if metrics:
        evidence = {
            "delta_pos": _avg([float(r.get("delta_pos_frac", 0.0)) for r in metrics]),
            "delta_neg": _avg([float(r.get("delta_neg_frac", 0.0)) for r in metrics]),
        }
    return {
        "path": str(path),
        "method": summary.get("method"),
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
        "evidence": evidence,
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


def _recorded_variants(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The variants ``OUT/compare.json`` records (``cepo compare`` writes them), or none."""
    try:
        record = json.loads((out_dir / "compare.json").read_text())
    except (OSError, ValueError):
        return {}
    variants = record.get("variants") if isinstance(record, dict) else None
    return (
        {k: dict(v) for k, v in variants.items() if isinstance(v, dict)} if isinstance(variants, dict) else {}
    )


def collect(
    out_dir: Path | str,
    methods: Sequence[str],
    seeds: int | Iterable[int],
    horizon: int | None = None,
    *,
    variants: Mapping[str, Mapping[str, Any]] | None = None,
    baseline: str | None = "grpo",
) -> dict[str, Any]:
    """Read ``OUT/<label>/seed<k>/`` for every label and seed; return every number of the report.

    ``methods`` are the rows' labels: method names and variant labels. ``variants`` maps a variant's label to
    ``{"method", "overrides", "changes"}`` (as ``cepo compare`` records them; default: ``OUT/compare.json``'s);
    a label that is neither a method nor a known variant takes its method from its runs. ``seeds`` is a count
    ``S`` (seeds 1..S) or the seed numbers. ``horizon`` (H of AUC@H) defaults to half the steps of the shortest
    finished run. The result is plain JSON (string keys, lists): ``base`` (step-0 accuracy, mean ± se over every
    run found), ``runs[label][seed]`` (one run's numbers), ``aggregate[label]`` (mean ± se over its seeds),
    ``variants`` (the variant rows' method and settings), ``paired`` (differences from ``baseline`` seed by
    seed with confidence intervals; None without the baseline among the rows), ``missing`` (runs absent or
    unfinished, with the reason) and ``warnings``.
    """
    from cepo.algorithm.methods import method_names

    out_dir = Path(out_dir)
    seed_list = _seed_list(seeds)
    known = {
        str(k): dict(v)
        for k, v in (variants if variants is not None else _recorded_variants(out_dir)).items()
    }
    registered = set(method_names())
    rows_variants = {m: known[m] for m in methods if m in known and m not in registered}
    runs: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in methods}
    missing: list[dict[str, Any]] = []
    warnings: list[str] = []
    base_found: list[dict[str, Any]] = []
    for method in methods:
        if method in rows_variants:
            expected, changes = rows_variants[method].get("method"), rows_variants[method].get("changes")
        else:
            expected, changes = (method if method in registered else None), None
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
            warnings += check_run_folder(path, expected, changes, seed)
            run = _run(path, expected)
            runs[method][str(seed)] = run
            if run["base"] is not None:
                base_found.append(run["base"])
            else:
                warnings.append(f"{path}: no step-0 evaluation (not in the base row, no AUC)")
        if expected is None and runs[method]:  # a folder of runs made outside a recorded comparison
            found = sorted({str(r["method"]) for r in runs[method].values() if r["method"]})
            rows_variants[method] = {"method": ", ".join(found) or None, "overrides": None, "changes": None}

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
        "variants": {m: rows_variants[m] for m in methods if m in rows_variants},
        "runs": runs,
        "aggregate": aggregate,
        "paired": _paired(runs, list(methods), baseline, seed_list),
        "missing": missing,
        "warnings": warnings,
    }


def _paired_value(run: dict[str, Any], key: str) -> float | None:
    if key == "average":
        return run["final"]["sampled"]["average"]
    if key == "auc":
        return run["auc"]
    return (run.get("evidence") or {}).get(key)


def _paired(
    runs: dict[str, dict[str, dict[str, Any]]], methods: list[str], baseline: str | None, seeds: list[int]
) -> dict[str, Any] | None:
    """Each row's difference from ``baseline`` on the seeds both finished (row − baseline, same seed), per
    metric of :data:`PAIRED_METRICS`, with :func:`paired_interval`; None when the baseline is not a row."""
    if baseline is None or baseline not in methods:
        return None
    base_runs = runs.get(baseline, {})
    rows: dict[str, dict[str, Any]] = {}
    for m in methods:
        if m == baseline:
            continue
        rows[m] = {}
        for key, _ in PAIRED_METRICS:
            pairs = []
            for seed in seeds:
                a, b = runs[m].get(str(seed)), base_runs.get(str(seed))
                if a is None or b is None:
                    continue
                va, vb = _paired_value(a, key), _paired_value(b, key)
                if va is not None and vb is not None:
                    pairs.append((seed, va - vb))
            rows[m][key] = (
                None
                if not pairs
                else {"seeds": [s for s, _ in pairs], "diffs": [d for _, d in pairs]}
                | paired_interval([d for _, d in pairs])
            )
    return {"baseline": baseline, "level": LEVEL, "metrics": [k for k, _ in PAIRED_METRICS], "rows": rows}


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


def _variants_markdown(results: dict[str, Any]) -> list[str]:
    variants = results.get("variants") or {}
    if not variants:
        return []
    lines = ["", "**Variants** (the row, its folder, the method and the settings it changes):", ""]
    for label, v in variants.items():
        method = v.get("method")
        what = display_name(method) if method and "," not in method else (method or "?")
        if v.get("overrides") is None:
            settings = "settings as in its runs' config.yaml"
        else:
            settings = "; ".join(f"`{o}`" for o in v["overrides"]) or "no overrides"
        lines.append(f"- {display_name(label)} (`{label}/`): {what} with {settings}")
    return lines


def _signed(x: float) -> str:
    return f"{100 * x:+.1f}"


def _paired_cell(stat: dict[str, Any] | None, n_row: int) -> str:
    if not stat:
        return _DASH
    text = _signed(stat["mean"])
    if stat.get("half_width") is None:
        text += " [n/a]"
    else:
        text += f" [{_signed(stat['low'])}, {_signed(stat['high'])}]"
        if stat["zero_inside"]:
            text += " not significant"
    return text + (f" (n={stat['n']})" if stat["n"] != n_row else "")


def _paired_markdown(results: dict[str, Any]) -> list[str]:
    paired = results.get("paired")
    if not paired:
        return []
    base = display_name(paired["baseline"])
    level = round(100 * paired["level"])
    h = results["horizon"]
    titles = dict(PAIRED_METRICS)
    lines = [
        "",
        f"**Paired differences from {base}.** Row − {base} on the same seed (same data order and initial "
        f"rollouts), in percentage points: mean over the seeds both finished, [{level} % confidence interval] "
        f"from Student's t with n−1 degrees of freedom; not significant: 0 lies inside the interval; n/a: one "
        f"seed gives no interval. No correction for multiple comparisons. Average: final held-out average "
        f"sampled accuracy; AUC@{'H' if h is None else h}: as in Table 2; Δ > 0 / Δ < 0 tokens: fraction of "
        f"scored tokens with teacher evidence Δ > 0 / < 0, mean over training steps (0 without a teacher).",
        "",
    ]
    rows = paired["rows"]
    if not any(st for row in rows.values() for st in row.values()):
        return [*lines, f"(no seed with both a finished {base} run and another finished run)"]
    keys = list(paired["metrics"])
    lines.append(
        _row(["Method", "Seeds", *(titles.get(k, k).format(h="H" if h is None else h) for k in keys)])
    )
    lines.append(_row(["---", "---:", *("---:" for _ in keys)]))
    for m, row in rows.items():
        n_row = max((st["n"] for st in row.values() if st), default=0)
        lines.append(_row([display_name(m), str(n_row), *(_paired_cell(row.get(k), n_row) for k in keys)]))
    return lines


def table_markdown(results: dict[str, Any]) -> str:
    """Table 2 of the paper in markdown, the variants' settings, the paired differences from the baseline, a
    sample-efficiency table and the list of missing runs.

    Rows: Base, then the methods in order; columns: each held-out suite, Average, Greedy avg and AUC@H. Cells are
    percent, mean ± standard error over seeds; the best mean of each column among the methods is bold. Paired
    differences: percentage points, mean [confidence interval], "not significant" when the interval holds 0,
    "[n/a]" with one seed.
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

    lines += _variants_markdown(results)
    lines += _paired_markdown(results)

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
    out_dir: Path | str,
    methods: Sequence[str],
    seeds: int | Iterable[int],
    horizon: int | None = None,
    *,
    variants: Mapping[str, Mapping[str, Any]] | None = None,
    baseline: str | None = "grpo",
) -> dict[str, Path]:
    """Collect the runs under ``out_dir`` (:func:`collect`) and write ``table.md``,
    ``figure1_heldout_accuracy.png``, ``figure4_delta_fractions.png`` and ``results.json`` there; return
    ``{"table", "figure1", "figure4", "results"}`` → path."""
    out_dir = Path(out_dir)
    results = collect(out_dir, methods, seeds, horizon, variants=variants, baseline=baseline)
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
