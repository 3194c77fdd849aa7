"""The one-step-off asynchronous mode (``algorithm.max_staleness: 1``) through the real pipeline.

Real components: Ray actors, a rollout and a teacher replica (transformers engines, so the test starts fast; the
mode lives in the controller and is the same for every engine), a verifier, a gloo learner rank.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cepo.algorithm.staleness import importance_stats, truncated_is_weights
from cepo.config import load_config
from cepo.controller import Trainer
from cepo.data import DataCursor, from_config

REPO = Path(__file__).resolve().parents[1]


def test_weights_are_one_on_policy_and_truncated_when_stale():
    learner = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -0.1, 0.0]])
    behaviour = torch.tensor([[-1.5, -1.0, -3.0], [-3.0, -0.1, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # K = 0: no row is stale, every weight is exactly 1 whatever the two log-probs say
    none = truncated_is_weights(learner, behaviour, mask, torch.tensor([False, False]), cap=2.0)
    assert torch.equal(none, torch.ones_like(none))
    w = truncated_is_weights(learner, behaviour, mask, torch.tensor([True, False]), cap=2.0)
    assert torch.allclose(
        w[0], torch.tensor([torch.exp(torch.tensor(0.5)).item(), torch.exp(torch.tensor(-1.0)).item(), 2.0])
    )
    assert torch.equal(w[1], torch.ones(3))  # the on-policy row
    stats = importance_stats(w, mask, torch.tensor([True, False]), 2.0)
    assert stats.stale_rows == 1 and stats.max == 2.0 and abs(stats.clip_frac - 1 / 3) < 1e-6
    # padding of a stale row stays 1 and carries no weight in the statistics
    w = truncated_is_weights(learner, behaviour, mask, torch.tensor([False, True]), cap=2.0)
    assert w[1, 2] == 1.0 and w[1, 0] == 2.0
    with pytest.raises(ValueError, match="cap must be"):
        truncated_is_weights(learner, behaviour, mask, torch.tensor([True, True]), cap=0.5)


@pytest.mark.slow
def test_one_step_off_versions_teacher_and_cursor(tiny_model_dir, tmp_path):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"model.path={tiny_model_dir}",
            "algorithm.max_staleness=1",
            "rollout.backend=transformers",
            "teacher.backend=transformers",
            "rollout.replicas=1",
            "rollout.prompts_per_step=8",
            "learner.ranks=1",
            "data.size=200",
            "data.eval_suites=[]",
            "logging.checkpoint_every=1",
            "resources.num_cpus=4",
        ],
    )
    trainer = Trainer(cfg, tmp_path / "run", log=lambda _: None)
    drawn: list[tuple[int, list[str]]] = []
    draw = trainer._draw

    def spy(index):  # observe which prompts each step drew, and when
        s = draw(index)
        drawn.append((index, [p.id for p in s.problems]))
        return s

    trainer._draw = spy
    try:
        trainer.start()
        reports = trainer.train(4)
        import ray

        serving = {n: ray.get(a.serving.remote(), timeout=60) for n, a in trainer.pools.rollout.items()}
        teacher = {n: ray.get(a.serving.remote(), timeout=60) for n, a in trainer.pools.teacher.items()}
        final = (trainer.version, trainer.checksum)
    finally:
        trainer.close()
        import ray

        ray.shutdown()

    # step 0 is on-policy; every later step trains on rollouts exactly one version behind the learner
    assert [r.policy_version for r in reports] == [0, 0, 1, 2]
    assert [r.adapter_version for r in reports] == [1, 2, 3, 4]
    assert [r.staleness for r in reports] == [0, 1, 1, 1]
    # the teacher scored every batch under the rollouts' own version (teacher = actor), never the learner's
    assert [r.teacher_version for r in reports] == [r.policy_version for r in reports]
    # importance weights: exactly 1 on-policy; on stale steps, weights of a changed policy (not all 1), ≤ cap
    assert reports[0].is_weight_mean == 1.0 and reports[0].stale_rows == 0
    for r in reports[1:]:
        assert r.stale_rows == 8 * cfg.rollout.group_size and r.is_weight_max <= cfg.algorithm.is_cap + 1e-6
    assert any(r.is_weight_min < 1.0 or r.is_weight_max > 1.0 for r in reports[1:])
    # generation ahead was hidden behind the previous step: every stale step reports it as overlap
    assert all(r.overlap_seconds >= r.stage_seconds["gen"] > 0 for r in reports[1:])
    # after the run every replica serves the learner's last adapter (the last step generated nothing ahead)
    assert set(serving.values()) == {final}
    assert teacher and {v for v, _ in teacher.values()} == {reports[-1].teacher_version}  # the last batch's
    assert [index for index, _ in drawn] == [0, 1, 2, 3]  # nothing drawn past the last step
    ids = [i for _, batch in drawn for i in batch]
    assert len(ids) == len(set(ids)) == 32  # no prompt lost or drawn twice

    # a checkpoint taken while the next batch was generating resumes by drawing that batch again
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00002" / "state.json").read_text())
    cursor = DataCursor(from_config(cfg.data).problems, cfg.data.seed)
    cursor.load_state_dict(state["cursor"])
    assert [p.id for p in cursor.next_batch(8)] == drawn[2][1]
