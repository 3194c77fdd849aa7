"""Streaming the stages within a step (``rollout.stream_groups``) through the real pipeline.

Real components: Ray actors, rollout and teacher replicas, a verifier, a gloo learner rank.

The equivalence test runs the same first step twice, barrier and streamed (chunks of 2 groups), with the
transformers engines: the same seeded generation gives the same rollouts, so every difference downstream comes
from the streaming. Rewards, A, r⁻ and the scored rows are then exactly equal (they are per group). The teacher's
log-probs of a row are computed in a batch of other rows (the chunk's, not the whole batch's), padded to another
width, so fp32 matmuls round differently: they agree to 1e-5, and so do Â_t; the update on them agrees to 1e-3 of
its own size (one Adam step divides by the gradient's magnitude, so a relative bound is the meaningful one).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors

from cepo.config import load_config
from cepo.controller import Trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _ray_down():
    """Each test's trainers start Ray in this process; the tests after these must not find it running."""
    yield
    import ray

    ray.shutdown()


def _config(model_dir, *extra):
    return load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"model.path={model_dir}",
            "rollout.replicas=1",
            "rollout.prompts_per_step=8",
            "learner.ranks=1",
            "data.size=200",
            "data.eval_suites=[]",
            "resources.num_cpus=4",
            "resources.probe_every=0",
            *extra,
        ],
    )


def _weights(payload) -> dict[str, torch.Tensor]:
    name = next(n for n in payload.files if n.endswith(".safetensors"))
    return load_safetensors(payload.files[name])


def _first_step(cfg, run: Path) -> dict:
    """One step; what it fed the update, and the adapters before and after."""
    trainer = Trainer(cfg, run, log=lambda _: None)
    seen: dict = {}
    update = trainer._update

    def spy(s):
        seen.update(
            rollouts=[(r.prompt_index, r.response_ids) for r in s.rollouts],
            rewards=list(s.rewards),
            seq_adv=s.seq_adv.clone(),
            negatives=list(s.row_negatives),
            logp_pos=s.logp_pos.clone(),
            logp_neg=s.logp_neg.clone(),
            token_adv=s.token_adv.clone(),
            old_logp=s.old_logp.clone(),
        )
        result = update(s)
        seen["after"] = _weights(result.adapter)
        seen["stats"] = result.stats
        return result

    trainer._update = spy
    try:
        trainer.start()
        seen["before"] = _weights(trainer.payload)
        seen["report"] = trainer.train(1)[0]
    finally:
        trainer.close()
    return seen


@pytest.mark.slow
def test_streamed_step_equals_the_barrier_step(tiny_model_dir, tmp_path):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    engines = ["rollout.backend=transformers", "teacher.backend=transformers"]
    barrier = _first_step(_config(tiny_model_dir, *engines), tmp_path / "barrier")
    streamed = _first_step(
        _config(tiny_model_dir, *engines, "rollout.stream_groups=2"), tmp_path / "streamed"
    )

    assert barrier["report"].stream_chunks == 0
    assert streamed["report"].stream_chunks == 4  # 8 groups in chunks of 2
    for name, tensor in barrier["before"].items():  # the same start
        assert torch.equal(tensor, streamed["before"][name]), name
    assert streamed["rollouts"] == barrier["rollouts"]  # the same rollouts, in the same rows
    assert streamed["rewards"] == barrier["rewards"]
    assert torch.equal(streamed["seq_adv"], barrier["seq_adv"])
    assert streamed["negatives"] == barrier["negatives"]
    scored = barrier["seq_adv"] != 0
    assert scored.any() and (barrier["logp_pos"][scored] != 0).any(), (
        "nothing was scored: the test shows nothing"
    )
    for key in ("logp_pos", "logp_neg", "token_adv"):
        assert torch.allclose(streamed[key], barrier[key], atol=1e-5, rtol=0), key
    assert not torch.equal(barrier["token_adv"], barrier["seq_adv"].unsqueeze(1) * (barrier["logp_pos"] != 0))
    assert torch.equal(streamed["old_logp"], barrier["old_logp"])
    moved = 0.0
    for name, after in barrier["after"].items():
        step = after - barrier["before"][name]
        moved += float(step.norm())
        gap = float((streamed["after"][name] - after).norm())
        assert gap <= 1e-3 * float(step.norm()) + 1e-9, (name, gap, float(step.norm()))
    assert moved > 0, "the update changed nothing"
    assert abs(streamed["stats"].loss - barrier["stats"].loss) <= 1e-5 * max(1.0, abs(barrier["stats"].loss))


@pytest.mark.slow
def test_vllm_streams_groups_as_they_finish(tiny_model_dir, tmp_path):
    """vLLM yields each group when its last sample ends: chunks of one group flow on while the rest generate;
    every prompt is trained on once, with its G rollouts, and the step's clock still adds up."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cfg = _config(tiny_model_dir, "rollout.backend=vllm-merged", "rollout.stream_groups=1")
    trainer = Trainer(cfg, tmp_path / "run", log=lambda _: None)
    groups: list[list[int]] = []
    update = trainer._update

    def spy(s):
        groups.append([r.prompt_index for r in s.rollouts])
        return update(s)

    trainer._update = spy
    arrivals: list[int] = []  # per step: how many times groups came back from the replica
    try:
        trainer.start()
        stream = trainer.pools.generate_stream

        def counted(*args, **kwargs):
            arrivals.append(0)
            for groups in stream(*args, **kwargs):
                arrivals[-1] += 1
                yield groups

        trainer.pools.generate_stream = counted
        reports = trainer.train(2)
    finally:
        trainer.close()
    assert len(arrivals) == 2 and max(arrivals) > 1, arrivals  # groups came back as they finished
    size = cfg.rollout.group_size
    for rows in groups:
        assert rows == [g for g in range(8) for _ in range(size)]
    for r in reports:
        assert r.stream_chunks == 8  # one chunk per group
        stages = r.stage_seconds
        assert r.overlap_seconds > 0, r
        assert sum(stages.values()) - r.overlap_seconds <= r.step_seconds + 0.05, r
        assert r.adapter_version == r.policy_version + 1
