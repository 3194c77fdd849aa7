"""How much credit the teacher's evidence can move: |Δ| and the weights, from run folders' step dumps.

    python bench/evidence_strength.py runs/tiny-compare/cepo/seed1 runs/tiny-compare/rlsd/seed1 ...

For each run (and all of them together) prints, over every scored token of every ``steps/step_NNNNN.json``:
mean / median / 90th-percentile / max |Δ| in nats, the fraction of tokens with |Δ| > 0.05, the fraction whose
weight exp(sign(A)·Δ) reached the clip bound 1 ± ε_w, and from ``metrics.jsonl`` the mean relative change of
|A| made by reweighting, |mean|Â_t| − mean|A|| / mean|A|. A weight of exp(0.01) moves a token's advantage by
λ·1 %: that is GRPO for any practical purpose.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def run_stats(run: Path) -> dict:
    deltas, clipped = [], []
    for path in sorted((run / "steps").glob("step_*.json")):
        data = json.loads(path.read_text())
        eps = data["eps_w"]
        for row in data["rollouts"]:
            if not row["scored"] or row["delta"] is None:
                continue
            delta = np.abs(np.asarray(row["delta"], dtype=np.float64))
            deltas.append(delta)
            w = np.asarray(row["w_cepo"] if data["method"] == "cepo" else row["w_rlsd"], dtype=np.float64)
            clipped.append(np.isclose(np.abs(w - 1.0), eps, atol=1e-6))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
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
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args()
    print(json.dumps([run_stats(run) for run in args.runs], indent=2))


if __name__ == "__main__":
    main()
