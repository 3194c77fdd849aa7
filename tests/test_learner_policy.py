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


# ------------------------------------------------------------------ OPSD / SDPO (distillation baselines)
# Teacher samples: the same responses after a longer "r⁺" context.
TEACHER_SAMPLES = [([1, 3, 3, *p[1:]], r) for p, r in SAMPLES]


def _lora(policy):
    return {k: v.clone() for k, v in policy.lora_state().items()}


def _changed(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_opsd_adds_a_distillation_term_and_pure_distillation_moves_the_policy(model_dir):
    from services.learner.policy import DistillSpec

    batch, teacher = PolicyBatch.build(SAMPLES), PolicyBatch.build(TEACHER_SAMPLES)
    zero = torch.zeros_like(batch.response_mask)
    policy = make_policy(model_dir)
    before = _lora(policy)
    stats = policy.update(
        batch,
        zero,
        policy.old_logprobs(batch),
        teacher_batch=teacher,
        distill=DistillSpec("opsd", with_pg=False),
        micro_batch_size=3,
    )
    # A = 0 everywhere: only the KL term can move the policy
    assert stats.distill_loss > 0 and stats.loss == pytest.approx(stats.distill_loss)
    assert _changed(before, _lora(policy))
    with pytest.raises(ValueError, match="opsd needs a teacher batch of 4 rows"):
        policy.update(batch, zero, zero, distill=DistillSpec("opsd"))
    with pytest.raises(ValueError, match="kind must be 'opsd' or 'sdpo'"):
        DistillSpec("kl")


def test_sdpo_ema_teacher_follows_the_actor_slowly(model_dir):
    from services.learner.policy import DistillSpec

    batch, teacher = PolicyBatch.build(SAMPLES), PolicyBatch.build(TEACHER_SAMPLES)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5]).unsqueeze(1) * batch.response_mask
    policy = make_policy(model_dir)
    theta0 = [p.detach().clone() for p in policy.params]
    spec = DistillSpec("sdpo", top_k=5, ema_decay=0.9)
    stats = policy.update(batch, adv, policy.old_logprobs(batch), teacher_batch=teacher, distill=spec)
    assert stats.distill_loss > 0
    for e, p0, p1 in zip(policy.ema.values(), theta0, policy.params, strict=True):
        assert torch.allclose(e, 0.9 * p0 + 0.1 * p1.detach(), atol=1e-7)
    # the EMA swap leaves the actor's own weights in place
    assert all(not torch.equal(p0, p1) for p0, p1 in zip(theta0, policy.params, strict=True) if p0.any())


def test_leakage_structure_end_to_end(model_dir):
    """Move teacher mass between two never-sampled tokens: OPSD's update changes, CEPO's does not (Eq. 3)."""
    from services.learner.advantages import cepo_token_advantages
    from services.learner.policy import DistillSpec

    batch, teacher = PolicyBatch.build(SAMPLES), PolicyBatch.build(TEACHER_SAMPLES)
    seen = {t for p, r in [*SAMPLES, *TEACHER_SAMPLES] for t in (*p, *r)}
    u, v = [t for t in range(40) if t not in seen][:2]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])

    def swapped(fn):
        def teacher_logits(b, *, ema=False):
            logits = fn(b, ema=ema)
            logits[..., [u, v]] = logits[..., [v, u]]  # P_T(u) ↔ P_T(v); every sampled token's P_T unchanged
            return logits

        return teacher_logits

    def run(method, perturb):
        policy = make_policy(model_dir)
        if perturb:
            policy.teacher_logits = swapped(policy.teacher_logits)
        old = policy.old_logprobs(batch)
        if method == "opsd":
            token_adv = adv.unsqueeze(1) * batch.response_mask
            policy.update(batch, token_adv, old, teacher_batch=teacher, distill=DistillSpec("opsd"))
        else:  # CEPO consumes the teacher only at the sampled tokens
            targets = batch.input_ids.gather(1, batch.response_index)
            pos = torch.log_softmax(policy.teacher_logits(teacher), -1).gather(-1, targets.unsqueeze(-1))[
                ..., 0
            ]
            token_adv = cepo_token_advantages(adv, pos, old, batch.response_mask, 0.5, 0.5)
            policy.update(batch, token_adv, old)
        return _lora(policy)

    assert _changed(run("opsd", False), run("opsd", True))
    plain, perturbed = run("cepo", False), run("cepo", True)
    assert all(torch.equal(plain[k], perturbed[k]) for k in plain)
