"""Trackers (logging.report_to): verl's names, TensorBoard event files read back (a resumed run shows every step
once), W&B offline or a clear error without it, and adapter folders that load from anywhere."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys

import pytest
from _tiny import save_tiny_model

from cepo.config import ConfigError, load_config
from cepo.controller.recorder import StepRecorder
from cepo.trackers import TrackerError, Trackers, check_available, eval_metrics, step_metrics
from cepo_proto.pipeline import StepReport


def report(step: int, reward: float = 0.5, **extra) -> StepReport:
    fields = {
        "step": step,
        "policy_version": step,
        "adapter_version": step + 1,
        "method": "cepo",
        "lam": 0.5 - 0.1 * step,
        "reward_mean": reward,
        "accuracy": reward,
        "zero_variance_groups": 1,
        "groups": 4,
        "tokens": 320,
        "stage_seconds": {"gen": 1.0, "verify": 0.1, "adv": 0.01, "teacher": 0.5, "update": 2.0, "sync": 0.2},
        "step_seconds": 4.0,
        "tokens_per_s": 80.0,
        "delta_pos_frac": 0.3,
        "delta_neg_frac": 0.2,
        "weight_clip_frac": 0.05,
        "abs_adv_before": 0.8,
        "abs_adv_after": 0.7,
        "loss": -0.01,
        "grad_norm": 0.9,
        "ppo_clip_frac": 0.02,
        "lr": 5e-6,
        "replica_restarts": {"rollout": 1, "teacher": 1},
    }
    return StepReport(**{**fields, **extra})


EVAL = {
    "test": {"n": 16, "samples": 4, "sampled": 0.5, "sampled_se": 0.1, "greedy": 0.75, "greedy_se": 0.11},
    "unseen_mix": {
        "n": 16,
        "samples": 4,
        "sampled": 0.25,
        "sampled_se": 0.1,
        "greedy": 0.25,
        "greedy_se": 0.1,
    },
}


def test_step_and_eval_metrics_use_verls_names():
    m = step_metrics(report(2, approx_kl=0.003, teacher_unfit_rows=2), group_size=8)
    assert m["critic/score/mean"] == m["critic/rewards/mean"] == 0.5
    assert m["actor/pg_loss"] == -0.01 and m["actor/pg_clipfrac"] == 0.02 and m["actor/grad_norm"] == 0.9
    assert m["actor/lr"] == 5e-6 and m["actor/ppo_kl"] == 0.003 and "actor/entropy" not in m
    assert m["response_length/mean"] == 320 / (4 * 8)
    assert m["timing_s/gen"] == 1.0 and m["timing_s/step"] == 4.0 and m["perf/throughput"] == 80.0
    assert m["cepo/lambda"] == pytest.approx(0.3) and m["cepo/delta_frac/positive"] == 0.3
    assert m["cepo/delta_frac/negative"] == 0.2 and m["cepo/weight_clip_frac"] == 0.05
    assert m["cepo/abs_advantage/after"] == 0.7 and m["cepo/replica_restarts"] == 2
    assert m["cepo/update_skipped"] == 0.0 and m["cepo/teacher_unfit_rows"] == 2  # an unmapped field too
    assert all(isinstance(v, float) for v in m.values())
    assert "response_length/mean" not in step_metrics(report(0))  # no group size, no mean length
    # a metrics.jsonl row whose skipped update left null stats: those are left out, the rest logged
    row = json.loads(report(1).model_dump_json()) | {"loss": None, "grad_norm": None, "update_skipped": True}
    m = step_metrics(row, group_size=8)
    assert "actor/pg_loss" not in m and m["cepo/update_skipped"] == 1.0 and m["critic/score/mean"] == 0.5

    e = eval_metrics(EVAL)
    assert e["val-core/test/acc/mean@4"] == 0.5 and e["val-aux/test/acc/std_err@4"] == 0.1
    assert e["val-aux/unseen_mix/acc/greedy"] == 0.25 and e["val-aux/test/acc/greedy_se"] == 0.11
    assert e["val-core/average/acc/mean@4"] == 0.375 and e["val-aux/average/acc/greedy"] == 0.5
    assert "val-core/average/acc/mean@4" not in eval_metrics({"test": EVAL["test"]})


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_files_and_a_resumed_run_logs_every_step_once(tmp_path):
    # first session: 4 steps (global steps 1-4), evaluations after 0 and 4 steps; killed after checkpoint 2
    first = Trackers.open(["tensorboard"], tmp_path, run_id="r", name="r", group_size=8)
    first.log_eval(0, EVAL)
    for step in range(4):
        first.log_step(report(step, reward=0.1 * step))
    first.log_eval(4, EVAL)
    first.close()
    # resumed from the checkpoint after 2 steps: steps 2-4 (global 3-5) again, with other values
    second = Trackers.open(["tensorboard"], tmp_path, run_id="r", name="r", group_size=8, resume_step=2)
    for step in range(2, 5):
        second.log_step(report(step, reward=1.0 + step))
    second.log_eval(5, {"test": EVAL["test"]})
    second.close()

    found = scalars(tmp_path / "tensorboard")
    steps, values = zip(*found["critic/score/mean"], strict=True)  # float32 in the event files
    assert steps == (1, 2, 3, 4, 5) and values == pytest.approx([0.0, 0.1, 3.0, 4.0, 5.0])
    assert [s for s, _ in found["timing_s/update"]] == [1, 2, 3, 4, 5]
    assert found["val-core/test/acc/mean@4"] == [
        (0, 0.5),
        (5, 0.5),
    ]  # the purged session's step-4 eval is gone
    assert found["val-core/average/acc/mean@4"] == [(0, 0.375)]
    assert {"actor/pg_loss", "cepo/lambda", "perf/throughput", "response_length/mean"} <= set(found)


def test_recorder_logs_steps_and_evaluations_and_overwrite_removes_them(tmp_path):
    cfg = load_config(None, ["data.source=arithmetic", "logging.report_to=[tensorboard]"])
    rec = StepRecorder(cfg, tmp_path / "run", "run-1", log=lambda _: None)
    rec.open()
    rec.record_eval(0, EVAL)
    rec.record(report(0), [])
    rec.record_eval(1, EVAL)
    rec.finish(None)
    found = scalars(tmp_path / "run" / "tensorboard")
    assert found["critic/score/mean"] == [(1, 0.5)]
    assert [s for s, _ in found["val-core/unseen_mix/acc/mean@4"]] == [0, 1]
    assert found["response_length/mean"] == [(1, 320 / (4 * cfg.rollout.group_size))]

    again = StepRecorder(cfg, tmp_path / "run", "run-2", log=lambda _: None)
    again.open(overwrite=True)
    again.finish(None)
    assert "critic/score/mean" not in scalars(
        tmp_path / "run" / "tensorboard"
    )  # the old run's events are gone


def test_a_missing_wandb_is_a_clear_error_before_anything_is_written(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(
        TrackerError, match=r"logging\.report_to includes 'wandb'.*pip install wandb=="
    ) as info:
        check_available(["tensorboard", "wandb"])
    assert isinstance(info.value, ConfigError)  # the CLI prints it as one `error:` line, exit code 2
    check_available(["tensorboard"])

    cfg = load_config(None, ["data.source=arithmetic", "logging.report_to=[wandb]"])
    rec = StepRecorder(cfg, tmp_path / "run", "run-1", log=lambda _: None)
    with pytest.raises(TrackerError, match="wandb"):
        rec.open()
    assert not (tmp_path / "run").exists()  # no config.yaml: the same command works once wandb is installed

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    from cepo.trackers import WandbTracker

    with pytest.raises(TrackerError, match=r"pip install wandb=="):
        WandbTracker(tmp_path, run_id="r", name="r", project="p", config={}, resume=False)


def test_config_names_the_allowed_trackers():
    assert load_config(None, []).logging.report_to == []
    cfg = load_config(None, ["logging.report_to=[tensorboard, wandb, tensorboard]"])
    assert cfg.logging.report_to == ["tensorboard", "wandb"]
    assert load_config(None, ["logging.report_to=tensorboard"]).logging.report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match=r"logging\.report_to: got 'mlflow'; allowed values: 'tensorboard'"):
        load_config(None, ["logging.report_to=[mlflow]"])


def wandb_records(raw: bytes) -> list[bytes]:
    """The records of a .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB-log blocks of 32 KiB
    whose records are (crc32c: 4, length: 2, type: 1) + data; type 1 is a whole record, 2/3/4 its pieces."""
    import struct

    assert raw[:4] == b":W&B"
    records, pieces, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pieces = data if kind in (1, 2) else pieces + data
        if kind in (1, 4):
            records.append(pieces)
    return records


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is optional (pip install wandb)")
def test_wandb_offline_writes_the_run_into_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    trackers = Trackers.open(
        ["wandb"], tmp_path, run_id="tiny-1", name="tiny", config={"seed": 1}, group_size=8
    )
    trackers.log_eval(0, EVAL)
    for step in range(3):
        trackers.log_step(report(step, reward=0.25 * step))
    trackers.close()
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*-tiny-1/run-tiny-1.wandb")

    from wandb.proto import wandb_internal_pb2

    history = {}
    for data in wandb_records(run_file.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history[record.history.step.num] = items
    assert history[0]["val-core/test/acc/mean@4"] == 0.5
    assert [history[s]["critic/score/mean"] for s in (1, 2, 3)] == [0.0, 0.25, 0.5]


# ---------------------------------------------------------------------------------------------- artifacts
def test_the_run_adapter_loads_from_another_folder_with_its_tokenizer(tmp_path, monkeypatch):
    """A checkpoint's adapter folder, copied elsewhere: PeftModel and AutoTokenizer load it from there; the
    base path is absolute, the card names the run, and a second writer (a resumed run) writes the same bytes."""
    from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cepo_services.learner.policy import LoraPolicy

    work = tmp_path / "work"
    save_tiny_model(work / "model")
    monkeypatch.chdir(work)
    policy = LoraPolicy("model", rank=4, alpha=8, target_modules=("q_proj", "v_proj"), seed=1)
    payload = policy.export_adapter(version=3)
    cfg = load_config(None, ["data.source=arithmetic", "model.path=model", "model.lora.rank=4"])
    folders = []
    for name in ("straight", "resumed"):
        rec = StepRecorder(cfg, work / name, "tiny-run-7", log=lambda _: None)
        rec.open()
        rec.checkpoint(3, payload, {"step": 3}, {"cursor": {}})
        folders.append(work / name / "adapter")
    a, b = folders
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for file in a.iterdir():  # README.md and the tokenizer too: nothing depends on the folder or the time
        assert file.read_bytes() == (b / file.name).read_bytes(), file.name
    assert (work / "straight" / "checkpoints" / "step_00003" / "adapter" / "README.md").is_file()

    config = json.loads((a / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((work / "model").resolve())
    card = (a / "README.md").read_text()
    for text in ("tiny-run-7", "CEPO", "training steps | 3", "policy version | 3", "LoRA rank r | 4"):
        assert text in card, text
    assert str(work / "straight") not in card

    elsewhere = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(a, elsewhere)
    monkeypatch.chdir(tmp_path)  # "model" no longer resolves from here
    tokenizer = AutoTokenizer.from_pretrained(str(elsewhere))
    assert (
        tokenizer("4+1=5").input_ids == AutoTokenizer.from_pretrained(str(work / "model"))("4+1=5").input_ids
    )
    model = AutoPeftModelForCausalLM.from_pretrained(str(elsewhere))
    assert model.peft_config["default"].r == 4
    base = AutoModelForCausalLM.from_pretrained(
        PeftConfig.from_pretrained(str(elsewhere)).base_model_name_or_path
    )
    PeftModel.from_pretrained(base, str(elsewhere))


def test_a_hub_base_name_is_kept_and_a_missing_tokenizer_is_not_fatal(tmp_path):
    from cepo.artifacts import complete_adapter, resolve_base

    assert resolve_base("Qwen/Qwen3-VL-2B-Instruct") == "Qwen/Qwen3-VL-2B-Instruct"
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "Org/Model", "r": 8}))
    complete_adapter(
        folder,
        tokenizer=None,
        card={
            "method": "grpo",
            "method_display": "GRPO",
            "step": 1,
            "version": 1,
            "run_id": None,
            "run_name": "x",
        },
    )
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "Org/Model"
    assert "base_model: Org/Model" in (folder / "README.md").read_text()
