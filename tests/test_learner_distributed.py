"""The distributed learner: 2 Ray actor ranks, gloo, FSDP2 over the LoRA policy, against one process."""

from __future__ import annotations

import os

import pytest
import ray
import torch
import torch.nn.functional as F
from _tiny import save_tiny_model

from cepo_proto.learner import DistillSpec, UpdateRequest, UpdateResult, UpdateSettings
from cepo_services.learner.distributed import LearnerError, LearnerGroup, shard_bounds
from cepo_services.learner.policy import LoraPolicy, PolicyBatch

# five samples of different lengths: 2 ranks get 3 and 2, and with micro-batches of 2 the ranks run 2 and 1
SAMPLES = [
    ([1, 5, 9, 11], [7, 8, 2]),
    ([1, 6], [9, 10, 11, 12, 2]),
    ([1, 5, 9, 11, 13, 14], [2]),
    ([1, 7, 7], [3, 4]),
    ([4, 4, 4, 4, 4], [5, 6, 7, 8, 9, 10]),
]
POLICY = {"rank": 8, "alpha": 16, "lr": 1e-3, "warmup_steps": 0, "lr_schedule": "constant", "seed": 3}


@pytest.fixture(scope="module")
def ray_session():
    previous = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # Ray 2.60 enables token auth by default
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = previous


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("distributed") / "model")


@pytest.fixture(scope="module")
def group(ray_session, model_dir):
    learner = LearnerGroup(str(model_dir), 2, policy_kwargs=POLICY, timeout_s=180, grace_s=20)
    yield learner
    learner.shutdown()


def assert_same_state(actual: dict, expected: dict, atol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys() and expected
    for name, tensor in expected.items():
        assert torch.allclose(actual[name], tensor, atol=atol, rtol=0), name


def test_shard_bounds():
    assert shard_bounds(5, 2) == [(0, 3), (3, 5)]
    assert shard_bounds(1, 3) == [(0, 1), (1, 1), (1, 1)]
    assert shard_bounds(6, 3) == [(0, 2), (2, 4), (4, 6)]


def test_two_ranks_equal_one_process(group, model_dir):
    single = LoraPolicy(str(model_dir), **POLICY)
    batch = PolicyBatch.build(SAMPLES)
    assert_same_state(group.lora_state(), single.lora_state(), atol=0)
    signs = [
        torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0]),
        torch.tensor([-1.0, 0.7, 1.5, -0.2, -1.0]),
    ]
    old = group.old_logprobs(SAMPLES, micro_batch_size=2)
    expected_old = single.old_logprobs(batch)
    assert old.shape == expected_old.shape == (5, 6)
    assert torch.allclose(old, expected_old, atol=1e-5)
    for step, sign in enumerate(signs):  # the second step reuses the first's (now stale) old log-probs
        # per-token advantages, so that every token's gradient differs
        adv = sign.unsqueeze(1) * (1 + 0.1 * torch.arange(6.0)) * batch.response_mask
        result = update(group, SAMPLES, adv, old, micro_batch_size=2)
        stats = result.stats
        assert result.adapter.version == group.version == step + 1  # the learner assigns versions
        expected = single.update(batch, adv, expected_old)
        assert stats.grad_norm > 0.1
        assert stats.grad_norm == pytest.approx(expected.grad_norm, rel=1e-5)
        assert stats.loss == pytest.approx(expected.loss, rel=1e-5, abs=1e-7)
        assert stats.approx_kl == pytest.approx(expected.approx_kl, rel=1e-4, abs=1e-9)
        assert (stats.approx_kl != 0) == (step == 1)  # token-weighted over the ranks
        assert stats.clip_frac == expected.clip_frac and stats.lr == expected.lr
        assert_same_state(group.lora_state(), single.lora_state())
        assert torch.allclose(
            group.old_logprobs(SAMPLES, micro_batch_size=4), single.old_logprobs(batch), atol=1e-5
        )
    # fewer samples than ranks: rank 1 has an empty shard and runs dummy micro-batches to keep FSDP in step
    small = SAMPLES[1:2]
    small_batch = PolicyBatch.build(small)
    old = group.old_logprobs(small)
    assert torch.allclose(old, single.old_logprobs(small_batch), atol=1e-5)
    adv = -small_batch.response_mask
    stats = update(group, small, adv, old).stats
    assert stats.grad_norm == pytest.approx(single.update(small_batch, adv, old).grad_norm, rel=1e-5)
    assert_same_state(group.lora_state(), single.lora_state())


def update(
    group, samples, advantages, old_logp, *, micro_batch_size=8, settings=None, **fields
) -> UpdateResult:
    """One learner update through its contract (an UpdateRequest)."""
    settings = settings or UpdateSettings(micro_batch_size=micro_batch_size)
    request = UpdateRequest(
        samples=samples, advantages=advantages, old_logp=old_logp, settings=settings, **fields
    )
    return group.update(request)


def peft_logprobs(folder, model_dir, samples) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(folder)).eval()
    width = max(len(r) for _, r in samples)
    rows = []
    with torch.no_grad():
        for prompt, response in samples:
            ids = torch.tensor([[*prompt, *response]])
            logp = F.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
            picked = logp.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)
            rows.append(F.pad(picked, (0, width - len(response))))
    return torch.stack(rows)


def test_mini_batches_on_two_ranks_equal_one_process(group, model_dir):
    """Two epochs over three mini-batches (six optimizer steps, ratio away from 1) sharded over two ranks give
    the same update as one process: each step's global mini-batch is the same whatever the rank count."""
    single = LoraPolicy(str(model_dir), **POLICY)
    single.load_training_state(group.training_state())
    batch = PolicyBatch.build(SAMPLES)
    adv = (
        torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0]).unsqueeze(1)
        * (1 + 0.1 * torch.arange(6.0))
        * batch.response_mask
    )
    old = group.old_logprobs(SAMPLES, micro_batch_size=2)
    settings = UpdateSettings(micro_batch_size=1, mini_batches=3, ppo_epochs=2)
    stats = update(group, SAMPLES, adv, old, settings=settings).stats
    expected = single.update(batch, adv, single.old_logprobs(batch), settings)
    assert stats.optimizer_steps == expected.optimizer_steps == 6
    assert stats.approx_kl != 0
    assert stats.loss == pytest.approx(expected.loss, rel=1e-5, abs=1e-7)
    assert stats.grad_norm == pytest.approx(expected.grad_norm, rel=1e-5)
    assert stats.clip_frac == pytest.approx(expected.clip_frac, abs=1e-6)
    assert_same_state(group.lora_state(), single.lora_state())


def test_export_adapter_loads_in_peft(group, model_dir, tmp_path):
    from safetensors.torch import load_file

    payload = group.export_adapter()
    assert payload.version == group.version and sorted(payload.files) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert group.export_adapter().checksum == payload.checksum  # stable: same bytes twice
    folder = payload.write_to(tmp_path / "adapter")
    assert_same_state(load_file(folder / "adapter_model.safetensors"), group.lora_state(), atol=0)
    expected = group.old_logprobs(SAMPLES, micro_batch_size=3)
    assert torch.allclose(peft_logprobs(folder, model_dir, SAMPLES), expected, atol=1e-5)


def test_rank_error_names_the_rank_and_group_survives(group):
    before = group.old_logprobs(SAMPLES)
    bad = [*SAMPLES[:4], ([4, 4], [5, 6, 7, 8, 9, 10_000])]  # sample 4 lies in rank 1's shard
    with pytest.raises(LearnerError, match=r"learner rank 1 failed in old_logprobs: .*sample 4") as info:
        group.old_logprobs(bad)
    assert info.value.rank == 1
    adv = torch.zeros(5, 6)
    with pytest.raises(LearnerError, match="learner rank 1 failed in update"):
        update(group, bad, adv, adv)
    with pytest.raises(ValueError, match=r"advantages must have shape \(5, 6\)"):
        update(group, SAMPLES, adv[:4], adv)
    # a rejected input fails every rank at the agreement step, before any FSDP collective: no one is stuck
    # the same group, ranks, shards and micro-batches as `before`: the same order of operations, bit for bit
    assert torch.equal(group.old_logprobs(SAMPLES), before)


def test_timeout_tears_the_group_down(group):
    group.timeout_s = 0.01
    with pytest.raises(LearnerError, match=r"timed out after 0\.01 s"):
        group.old_logprobs(SAMPLES)
    with pytest.raises(LearnerError, match="shut down"):
        group.lora_state()


def test_rank_failing_inside_a_collective_tears_the_group_down(ray_session, model_dir):
    learner = LearnerGroup(str(model_dir), 2, policy_kwargs=POLICY, timeout_s=60, grace_s=1)
    try:

        def wait_for_peer(rank):
            import torch.distributed as dist

            dist.barrier()  # rank 1 never arrives

        def fail(rank):
            raise RuntimeError("out of memory, say")

        a0, a1 = learner._actors
        refs = [a0.__ray_call__.remote(wait_for_peer), a1.__ray_call__.remote(fail)]
        with pytest.raises(LearnerError, match=r"rank 1 failed in probe: .*out of memory.*\[0\] were stuck"):
            learner._call("probe", refs)
        with pytest.raises(LearnerError, match="shut down"):
            learner.old_logprobs(SAMPLES)
    finally:
        learner.shutdown()


@pytest.mark.parametrize("kind", ["sdpo", "opsd"])
def test_two_ranks_equal_one_process_with_distillation(ray_session, model_dir, kind):
    """OPSD / SDPO on sharded ranks: the teacher pass (SDPO: the EMA weights swapped in) and the EMA update
    give the same step as one process."""
    spec = DistillSpec(kind, top_k=5, ema_decay=0.9)
    teacher = [([1, 3, 3, *p[1:]], r) for p, r in SAMPLES]  # a longer context, the same responses
    group = LearnerGroup(
        str(model_dir), 2, policy_kwargs=POLICY, timeout_s=180, grace_s=20, cpus_per_rank=0.5
    )
    try:
        single = LoraPolicy(str(model_dir), **POLICY)
        batch, teacher_batch = PolicyBatch.build(SAMPLES), PolicyBatch.build(teacher)
        for sign in (torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0]), torch.tensor([-1.0, 0.7, 1.5, -0.2, -1.0])):
            adv = sign.unsqueeze(1) * batch.response_mask
            old = group.old_logprobs(SAMPLES, micro_batch_size=2)
            stats = update(
                group, SAMPLES, adv, old, micro_batch_size=2, teacher_samples=teacher, distill=spec
            ).stats
            expected = single.update(
                batch, adv, single.old_logprobs(batch), teacher_batch=teacher_batch, distill=spec
            )
            assert stats.distill_loss > 0
            assert stats.distill_loss == pytest.approx(expected.distill_loss, rel=1e-4)  # float32 sums
            assert stats.grad_norm == pytest.approx(expected.grad_norm, rel=1e-5)
            assert_same_state(group.lora_state(), single.lora_state())
        wrong = [*teacher[:2], (teacher[2][0], [3]), *teacher[3:]]
        with pytest.raises(ValueError, match="teacher sample 2: its response differs"):
            update(group, SAMPLES, adv, old, teacher_samples=wrong, distill=spec)
        with pytest.raises(ValueError, match=f"{kind} needs one teacher sample per sample"):
            update(group, SAMPLES, adv, old, distill=spec)
    finally:
        group.shutdown()


def test_a_taken_rendezvous_port_is_retried(ray_session, model_dir, monkeypatch):
    """Another process may take the chosen port before rank 0 binds it: the group starts on a fresh one."""
    import socket

    from cepo_services.learner import distributed

    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    ports = iter([busy.getsockname()[1], distributed._free_port()])
    monkeypatch.setattr(distributed, "_free_port", lambda: next(ports))
    try:
        group = LearnerGroup(str(model_dir), 1, policy_kwargs=POLICY, timeout_s=120, cpus_per_rank=0.5)
        try:
            assert group.old_logprobs(SAMPLES[:1]).shape == (1, 3)
        finally:
            group.shutdown()
    finally:
        busy.close()
    assert next(ports, None) is None  # both ports were used: the taken one, then the fresh one
