"""Faults injected for real: processes killed by pid, a poisoned batch, signals to `cepo train`; exact resume.

The tiny policy with the transformers rollout and teacher engines (deterministic for a fixed request seed), one
learner rank, a local Ray. Every test checks what the issue promises: the run finishes or stops cleanly, nothing
is lost or counted twice, and a resumed run is the run that was never interrupted.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from rich.console import Console
from servers import wait_for

from cepo.config import load_config
from cepo.controller import Trainer
from cepo.controller.recorder import RunFolderError

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _ray_per_module():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    yield
    import ray

    ray.shutdown()


def overrides(model_dir: Path, *extra: str) -> list[str]:
    return [
        f"model.path={model_dir}",
        "rollout.backend=transformers",
        "teacher.backend=transformers",
        "rollout.replicas=1",
        "teacher.replicas=1",
        "learner.ranks=1",
        "rollout.prompts_per_step=4",
        "rollout.group_size=4",
        "data.size=200",
        "data.eval_suites=[]",
        "resources.num_cpus=8",  # the first trainer sizes the module's Ray: room for every test's services
        "algorithm.steps=4",
        *extra,
    ]


def config(model_dir: Path, *extra: str):
    return load_config(REPO / "configs" / "tiny.yaml", overrides(model_dir, *extra))


def quiet() -> Console:
    return Console(file=io.StringIO())


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def lora_b(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v for k, v in trainer.learner.lora_state().items() if "lora_B" in k}


def test_resume_after_a_learner_crash_is_the_uninterrupted_run(tiny_model_dir, tmp_path):
    """4 steps straight vs 2 steps, the learner rank killed in step 3, resumed to 4: the same adapter bytes,
    the same prompts, rewards and versions at every step."""
    from cepo.run import train
    from cepo_services.learner.distributed import LearnerError

    cfg = config(tiny_model_dir, "logging.checkpoint_every=1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(cfg, straight, console=quiet())

    trainer = Trainer(cfg, resumed, log=lambda _: None)
    try:
        trainer.start()
        trainer.train(2)
        os.kill(trainer.learner.info[0]["pid"], signal.SIGKILL)
        with pytest.raises(LearnerError, match="learner rank 0 failed"):
            trainer.step()
    finally:
        trainer.close()
    assert [m["step"] for m in metrics(resumed)] == [0, 1]  # the failed step left no record
    with pytest.raises(RunFolderError, match="already holds a run"):
        train(cfg, resumed, console=quiet())  # a fresh run may not mix into it
    summary = train(cfg, resumed, console=quiet(), resume=True)
    assert summary["steps"] == 4 and summary["policy_version"] == 4

    adapter = "checkpoints/step_00004/adapter/adapter_model.safetensors"
    assert (straight / adapter).read_bytes() == (resumed / adapter).read_bytes()
    keys = ("step", "policy_version", "adapter_version", "reward_mean", "tokens", "adapter_checksum", "lam")
    assert [{k: m[k] for k in keys} for m in metrics(straight)] == [
        {k: m[k] for k in keys} for m in metrics(resumed)
    ]
    for step in (2, 3):  # the steps after the crash drew the same prompts and sampled the same responses
        a, b = (
            json.loads((run / "steps" / f"step_{step:05d}.json").read_text()) for run in (straight, resumed)
        )
        assert [r["prompt"] for r in a["rollouts"]] == [r["prompt"] for r in b["rollouts"]]
        assert [r["response"] for r in a["rollouts"]] == [r["response"] for r in b["rollouts"]]


@pytest.mark.parametrize("stream_groups", [0, 1], ids=["barrier", "streamed"])
def test_killed_replicas_are_replaced_and_no_prompt_is_lost(tiny_model_dir, tmp_path, stream_groups):
    """Streamed, the rollout replica dies inside its stream and the teacher replica under chunks that run side
    by side: each is replaced once, and only the prompts the dead stream had not returned are generated again."""
    import ray

    cfg = config(tiny_model_dir, "rollout.replicas=2", f"rollout.stream_groups={stream_groups}")
    trainer = Trainer(cfg, tmp_path / "run", log=lambda _: None)
    try:
        trainer.start()
        trainer.train(1)
        pools = trainer.pools
        for role, name in (("rollout", "rollout-0"), ("teacher", "teacher-0")):
            os.kill(ray.get(pools.pools[role][name].pid.remote(), timeout=60), signal.SIGKILL)
        first = trainer.step()  # generate and score meet the dead replicas
        os.kill(ray.get(pools.verifier["verifier-0"].pid.remote(), timeout=60), signal.SIGKILL)
        second = trainer.step()
        served = {
            name: ray.get(actor.serving.remote(), timeout=60)
            for name, actor in {**pools.rollout, **pools.teacher}.items()
        }
    finally:
        trainer.close()
    assert first.replica_restarts == {"rollout": 1, "teacher": 1}
    assert second.replica_restarts == {"verifier": 1}
    assert all(v == (trainer.version, trainer.checksum) for v in served.values()), served
    for step in (1, 2):  # every prompt's G rollouts were graded exactly once
        dump = json.loads((tmp_path / "run" / "steps" / f"step_{step:05d}.json").read_text())
        groups = [r["group"] for r in dump["rollouts"]]
        assert sorted(groups) == [g for g in range(4) for _ in range(4)]
    assert [m["adapter_version"] for m in metrics(tmp_path / "run")] == [1, 2, 3]


def test_a_poisoned_batch_is_skipped_and_too_many_stop_the_run(tiny_model_dir, tmp_path):
    """NaN advantages in steps 1, 3 and 4: step 1 is skipped (weights and version unchanged), step 2 trains,
    the second skip in a row (learner.max_skipped_steps = 1) stops the run with a clear message."""
    from cepo.algorithm.advantages import cepo_token_advantages
    from cepo.algorithm.methods import Method, register_method, unregister_method
    from cepo.controller.trainer import PoisonedRun

    calls = []

    def poisoned(seq_adv, logp_pos, logp_neg, mask, lam, eps_w):
        out = cepo_token_advantages(seq_adv, logp_pos, logp_neg, mask, lam, eps_w)
        calls.append(len(calls) + 1)
        if calls[-1] in (1, 3, 4):
            out[int(seq_adv.abs().argmax()), 0] = float("nan")
        return out

    register_method(Method("poisoned", "Poisoned", 5e-6, token_advantages=poisoned, negative_context=True))
    try:
        cfg = config(tiny_model_dir, "algorithm.method=poisoned", "learner.max_skipped_steps=1")
        trainer = Trainer(cfg, tmp_path / "run", log=lambda _: None)
        try:
            trainer.start()
            before = lora_b(trainer)
            skipped = trainer.step()
            assert skipped.update_skipped and skipped.policy_version == skipped.adapter_version == 0
            assert all(torch.equal(before[k], v) for k, v in lora_b(trainer).items())
            trained = trainer.step()
            assert not trained.update_skipped and trained.adapter_version == 1
            assert trainer.step().update_skipped
            with pytest.raises(PoisonedRun, match=r"2 updates in a row skipped .*max_skipped_steps = 1"):
                trainer.step()
        finally:
            trainer.close()
    finally:
        unregister_method("poisoned")
    assert [m["update_skipped"] for m in metrics(tmp_path / "run")] == [True, False, True, True]


def _descendants(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def test_sigterm_checkpoints_records_interrupted_leaves_no_process_and_resume_finishes(
    tiny_model_dir, tmp_path
):
    run_dir = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "CEPO_ERROR_LOG": str(tmp_path / "error.log")}
    command = [sys.executable, "-m", "cepo.cli", "train", "-c", str(REPO / "configs" / "tiny.yaml")]
    sets = [arg for o in overrides(tiny_model_dir, "algorithm.steps=6") for arg in ("--set", o)]
    shm_before = set(os.listdir("/dev/shm"))
    proc = subprocess.Popen(
        [*command, *sets, "--run-dir", str(run_dir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(
            lambda: (run_dir / "metrics.jsonl").is_file() and len(metrics(run_dir)) >= 2, 600, what="2 steps"
        )
        children = _descendants(proc.pid)
        assert children, "Ray and the services run as child processes"
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=300)[0].decode()
    finally:
        proc.kill()
    assert proc.returncode == 130, output
    assert "stopping after the current step" in output and "resume with --resume" in output, output
    done = len(metrics(run_dir))
    assert 2 <= done < 6 and (run_dir / "checkpoints" / f"step_{done:05d}" / "learner.pt").is_file()
    assert not (run_dir / "summary.json").exists()
    deadline = time.monotonic() + 60
    while (
        alive := [p for p in children if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    ) and (time.monotonic() < deadline):
        time.sleep(1)
    assert not alive, [psutil.Process(p).cmdline()[:3] for p in alive if psutil.pid_exists(p)]
    assert set(os.listdir("/dev/shm")) <= shm_before  # no shared-memory segment left behind

    resumed = subprocess.run(
        [sys.executable, "-m", "cepo.cli", "train", "--resume", str(run_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert [m["step"] for m in metrics(run_dir)] == list(range(6))
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6


def test_a_redis_outage_of_two_steps_loses_nothing(tiny_model_dir, tmp_path):
    """Redis stopped after step 1 and started again after step 3 of a 4-step run: the run never notices, and the
    ledger then holds every step, every checkpoint and the final status."""
    from servers import RestartableRedis

    from cepo.ledger import RunLedger

    with RestartableRedis(tmp_path / "redis") as server:
        cfg = config(tiny_model_dir, f"logging.redis_url={server.url}", "logging.checkpoint_every=2")
        trainer = Trainer(cfg, tmp_path / "run", log=lambda _: None)
        try:
            trainer.start()
            trainer.step()
            server.stop()
            trainer.step()
            trainer.step()  # checkpoint of step 2 and steps 2–3 queue
            assert trainer.recorder.ledger.pending >= 3
            server.start()
            trainer.train(1)
        finally:
            trainer.close()
        with RunLedger(server.url) as ledger:
            record = ledger.get_run(trainer.run_id)
            steps = ledger.steps(trainer.run_id)
    assert record["status"] == "finished" and record["step"] == 4
    assert [s["report"]["step"] for s in steps] == [0, 1, 2, 3]
    assert [c["step"] for c in record["checkpoints"]] == [2, 4]
    assert not (tmp_path / "run" / "ledger_spool.jsonl").exists()


def test_a_replica_serving_other_weights_under_the_right_version_is_caught_by_the_probe(
    tiny_model_dir, tmp_path
):
    """The checksum proves the bytes arrived; the probe proves they are in use. rollout-0 is made to serve the
    initial weights while claiming the current version: the next step's probe catches it and reloads it."""
    import ray

    cfg = config(tiny_model_dir, "rollout.replicas=2", "resources.probe_every=1")
    trainer = Trainer(cfg, tmp_path / "run", log=lambda _: None)
    try:
        trainer.start()
        initial = trainer.payload
        first = trainer.step()
        assert first.probe_failures == 0  # every replica reproduces the learner at version 0
        stale = type(initial)(version=trainer.version, files=initial.files, checksum=initial.checksum)
        victim = trainer.pools.rollout["rollout-0"]
        ray.get(victim.load_adapter.remote(stale), timeout=60)  # behind the controller's back
        second = trainer.step()
        served = ray.get(victim.serving.remote(), timeout=60)
    finally:
        trainer.close()
    assert second.probe_failures == 1 and second.replica_restarts == {}  # the reload fixed it
    assert served == (trainer.version, trainer.checksum)
