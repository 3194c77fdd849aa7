"""The LoRA policy: learner log-probs equal the engines', micro-batching is exact, updates move the policy."""

from __future__ import annotations

import pytest
import torch
from _tiny import save_tiny_model

from services.learner.policy import LoraPolicy, PolicyBatch
from services.rollout.engines import TransformersEngine

SAMPLES = [
    ([1, 5, 9, 11], [7, 8, 2]),
    ([1, 6], [9, 10, 11, 12, 2]),
    ([1, 5, 9, 11, 13, 14], [2]),
    ([1, 7, 7], [3, 4]),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("policy") / "model")


def make_policy(model_dir, **kwargs):
    options = {"rank": 8, "alpha": 16, "lr": 1e-2, "warmup_steps": 0, "lr_schedule": "constant", "seed": 3}
    options.update(kwargs)
    return LoraPolicy(str(model_dir), **options)


def test_batch_layout():
    batch = PolicyBatch.build(SAMPLES, pad_id=0)
    assert batch.response_mask.sum(1).tolist() == [3, 5, 1, 2]
    assert batch.input_ids[1, :7].tolist() == [1, 6, 9, 10, 11, 12, 2]
    assert batch.response_index[0, :3].tolist() == [4, 5, 6]
    with pytest.raises(ValueError, match="sample 1: prompt and response"):
        PolicyBatch.build([([1], [2]), ([1], [])])


def test_learner_logprobs_equal_engine_scores_after_export(model_dir):
    policy = make_policy(model_dir, temperature=0.8)
    batch = PolicyBatch.build(SAMPLES)
    old = policy.old_logprobs(batch, micro_batch_size=3)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5]).unsqueeze(1) * batch.response_mask
    policy.update(batch, adv, old, micro_batch_size=2)
    new = policy.old_logprobs(batch)
    assert not torch.allclose(new, old)  # the update moved the policy

    engine = TransformersEngine(str(model_dir))
    try:
        version, checksum = engine.load_adapter(policy.export_adapter(version=0))
        assert version == 0 and len(checksum) == 64
        scores = engine.score([([*p, *r], len(p)) for p, r in SAMPLES], temperature=0.8)
    finally:
        engine.close()
    for row, s in enumerate(scores):
        assert torch.allclose(new[row, : len(s)], torch.tensor(s), atol=1e-5)


def test_micro_batching_is_exact(model_dir):
    batch = PolicyBatch.build(SAMPLES)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5]).unsqueeze(1) * batch.response_mask
    grads, norms = [], []
    for micro in (1, 4):
        policy = make_policy(model_dir)
        old = policy.old_logprobs(batch)
        norms.append(policy.update(batch, adv, old, micro_batch_size=micro).grad_norm)
        grads.append([p.grad.clone() for p in policy.params])  # accumulated over the micro-batches
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)
    for g1, g4 in zip(*grads, strict=True):
        assert torch.allclose(g1, g4, atol=1e-7, rtol=1e-4)


def test_positive_advantage_raises_probability(model_dir):
    policy = make_policy(model_dir)
    batch = PolicyBatch.build(SAMPLES[:1])
    old = policy.old_logprobs(batch)
    first = policy.update(batch, batch.response_mask.clone(), old)
    assert first.grad_norm > 0 and first.clip_frac == 0.0 and first.lr == 1e-2
    for _ in range(4):
        last = policy.update(batch, batch.response_mask.clone(), old)
    assert policy.old_logprobs(batch).sum() > old.sum()
    # once every ratio exceeds 1 + ε_high the clipped surrogate has no gradient left: PPO stops pushing
    assert last.clip_frac == 1.0 and last.grad_norm == 0.0


def test_lm_head_target_refused(model_dir):
    with pytest.raises(ValueError, match="lm_head"):
        make_policy(model_dir, target_modules=("q_proj", "lm_head"))
