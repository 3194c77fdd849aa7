"""bench/evidence_strength.py: the decisive token of a wrong arithmetic rollout is where it departs from the
problem's correct chain, and the report separates |Δ| there from everywhere else."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from evidence_strength import decisive_token, run_stats

CHAIN = "2+8=10. 10-7=3. 3-1=2. \\boxed{2}"


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (["2", "+", "8", "=", "1", "0", ".", " 1", "0", "-", "7", "=", "4", "."], 12),  # 10-7=4: the 4
        ([" 2+8=", "11", ". 11-7=4."], 1),  # leading space ignored; "11" holds the first wrong character
        (["2+8=10.", " 10-7=3."], None),  # cut off while still right: no decisive token
        (["3", "+8=11."], 0),  # a wrong copy of the first operand
        ([*CHAIN, "!"], len(CHAIN)),  # right all the way, then went on
    ],
)
def test_decisive_token(tokens, expected):
    assert decisive_token(tokens, CHAIN) == expected


def test_run_stats_separates_decisive_tokens(tmp_path):
    meta = {"operands": [2, 8, 7], "ops": ["+", "-"]}  # 2+8=10. 10-7=3. \boxed{3}
    tokens = ["2+8=", "10", ". 10-7=", "4", ". \\boxed{4}"]
    row = {"group": 0, "scored": True, "correct": False, "tokens": tokens,
           "delta": [0.01, -0.02, 0.0, -0.9, 0.1], "w_cepo": [1.0] * 5}  # fmt: skip
    right = {
        **row,
        "correct": True,
        "tokens": ["2+8=10. 10-7=3. \\boxed{3}"],
        "delta": [0.5],
        "w_cepo": [1.0],
    }
    step = {
        "eps_w": 0.5,
        "method": "cepo",
        "problems": {"0": {"id": "p", "metadata": meta}},
        "rollouts": [row, right],
    }
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps" / "step_00000.json").write_text(json.dumps(step))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"abs_adv_before": 1.0, "abs_adv_after": 1.0}) + "\n")
    stats = run_stats(tmp_path)
    assert stats["scored_tokens"] == 6
    assert stats["decisive"] == {
        "n": 1, "mean_abs_delta": 0.9, "median_abs_delta": 0.9, "mean_delta": -0.9, "frac_negative": 1.0,
    }  # fmt: skip
    assert stats["wrong_rollouts_other_tokens"]["n"] == 4
    assert stats["wrong_rollouts_other_tokens"]["mean_abs_delta"] == pytest.approx(0.13 / 4)
