"""The LoRA policy: learner log-probs equal the engines', micro-batching is exact, updates move the policy."""

from __future__ import annotations

import math

import pytest
import torch
from _float import half_precision_bound, logsoftmax_bound
from _tiny import save_tiny_model

from cepo_proto.learner import UpdateSettings
from cepo_services.common.engines import TransformersEngine
from cepo_services.learner.policy import LoraPolicy, PolicyBatch

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
    policy.update(batch, adv, old, UpdateSettings(micro_batch_size=2))
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
        norms.append(policy.update(batch, adv, old, UpdateSettings(micro_batch_size=micro)).grad_norm)
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
    from cepo_proto.learner import DistillSpec

    batch, teacher = PolicyBatch.build(SAMPLES), PolicyBatch.build(TEACHER_SAMPLES)
    zero = torch.zeros_like(batch.response_mask)
    policy = make_policy(model_dir)
    before = _lora(policy)
    stats = policy.update(
        batch,
        zero,
        policy.old_logprobs(batch),
        UpdateSettings(micro_batch_size=3),
        teacher_batch=teacher,
        distill=DistillSpec("opsd", with_pg=False),
    )
    # A = 0 everywhere: only the KL term can move the policy
    assert stats.distill_loss > 0 and stats.loss == pytest.approx(stats.distill_loss)
    assert _changed(before, _lora(policy))
    with pytest.raises(ValueError, match="opsd needs a teacher batch of 4 rows"):
        policy.update(batch, zero, zero, distill=DistillSpec("opsd"))
    with pytest.raises(ValueError, match="kind must be 'opsd' or 'sdpo'"):
        DistillSpec("kl")


def test_sdpo_ema_teacher_follows_the_actor_slowly(model_dir):
    from cepo_proto.learner import DistillSpec

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
    """Redistribute the teacher's mass among never-sampled tokens: OPSD's update changes, CEPO's does not (Eq. 3).

    Every sampled token's P_T is unchanged in exact arithmetic, but log-softmax then sums the vocabulary in
    another order, so in float32 the sampled log-probs — and everything downstream — may move in the last bits
    (how many depends on the CPU's vector reductions). The test therefore bounds CEPO's change by rounding
    (tests/_float.py) and requires OPSD's change to be orders of magnitude above that bound. A CEPO path that
    read the teacher anywhere but at the sampled tokens (a top-k, an entropy, any never-sampled logit) sees the
    redistributed mass and fails the gradient bound.
    """
    from cepo.algorithm.advantages import cepo_token_advantages
    from cepo_proto.learner import DistillSpec

    batch, teacher = PolicyBatch.build(SAMPLES), PolicyBatch.build(TEACHER_SAMPLES)
    seen = {t for p, r in [*SAMPLES, *TEACHER_SAMPLES] for t in (*p, *r)}
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    dtype = torch.float32

    def redistributed(fn):
        def teacher_logits(b, *, ema=False):
            logits = fn(b, ema=ema)
            unseen = torch.tensor([t for t in range(logits.shape[-1]) if t not in seen])
            # same total mass on the never-sampled tokens, spread over them in a different, random way
            mass = torch.logsumexp(logits[..., unseen], -1, keepdim=True)
            noise = torch.randn((*logits.shape[:-1], len(unseen)), generator=torch.Generator().manual_seed(5))
            logits[..., unseen] = mass + torch.log_softmax(3 * noise, -1)
            return logits

        return teacher_logits

    def run(method, perturb):
        policy = make_policy(model_dir)
        if perturb:
            policy.teacher_logits = redistributed(policy.teacher_logits)
        old = policy.old_logprobs(batch)
        pos = None
        if method == "opsd":
            token_adv = adv.unsqueeze(1) * batch.response_mask
            policy.update(batch, token_adv, old, teacher_batch=teacher, distill=DistillSpec("opsd"))
        else:  # CEPO consumes the teacher only at the sampled tokens
            targets = batch.input_ids.gather(1, batch.response_index)
            logits = policy.teacher_logits(teacher)
            pos = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1))[..., 0]
            logit_scale.append((float(logits.abs().max()), logits.shape[-1]))
            token_adv = cepo_token_advantages(adv, pos, old, batch.response_mask, 0.5, 0.5)
            policy.update(batch, token_adv, old)
        weights = torch.cat([p.detach().flatten() for p in policy.params])
        grads = torch.cat([p.grad.flatten() for p in policy.params])  # the step's gradient, kept after it
        return weights, grads, pos, policy.optimizer.defaults["eps"]

    logit_scale: list[tuple[float, int]] = []  # (largest |teacher logit|, vocabulary size) per CEPO run
    lr = 1e-2  # make_policy's
    rounding = half_precision_bound(
        dtype
    )  # sqrt(eps): below this, relative to a quantity's scale, is rounding

    opsd_plain, opsd_grad_plain, _, _ = run("opsd", False)
    opsd_moved, opsd_grad_moved, _, _ = run("opsd", True)
    plain, grad_plain, pos_plain, adam_eps = run("cepo", False)
    moved, grad_moved, pos_moved, _ = run("cepo", True)
    scale = float(grad_plain.abs().max())
    assert scale > 0

    # the teacher's log-probs at the sampled tokens: unchanged up to the reordered vocabulary sum
    largest_logit, vocab = max(logit_scale)
    assert float((pos_plain - pos_moved).abs().max()) <= logsoftmax_bound(dtype, vocab, largest_logit)
    # CEPO's gradient: rounding-level; OPSD's: far above that bound
    grad_bound = rounding * scale
    assert float((grad_plain - grad_moved).abs().max()) <= grad_bound
    assert float((opsd_grad_plain - opsd_grad_moved).abs().max()) > 1000 * grad_bound
    # the weights after Adam's step. Adam moves a coordinate by lr·g/(|g| + ε): where |g| is near ε that ratio
    # turns a rounding-level change of g into a large one, so CEPO's weights are compared where |g| ≥ 1000·ε
    # (there the ratio's sensitivity is ≤ 1e-3/|g|); OPSD's change anywhere must be far above the bound.
    weight_bound = lr * rounding
    steady = grad_plain.abs() >= 1000 * adam_eps
    assert steady.sum() > 0.25 * len(grad_plain)  # LoRA A's gradients are exactly 0 at step one (B = 0)
    assert float((plain - moved)[steady].abs().max()) <= weight_bound
    assert float((opsd_plain - opsd_moved).abs().max()) > 100 * weight_bound


def test_non_finite_update_is_skipped_and_changes_nothing(model_dir):
    """A poisoned batch (NaN advantage → NaN loss and gradient norm): no optimizer step, the weights, the
    optimizer state and the version stay as they were; the next finite batch trains normally."""
    policy = make_policy(model_dir)
    batch = PolicyBatch.build(SAMPLES)
    old = policy.old_logprobs(batch)
    before = _lora(policy)
    poisoned = torch.ones_like(batch.response_mask)
    poisoned[2, 0] = float("nan")
    stats = policy.update(batch, poisoned, old)
    assert stats.skipped and not math.isfinite(stats.grad_norm)
    assert policy.version == 0 and not _changed(before, _lora(policy))
    assert policy.optimizer.state_dict()["state"] == {}  # Adam never stepped
    good = policy.update(batch, torch.ones_like(batch.response_mask), old)
    assert not good.skipped and policy.version == 1 and _changed(before, _lora(policy))


def test_training_state_round_trip_is_exact(model_dir, tmp_path):
    """Save after one update, restore into a policy built with another seed: the next update is bit-identical
    (weights, Adam moments and step, the LR schedule's step, RNG)."""
    batch = PolicyBatch.build(SAMPLES)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5]).unsqueeze(1) * batch.response_mask
    first = make_policy(model_dir)
    first.update(batch, adv, first.old_logprobs(batch))
    torch.save(first.training_state(), tmp_path / "learner.pt")  # through the disk, as a checkpoint does
    second = make_policy(model_dir, seed=11)
    assert _changed(_lora(first), _lora(second))
    second.load_training_state(torch.load(tmp_path / "learner.pt", weights_only=False))
    assert second.version == first.version == 1
    for policy in (first, second):
        policy.update(batch, -adv, policy.old_logprobs(batch))
    assert not _changed(_lora(first), _lora(second))
    assert first.export_adapter().checksum == second.export_adapter().checksum


def test_mini_batches_and_epochs_make_the_clip_act(model_dir):
    """learner.ppo_epochs × mini_batches optimizer steps per rollout batch, against the rollout's old log-probs:
    the first step is on-policy (ratio 1, nothing clipped), later ones are not, so the clip acts."""
    batch = PolicyBatch.build(SAMPLES)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5]).unsqueeze(1) * batch.response_mask
    one = make_policy(model_dir, lr=0.05)
    old = one.old_logprobs(batch)
    single = one.update(batch, adv, old, UpdateSettings(micro_batch_size=2))
    assert single.optimizer_steps == 1 and single.clip_frac == 0.0 and single.approx_kl == 0.0
    many = make_policy(model_dir, lr=0.05)
    settings = UpdateSettings(micro_batch_size=2, mini_batches=2, ppo_epochs=3)
    stats = many.update(batch, adv, old, settings)
    assert stats.optimizer_steps == 6 and many.version == 1  # one version per update, however many steps
    assert stats.clip_frac > 0.05 and stats.approx_kl != 0.0
    assert int(many.optimizer.state_dict()["state"][0]["step"]) == 6
    assert _changed(_lora(one), _lora(many))


def test_mini_batch_plan_is_the_same_for_any_rank_count():
    """The global mini-batches (rows, token and sequence counts) do not depend on how many ranks share them."""
    from cepo_services.learner.policy import plan_update

    lengths = [3, 5, 1, 2, 7, 4, 4]
    for mini_batches in (1, 2, 3, 9):
        reference = plan_update(lengths, 1, mini_batches, 2)[0]
        steps = [(m.tokens, m.seqs) for m in reference[1]]
        assert len(steps) == min(mini_batches, len(lengths))  # never an empty optimizer step
        assert sum(t for t, _ in steps) == sum(lengths) and reference[0] == list(range(len(lengths)))
        for ranks in (2, 3, 8):
            plans = plan_update(lengths, ranks, mini_batches, 2)
            assert sorted(i for rows, _ in plans for i in rows) == list(range(len(lengths)))
            for k, (tokens, seqs) in enumerate(steps):
                minis = [plan[k] for _, plan in plans]
                assert {(m.tokens, m.seqs) for m in minis} == {(tokens, seqs)}
                held = [rows[m.start : m.stop] for (rows, _), m in zip(plans, minis, strict=True)]
                assert sum(lengths[i] for part in held for i in part) == tokens
                assert {m.micro_batches for m in minis} == {max(-(-len(p) // 2) for p in held)}


def test_a_poisoned_later_mini_batch_undoes_the_whole_update(model_dir):
    """A non-finite loss at the second optimizer step: the first step's weight and Adam changes are undone."""
    policy = make_policy(model_dir)
    batch = PolicyBatch.build(SAMPLES)
    old = policy.old_logprobs(batch)
    settings = UpdateSettings(mini_batches=2)
    policy.update(batch, torch.ones_like(batch.response_mask), old, settings)  # Adam has state to undo
    before = _lora(policy)
    moments = {k: v.clone() for k, v in policy.optimizer.state_dict()["state"][0].items()}
    poisoned = torch.ones_like(batch.response_mask)
    poisoned[3, 0] = float("nan")  # row 3 is in the second mini-batch
    stats = policy.update(batch, poisoned, old, settings)
    assert stats.skipped and stats.optimizer_steps == 0 and policy.version == 1
    assert not _changed(before, _lora(policy))
    after = policy.optimizer.state_dict()["state"][0]
    assert all(torch.equal(after[k], v) for k, v in moments.items())
    assert policy.update(batch, -torch.ones_like(batch.response_mask), old, settings).optimizer_steps == 2
