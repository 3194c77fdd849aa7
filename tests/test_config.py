"""Run configuration: paper defaults, YAML + --set overrides, one clear error per bad key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cepo.config import ConfigError, RunConfig, dump_config, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_the_papers():
    cfg = RunConfig()
    assert (cfg.rollout.group_size, cfg.rollout.prompts_per_step, cfg.rollout.temperature) == (8, 32, 1.0)
    assert (cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.dropout) == (16, 32, 0.0)
    assert (cfg.learner.clip_low, cfg.learner.clip_high, cfg.learner.warmup_steps) == (0.2, 0.28, 5)
    assert cfg.learner.lr_schedule == "cosine" and cfg.learner.loss_agg == "token-mean"
    assert (cfg.algorithm.lambda0, cfg.algorithm.warm_steps, cfg.algorithm.eps_w) == (0.5, 25, 0.5)
    assert cfg.algorithm.steps == 50 and cfg.model.max_seq_len == 2048
    assert cfg.algorithm.ema_decay == 0.999 and cfg.algorithm.distill_weight == 1.0
    assert cfg.learning_rate == 5e-6
    assert load_config(overrides=["algorithm.method=grpo"]).learning_rate == 1e-6
    assert "lm_head" not in cfg.model.lora.target_modules


@pytest.mark.parametrize("name", ["paper.yaml", "tiny.yaml"])
def test_shipped_configs_load_and_round_trip(name, tmp_path):
    cfg = load_config(ROOT / "configs" / name)
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(dump_config(cfg))
    assert load_config(dumped) == cfg


def test_overrides_parse_yaml_values():
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        ["learner.lr=1e-5", "rollout.top_k=40", "data.eval_suites=[test]", "logging.redis_url=redis://x:1/0"],
    )
    assert cfg.learner.lr == 1e-5 and cfg.rollout.top_k == 40
    assert cfg.data.eval_suites == ["test"] and cfg.logging.redis_url == "redis://x:1/0"


def test_unknown_key_names_key_allowed_keys_and_suggestion():
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=["algorithm.lamda0=0.3"])
    msg = str(exc.value)
    assert "unknown key 'algorithm.lamda0'" in msg and "lambda0" in msg and "did you mean 'lambda0'" in msg


def test_bad_literal_names_allowed_values():
    with pytest.raises(
        ConfigError, match=r"algorithm.method: got 'ppo'; allowed values: 'grpo', 'rlsd', 'cepo'"
    ):
        load_config(overrides=["algorithm.method=ppo"])


def test_every_problem_is_reported_in_one_error():
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=["rollout.group_size=0", "algorithm.eps_w=1.5", "teacher.source=ema"])
    msg = str(exc.value)
    assert "rollout.group_size" in msg and "algorithm.eps_w" in msg
    assert "teacher.source: got 'ema'; allowed values: 'actor', 'reference', 'synced'" in msg


def test_lm_head_is_refused_as_lora_target():
    with pytest.raises(ConfigError, match=r"model\.lora\.target_modules: lm_head may not be a LoRA target"):
        load_config(overrides=["model.lora.target_modules=[q_proj, lm_head]"])


def test_cross_field_checks(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.path is required"):
        load_config(overrides=["data.source=jsonl", "data.path=null"])
    with pytest.raises(ConfigError, match=r"'model\.dtype' is a value, not a section"):
        load_config(overrides=["model.dtype=float32", "model.dtype.x=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"dotted\.key=value"):
        load_config(overrides=["novalue"])


def test_cli_reports_config_errors_with_exit_code_2(tiny_model_dir):  # tiny.yaml's model.path must exist
    cmd = [sys.executable, "-m", "cepo.cli", "config", "validate", "-c", str(ROOT / "configs/tiny.yaml")]
    ok = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([*cmd, "--set", "learner.clip_lo=0.1"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "unknown key 'learner.clip_lo'" in bad.stderr
    shown = subprocess.run(
        [sys.executable, "-m", "cepo.cli", "config", "show", "--set", "algorithm.method=rlsd"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "method: rlsd" in shown.stdout


def test_vllm_teacher_requires_temperature_one():
    for backend in ("vllm", "vllm-merged"):
        with pytest.raises(ConfigError, match=r"set teacher\.backend=transformers"):
            load_config(overrides=["rollout.temperature=0.7", f"teacher.backend={backend}"])
    cfg = load_config(overrides=["rollout.temperature=0.7", "teacher.backend=transformers"])
    assert cfg.rollout.temperature == 0.7
    # auto: vLLM where it can score (temperature 1), on CPU the merged adapter, on GPU replicas the LoRA path
    assert load_config(overrides=["rollout.temperature=0.7"]).engine_backend("teacher") == "transformers"
    assert load_config(overrides=["rollout.temperature=0.7"]).engine_backend("rollout") == "vllm-merged"
    assert load_config().engine_backend("teacher") == "vllm-merged"
    gpu = load_config(overrides=["resources.gpus_per_replica=1", "teacher.gpus_per_replica=0"])
    assert (gpu.engine_backend("rollout"), gpu.engine_backend("teacher")) == ("vllm", "vllm-merged")
    assert load_config(overrides=["rollout.backend=vllm"]).engine_backend("rollout") == "vllm"


def test_teacher_defaults_are_per_method():
    """Paper Table 7: CEPO's teacher is the actor every step, RLSD's the actor synced every 50 steps (for a
    50-step run, the initial policy); the teacher section overrides both for ablations."""
    expected = {"cepo": ("actor", 1), "rlsd": ("synced", 50), "grpo": ("actor", 1)}
    for method, (source, every) in expected.items():
        cfg = load_config(overrides=[f"algorithm.method={method}"])
        assert (cfg.teacher_source, cfg.teacher_sync_every) == (source, every), method
    ablation = load_config(overrides=["algorithm.method=rlsd", "teacher.source=actor"])
    assert ablation.teacher_source == "actor"
    synced = load_config(overrides=["teacher.source=synced", "teacher.sync_every=10"])
    assert (synced.teacher_source, synced.teacher_sync_every) == ("synced", 10)


def _leaf_fields(model: type, prefix: str = "") -> list[str]:
    from pydantic import BaseModel

    out = []
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out += _leaf_fields(kind, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def test_every_config_field_is_read_somewhere():
    """No setting that nothing reads: every leaf of the config tree is read (``.name`` or ``["name"]``) by the
    control plane (``cepo/``), beyond its own definition."""
    import re

    sources = "\n".join(p.read_text() for p in (ROOT / "cepo").rglob("*.py"))
    unread = [
        dotted
        for dotted in _leaf_fields(RunConfig)
        if not re.search(
            rf"""\.{re.escape(dotted.rsplit(".", 1)[-1])}\b|\[["']{re.escape(dotted.rsplit(".", 1)[-1])}["']\]""",
            sources,
        )
    ]
    assert len(_leaf_fields(RunConfig)) > 80
    assert unread == []


def test_validate_refuses_a_model_path_that_does_not_exist(tmp_path):
    """`cepo config validate` checks model.path as `cepo eval` does: one line naming model.path for a local
    path that is not a model folder, and a Hub id offline only when it is in the local cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("CEPO_ERROR_LOG",)}
    env |= {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "CEPO_ERROR_LOG": str(tmp_path / "e"),
    }
    cmd = [sys.executable, "-m", "cepo.cli", "config", "validate", "-c", str(ROOT / "configs/tiny.yaml")]

    def run(model: str) -> subprocess.CompletedProcess:
        args = [*cmd, "--set", f"model.path={model}"]
        return subprocess.run(args, capture_output=True, text=True, check=False, cwd=tmp_path, env=env)

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    # the repository's models/ is not here (cwd is tmp_path): models/… is still a local path, not a Hub id
    for model, line in (
        (
            "models/nope",
            "error: model.path models/nope: no such folder (a local Hugging Face model folder with config.json; "
            "cepo bootstrap builds models/tiny-arith)",
        ),
        ("empty", "error: model.path empty: no config.json in that folder"),
        ("org/name", "error: model.path org/name: a model on the Hugging Face Hub, not in the local cache"),
    ):
        done = run(model)
        assert done.returncode == 2, done.stderr
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(line), done.stderr
        assert "ok:" not in done.stderr
    # a Hub id in the local cache is accepted offline, and so is a local model folder
    snapshot = tmp_path / "hub" / "models--org--cached" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--org--cached" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--cached" / "refs" / "main").write_text("0" * 40)
    for model in ("org/cached", "model", str(tmp_path / "model")):
        done = run(model)
        assert done.returncode == 0 and done.stderr.startswith("ok: "), (model, done.stderr)
