"""How much credit the teacher's evidence can move: |Δ| and the weights, from run folders' step dumps.

    python bench/evidence_strength.py runs/tiny-compare/cepo/seed1 runs/tiny-compare/rlsd/seed1 ...

For each run prints, over every scored token of every ``steps/step_NNNNN.json``: mean / median /
90th-percentile / max |Δ| in nats, the fraction of tokens with |Δ| > 0.05, the fraction whose weight
exp(sign(A)·Δ) reached the clip bound 1 ± ε_w, and from ``metrics.jsonl`` the mean relative change of |A| made by
reweighting, |mean|Â_t| − mean|A|| / mean|A|. A weight of exp(0.01) moves a token's advantage by λ·1 %: that is
GRPO for any practical purpose.

**At the decisive token.** Most tokens of a chain carry no credit either way; what CEPO is for is the token where
a wrong rollout goes wrong. For problems of the built-in arithmetic task (the dump records each problem's
operands), the decisive token of a wrong rollout is the token holding the first character where its text departs
from the problem's correct chain (``cepo.tasks.arithmetic.solution``: the first wrong step, or a wrong copy of an
operand). Reported separately: |Δ| there (mean, median), the signed mean Δ and the fraction with Δ < 0 (the
right-answer teacher finding the mistake less likely than the wrong-answer teacher, as it should), against the
same figures over all other scored tokens of wrong rollouts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cepo.tasks.arithmetic import solution
from cepo_proto import Problem


def decisive_token(tokens: list[str], correct_chain: str) -> int | None:
    """Index of the token holding the first character where ``"".join(tokens)`` departs from the correct
    chain (leading whitespace ignored); None if the text never departs (e.g. cut off while still right)."""
    text = "".join(tokens)
    start = len(text) - len(text.lstrip())
    body = text[start:]
    first = next((k for k, (a, b) in enumerate(zip(body, correct_chain, strict=False)) if a != b), None)
    if first is None:
        if len(body) <= len(correct_chain):
            return None
        first = len(correct_chain)  # right all the way, then went on
    position, offset = start + first, 0
    for index, token in enumerate(tokens):
        offset += len(token)
        if offset > position:
            return index
    return None


def _chain_of(meta: dict | None) -> str | None:
    if not meta or "operands" not in meta or "ops" not in meta:
        return None
    problem = Problem(id="p", problem="p", answer="0", metadata=meta)
    return solution(problem)


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    a = np.asarray(values, dtype=np.float64)
    return {
        "n": int(a.size),
        "mean_abs_delta": float(np.abs(a).mean()),
        "median_abs_delta": float(np.median(np.abs(a))),
        "mean_delta": float(a.mean()),
        "frac_negative": float((a < 0).mean()),
    }


def run_stats(run: Path) -> dict:
    deltas, clipped = [], []
    decisive, elsewhere = [], []
    for path in sorted((run / "steps").glob("step_*.json")):
        data = json.loads(path.read_text())
        eps = data["eps_w"]
        problems = data.get("problems", {})
        for row in data["rollouts"]:
            if not row["scored"] or row["delta"] is None:
                continue
            signed = np.asarray(row["delta"], dtype=np.float64)
            deltas.append(np.abs(signed))
            w = np.asarray(row["w_cepo"] if data["method"] == "cepo" else row["w_rlsd"], dtype=np.float64)
            clipped.append(np.isclose(np.abs(w - 1.0), eps, atol=1e-6))
            chain = _chain_of(problems.get(str(row["group"]), {}).get("metadata"))
            if row["correct"] or chain is None:
                continue
            k = decisive_token(row["tokens"], chain)
            if k is None or k >= signed.size:
                continue
            decisive.append(float(signed[k]))
            elsewhere.extend(float(v) for j, v in enumerate(signed) if j != k)
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    metrics = [json.loads(line) for line in lines if line.strip()]
    moved = [
        abs(m["abs_adv_after"] - m["abs_adv_before"]) / m["abs_adv_before"]
        for m in metrics
        if m.get("abs_adv_before")
    ]
    if not deltas:
        return {"run": str(run), "scored_tokens": 0}
    d = np.concatenate(deltas)
    return {
        "run": str(run),
        "scored_tokens": int(d.size),
        "mean_abs_delta": float(d.mean()),
        "median_abs_delta": float(np.median(d)),
        "p90_abs_delta": float(np.quantile(d, 0.9)),
        "max_abs_delta": float(d.max()),
        "frac_abs_delta_gt_0.05": float((d > 0.05).mean()),
        "weight_clip_frac": float(np.concatenate(clipped).mean()),
        "mean_rel_change_abs_adv": float(np.mean(moved)) if moved else 0.0,
        "decisive": _summary(decisive),
        "wrong_rollouts_other_tokens": _summary(elsewhere),
    }


KEYS = ("mean_abs_delta", "median_abs_delta", "frac_abs_delta_gt_0.05", "weight_clip_frac")


def by_method(stats: list[dict]) -> dict[str, dict]:
    """Per method folder (a run's parent, as ``cepo compare`` lays runs out): each figure's mean over its runs
    and its range, for all scored tokens and at the decisive token."""
    groups: dict[str, list[dict]] = {}
    for s in stats:
        groups.setdefault(Path(s["run"]).parent.name, []).append(s)
    out = {}
    for name, runs in groups.items():
        runs = [r for r in runs if r.get("scored_tokens")]
        if not runs:
            continue
        row: dict = {"runs": len(runs)}
        for key in KEYS:
            values = [r[key] for r in runs]
            row[key] = {"mean": float(np.mean(values)), "min": min(values), "max": max(values)}
        for part in ("decisive", "wrong_rollouts_other_tokens"):
            for key in ("mean_abs_delta", "median_abs_delta", "mean_delta", "frac_negative"):
                values = [r[part][key] for r in runs if r[part].get("n")]
                if values:
                    row[f"{part}.{key}"] = {
                        "mean": float(np.mean(values)),
                        "min": min(values),
                        "max": max(values),
                    }
            row[f"{part}.n"] = sum(r[part].get("n", 0) for r in runs)
        out[name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument(
        "--by-method", action="store_true", help="Summarise runs per method folder (runs' parents)."
    )
    args = ap.parse_args()
    stats = [run_stats(run) for run in args.runs]
    print(json.dumps(by_method(stats) if args.by_method else stats, indent=2))


if __name__ == "__main__":
    main()
