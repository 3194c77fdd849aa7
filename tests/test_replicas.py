"""Replica classes (plain objects here; Ray actors in the pipeline) and the controller's sync check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny import save_random_adapter, save_tiny_model
from transformers import AutoTokenizer

from cepo.controller.pools import SyncError, check_acks, split_evenly
from cepo_proto import AdapterAck, AdapterPayload
from cepo_proto.pipeline import GenerateRequest, SamplingSpec, TeacherItem, TeacherRequest
from cepo_services.common.engines import score_token_logprobs
from cepo_services.common.replica import VersionMismatch
from cepo_services.common.templates import chat_prompt_ids, teacher_context_ids
from cepo_services.rollout.replica import RolloutReplica
from cepo_services.teacher.replica import TeacherReplica

PROMPT = "Compute 4+1+8. Solve the problem step by step, keeping reasoning brief.\nPut ONLY the final answer inside \\boxed{}"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    model_dir = save_tiny_model(root / "model")
    return model_dir, AdapterPayload.from_dir(0, save_random_adapter(model_dir, root / "adapter", seed=1))


def test_split_evenly():
    assert split_evenly(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert split_evenly(2, 4) == [(0, 1), (1, 2)]
    assert split_evenly(0, 2) == []


def test_check_acks_names_every_replica_that_did_not_confirm():
    good = AdapterAck(replica="rollout-0", version=3, checksum="abc")
    check_acks([good], 3, "abc", ["rollout-0"])
    stale = AdapterAck(replica="teacher-0", version=2, checksum="old")
    with pytest.raises(SyncError, match=r"teacher-0: serves version 2.*rollout-1: no confirmation"):
        check_acks([good, stale], 3, "abc", ["rollout-0", "teacher-0", "rollout-1"])


def test_rollout_replica_refuses_an_unsynced_version(assets):
    model_dir, payload = assets
    replica = RolloutReplica("rollout-0", "transformers", str(model_dir))
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
        request = GenerateRequest(
            prompts=[chat_prompt_ids(tok, PROMPT)],
            sampling=SamplingSpec(n=2, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=6),
            expected_version=0,
        )
        with pytest.raises(VersionMismatch, match="serves adapter version None, the step expects 0"):
            replica.generate(request)
        ack = replica.load_adapter(payload)
        assert (ack.replica, ack.version, ack.checksum) == ("rollout-0", 0, payload.checksum)
        result = replica.generate(request)
        assert len(result.rollouts) == 1 and len(result.rollouts[0]) == 2
        rollout = result.rollouts[0][0]
        assert rollout.policy_version == 0 and rollout.logprobs.dtype == np.float32
        assert len(rollout.logprobs) == len(rollout.response_ids) <= 6
    finally:
        replica.shutdown()


def test_teacher_replica_scores_both_contexts_and_falls_back_to_the_student(assets):
    model_dir, payload = assets
    replica = TeacherReplica("teacher-0", "transformers", str(model_dir))
    try:
        replica.load_adapter(payload)
        tok = replica.tokenizer
        prompt_ids = chat_prompt_ids(tok, PROMPT)
        response = tok.encode(" 4+1=5. 5+8=13. \\boxed{13}", add_special_tokens=False)
        items = [
            TeacherItem(student_prompt=PROMPT, student_prompt_ids=prompt_ids, response_ids=response,
                        positive="13", negative="12"),
            TeacherItem(student_prompt=PROMPT, student_prompt_ids=prompt_ids, response_ids=response,
                        positive="13", negative=None),
        ]  # fmt: skip
        scores = replica.score(TeacherRequest(items=items, temperature=1.0, expected_version=0))
        model = replica.engine.model
        expect = {
            name: score_token_logprobs(model, [([*ctx, *response], len(ctx))])[0]
            for name, ctx in {
                "pos": teacher_context_ids(tok, PROMPT, "13"),
                "neg": teacher_context_ids(tok, PROMPT, "12"),
                "student": prompt_ids,
            }.items()
        }
        assert np.allclose(scores.logp_pos[0], expect["pos"], atol=1e-6)
        assert np.allclose(scores.logp_neg[0], expect["neg"], atol=1e-6)
        assert np.allclose(scores.logp_neg[1], expect["student"], atol=1e-6)  # P_T⁻ := P_S
        assert not np.allclose(expect["neg"], expect["student"])
        assert scores.scored_tokens == 4 * len(response)
        with pytest.raises(VersionMismatch):
            replica.score(TeacherRequest(items=items, temperature=1.0, expected_version=5))
        assert torch.is_tensor(torch.from_numpy(scores.logp_pos[1]))
    finally:
        replica.shutdown()


def test_teacher_rows_that_do_not_fit_are_reported_not_sent(assets):
    """A response at the generation cap plus the hint is longer than the engine scores: that item comes back
    in ``unfit`` with empty scores (the controller gives it Δ = 0); the other items are scored as usual."""
    model_dir, payload = assets
    replica = TeacherReplica("teacher-0", "transformers", str(model_dir))
    try:
        replica.load_adapter(payload)
        tok = replica.tokenizer
        prompt_ids = chat_prompt_ids(tok, PROMPT)
        limit = replica.engine.max_score_len
        assert limit == 512  # the tiny model's position limit
        short = tok.encode(" 4+1=5. \\boxed{5}", add_special_tokens=False)
        at_cap = (short * 200)[
            : limit - len(prompt_ids)
        ]  # the student context fits exactly, the hint does not
        assert len(prompt_ids) + len(at_cap) == limit

        def item(response, negative):
            return TeacherItem(student_prompt=PROMPT, student_prompt_ids=prompt_ids, response_ids=response,
                               positive="13", negative=negative)  # fmt: skip

        items = [item(short, "12"), item(at_cap, "12"), item(at_cap, None), item(short, None)]
        scores = replica.score(TeacherRequest(items=items, temperature=1.0, expected_version=0))
        assert scores.unfit == [1, 2]  # the positive context does not fit either way
        assert [len(a) for a in scores.logp_neg] == [len(short), 0, 0, len(short)]
        assert [len(a) for a in scores.logp_pos] == [len(short), 0, 0, len(short)]
        assert scores.scored_tokens == 4 * len(short)
        alone = replica.score(TeacherRequest(items=items[:1], temperature=1.0, expected_version=0))
        assert np.array_equal(alone.logp_pos[0], scores.logp_pos[0]) and alone.unfit == []
    finally:
        replica.shutdown()
