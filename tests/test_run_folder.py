"""One run, one folder: a folder holding a run is refused unless resumed or overwritten, and a checkpoint is
verified file by file before anything resumes from it (never a silent fresh start)."""

from __future__ import annotations

import json

import pytest
import torch

from cepo.config import load_config
from cepo.controller.recorder import (
    CheckpointError,
    RunFolderError,
    StepRecorder,
    load_checkpoint,
)
from cepo_proto import AdapterPayload


def payload(version: int) -> AdapterPayload:
    files = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": bytes([version]) * 64}
    from cepo_proto.adapter import checksum_files

    return AdapterPayload(version=version, files=files, checksum=checksum_files(files))


@pytest.fixture
def recorder(tmp_path):
    cfg = load_config(None, ["data.source=arithmetic"])
    rec = StepRecorder(cfg, tmp_path / "run", "run-1", log=lambda _: None)
    rec.open()
    return rec


def test_a_folder_holding_a_run_is_refused(recorder, tmp_path):
    (recorder.run_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    other = StepRecorder(recorder.cfg, recorder.run_dir, "run-2", log=lambda _: None)
    with pytest.raises(RunFolderError, match=r"already holds a run \(config.yaml, metrics.jsonl\).*--resume"):
        other.open()
    assert (recorder.run_dir / "metrics.jsonl").read_text() == '{"step": 0}\n'  # nothing touched
    other.open(overwrite=True)
    assert not (recorder.run_dir / "metrics.jsonl").exists() and (recorder.run_dir / "config.yaml").is_file()


def test_checkpoint_round_trip_and_rewind(recorder):
    for step in range(4):
        with recorder.metrics_path.open("a") as fh:
            fh.write(json.dumps({"step": step}) + "\n")
    learner = {"step": 2, "model": {"w": torch.arange(4.0)}}
    recorder.checkpoint(2, payload(2), learner, {"cursor": {"position": 8}}, teacher=payload(0))
    ckpt = load_checkpoint(recorder.run_dir)
    assert ckpt.state["step"] == 2 and ckpt.state["run_id"] == "run-1" and ckpt.state["teacher_version"] == 0
    assert ckpt.adapter().checksum == payload(2).checksum
    assert ckpt.adapter("teacher_adapter").checksum == payload(0).checksum
    assert torch.equal(ckpt.learner_state()["model"]["w"], torch.arange(4.0))
    assert sorted(ckpt.state["files"]) == [
        "adapter/README.md",  # the model card (no tokenizer: the default base is a Hub name not cached here)
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "learner.pt",
        "teacher_adapter/adapter_config.json",
        "teacher_adapter/adapter_model.safetensors",
    ]
    recorder.rewind(2)  # steps 2 and 3 ran after the checkpoint: they are redone
    assert [json.loads(line)["step"] for line in recorder.metrics_path.read_text().splitlines()] == [0, 1]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda ck: (ck / "learner.pt").write_bytes((ck / "learner.pt").read_bytes()[:-7]),
            "learner.pt: truncated",
        ),
        (
            lambda ck: (ck / "adapter" / "adapter_model.safetensors").write_bytes(b"x"),
            "adapter_model.safetensors",
        ),
        (lambda ck: (ck / "learner.pt").unlink(), "learner.pt: missing"),
        (lambda ck: (ck / "state.json").write_text('{"step": 2'), "state.json: unreadable"),
    ],
)
def test_a_damaged_checkpoint_is_an_error_naming_the_file(recorder, damage, message):
    recorder.checkpoint(1, payload(1), {"step": 1}, {})
    damage(recorder.run_dir / "checkpoints" / "step_00001")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(recorder.run_dir)


def test_no_checkpoint_is_an_error_and_an_unfinished_one_is_ignored(recorder):
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        load_checkpoint(recorder.run_dir)
    recorder.checkpoint(1, payload(1), {"step": 1}, {})
    (recorder.run_dir / "checkpoints" / "step_00002.tmp").mkdir()  # a checkpoint cut short by a crash
    assert load_checkpoint(recorder.run_dir).state["step"] == 1


def test_a_resumed_run_keeps_the_evaluations_up_to_its_checkpoint(tmp_path):
    """eval.jsonl lines of steps after the checkpoint came from steps that are redone: they are dropped."""
    from cepo.run import _previous_evaluations

    rows = [
        {"step": s, "policy_version": s, "suite": suite, "sampled": s / 10}
        for s in (0, 5, 10)
        for suite in "ab"
    ]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = _previous_evaluations(tmp_path, 5)
    assert sorted(found) == [0, 5] and found[5]["b"]["sampled"] == 0.5
    kept = [json.loads(line)["step"] for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert kept == [0, 0, 5, 5]
