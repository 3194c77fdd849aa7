"""Telemetry: the port layout, every documented metric over HTTP, the instrumented replicas, the dashboard's
queries, and a real Prometheus (Debian's) scraping the file_sd targets and answering every dashboard query."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from servers import prometheus_query, prometheus_server, wait_for

from cepo import telemetry
from cepo_proto import Verdict
from cepo_proto.pipeline import StepReport

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "cepo.json"
PROMETHEUS_YML = REPO / "deploy" / "prometheus" / "prometheus.yml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) → value, read over HTTP from this process's metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def exposed_types(port: int) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    types = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        types[name] = family.type
    return types


def report(step: int, **overrides) -> StepReport:
    fields = dict(
        step=step,
        policy_version=step,
        adapter_version=step + 1,
        method="cepo",
        lam=0.5,
        reward_mean=0.25,
        accuracy=0.375,
        zero_variance_groups=1,
        groups=4,
        tokens=120,
        stage_seconds={"gen": 1.5, "verify": 0.25, "adv": 0.01, "old_logp": 0.5, "update": 2.0, "sync": 0.3},
        step_seconds=4.75,
        tokens_per_s=120 / 4.75,
        delta_pos_frac=0.6,
        delta_neg_frac=0.3,
        weight_clip_frac=0.05,
        abs_adv_before=0.8,
        abs_adv_after=0.7,
    )
    fields.update(overrides)
    return StepReport(**fields)


def verdict(reason: str) -> Verdict:
    correct = reason == "correct"
    return Verdict(correct=correct, reward=float(correct), answer=None, reason=reason)


# ------------------------------------------------------------------------------------------------ ports
def test_service_port_layout_and_errors():
    sp = telemetry.service_port
    assert sp(None, "rollout", 3) is None
    assert sp(0, "teacher", 19) == 0
    assert sp(9400, "controller") == 9400
    assert [sp(9400, "learner", r) for r in (0, 9)] == [9410, 9419]
    assert [sp(9400, "rollout", i) for i in (0, 19)] == [9420, 9439]
    assert [sp(9400, "teacher", i) for i in (0, 19)] == [9440, 9459]
    assert [sp(9400, "verifier", i) for i in (0, 19)] == [9460, 9479]
    every = [sp(9400, s, i) for s, (_, n) in telemetry.SERVICES.items() for i in range(n)]
    assert len(set(every)) == len(every) == 71  # no two services share a port
    with pytest.raises(ValueError, match="learner"):
        sp(9400, "learner", 10)
    with pytest.raises(ValueError, match="rollout"):
        sp(9400, "rollout", 20)
    with pytest.raises(ValueError, match="verifier"):
        sp(0, "verifier", -1)
    with pytest.raises(ValueError, match="controller"):
        sp(9400, "controller", 1)
    with pytest.raises(ValueError, match="unknown service 'critic'"):
        sp(9400, "critic")
    with pytest.raises(ValueError, match="base port"):
        sp(65500, "verifier", 0)


# ------------------------------------------------------------------------------------------------ metrics
def test_every_documented_metric_is_defined_documented_and_served():
    assert len(telemetry.METRICS) == 38
    for name in telemetry.METRICS:
        assert re.search(rf"^{name}\s", telemetry.__doc__, re.M), f"{name} missing from the docstring table"
    for name in re.findall(r"^(cepo_\w+)\s", telemetry.__doc__, re.M):
        assert name in telemetry.METRICS, f"the docstring documents {name}, which is not defined"
    port = telemetry.serve_metrics(0, "127.0.0.1")
    assert telemetry.serve_metrics(0, "127.0.0.1") == port  # once per process
    assert telemetry.serve_metrics(port, "127.0.0.1") == port
    # every family is exposed with its documented type once it has been touched
    telemetry.observe_step(report(0, replica_restarts={"rollout": 1}))
    telemetry.observe_eval({"types-suite": {"sampled": 0.5}})
    with telemetry.track_rollout("types-r") as t:
        t.tokens = 1
    with telemetry.track_teacher("types-t") as t:
        t.tokens = 1
    telemetry.set_adapter_version("rollout", "types-r", 0)
    telemetry.set_adapter_version("teacher", "types-t", None)
    telemetry.observe_verdicts("types-v", [verdict("correct")], 0.1)
    telemetry.observe_learner_update(9, 1.0, 1.0, 0.0, 0.1)
    telemetry.set_replicas("rollout", 2)
    types = exposed_types(port)
    for name, (kind, _, _) in telemetry.METRICS.items():
        assert types.get(name) == kind, f"{name}: exposed as {types.get(name)}, documented as {kind}"


def test_observe_step_and_helpers_over_http():
    port = telemetry.serve_metrics(0, "127.0.0.1")
    steps_before = REGISTRY.get_sample_value("cepo_steps_total") or 0.0
    tokens_before = REGISTRY.get_sample_value("cepo_response_tokens_total") or 0.0

    telemetry.observe_step(report(6))
    telemetry.observe_step(report(7, tokens=80, lam=0.25, stage_seconds={"gen": 2.0, "teacher": 0.75}))
    with telemetry.track_rollout("http-rollout-0") as t:
        t.tokens = 40
    with telemetry.track_rollout("http-rollout-0") as t:
        t.tokens = 2
    with pytest.raises(RuntimeError), telemetry.track_rollout("http-rollout-0") as t:
        raise RuntimeError("engine died")  # a failed request is still counted, and leaves the queue
    with telemetry.track_teacher("http-teacher-0") as t:
        t.tokens = 300
    telemetry.set_adapter_version("rollout", "http-rollout-0", 7)
    telemetry.set_adapter_version("teacher", "http-teacher-0", None)
    reasons = ["correct", "correct", "wrong_answer", "no_boxed", "timeout"]
    telemetry.observe_verdicts("http-verifier-0", [verdict(r) for r in reasons], 0.4)
    telemetry.observe_verdicts("http-verifier-0", ["correct"], 0.2)  # reason strings work too
    telemetry.observe_learner_update(0, 0.5, 1.25, 0.125, 0.9)
    telemetry.observe_learner_update("1", -0.25, 1.25, 0.0625, 1.1)
    telemetry.observe_eval({"http-test": {"sampled": 0.25, "greedy": 0.5}, "http-hard": {"sampled": 0.125}})
    telemetry.observe_eval({"http-test": {"sampled": 0.375}, "http-none": {"greedy": 0.5}})  # the last wins

    got = scrape(port)

    def value(name: str, **labels: str) -> float:
        return got[(name, frozenset(labels.items()))]

    assert value("cepo_step") == 8
    for stage, seconds in {"gen": 2.0, "teacher": 0.75, "verify": 0.0, "update": 0.0, "step": 4.75}.items():
        assert value("cepo_timing_seconds", stage=stage) == seconds
    assert {dict(k[1])["stage"] for k in got if k[0] == "cepo_timing_seconds"} >= set(telemetry.STAGES)
    assert value("cepo_tokens_per_second") == pytest.approx(120 / 4.75)
    assert value("cepo_reward_mean") == 0.25 and value("cepo_accuracy") == 0.375
    assert value("cepo_lambda") == 0.25
    assert value("cepo_delta_fraction", sign="positive") == 0.6
    assert value("cepo_delta_fraction", sign="negative") == 0.3
    assert value("cepo_evidence_clip_fraction") == 0.05
    assert value("cepo_abs_advantage", when="before") == 0.8
    assert value("cepo_abs_advantage", when="after") == 0.7
    assert value("cepo_policy_version") == 7
    assert value("cepo_zero_variance_groups") == 1 and value("cepo_groups") == 4
    assert value("cepo_steps_total") == steps_before + 2
    assert value("cepo_heldout_accuracy", suite="http-test") == 0.375
    assert value("cepo_heldout_accuracy", suite="http-hard") == 0.125
    assert ("cepo_heldout_accuracy", frozenset({("suite", "http-none")})) not in got  # no sampled accuracy
    assert value("cepo_response_tokens_total") == tokens_before + 200

    r = "http-rollout-0"
    assert value("cepo_rollout_tokens_total", replica=r) == 42
    assert value("cepo_rollout_requests_total", replica=r) == 3
    assert value("cepo_rollout_request_seconds_count", replica=r) == 3
    assert value("cepo_rollout_request_seconds_bucket", replica=r, le="+Inf") == 3
    assert value("cepo_rollout_queue_depth", replica=r) == 0
    assert value("cepo_rollout_adapter_version", replica=r) == 7
    t = "http-teacher-0"
    assert value("cepo_teacher_tokens_total", replica=t) == 300
    assert value("cepo_teacher_request_seconds_count", replica=t) == 1
    assert value("cepo_teacher_adapter_version", replica=t) == -1
    v = "http-verifier-0"
    for reason, n in {"correct": 3, "wrong_answer": 1, "no_boxed": 1, "timeout": 1}.items():
        assert value("cepo_verifier_verdicts_total", replica=v, reason=reason) == n
    assert value("cepo_verifier_timeouts_total", replica=v) == 1
    assert value("cepo_verifier_request_seconds_count", replica=v) == 2
    assert value("cepo_verifier_request_seconds_sum", replica=v) == pytest.approx(0.6)
    assert value("cepo_learner_loss", rank="0") == 0.5 and value("cepo_learner_loss", rank="1") == -0.25
    assert value("cepo_learner_grad_norm", rank="1") == 1.25
    assert value("cepo_learner_ppo_clip_fraction", rank="0") == 0.125
    assert value("cepo_learner_step_seconds_count", rank="1") == 1
    assert value("cepo_learner_step_seconds_bucket", rank="1", le="2.5") == 1
    assert value("cepo_learner_updates_total", rank="0") == 1

    # a metrics.jsonl row (a mapping) works as well as a StepReport
    telemetry.observe_step(report(8).model_dump())
    assert REGISTRY.get_sample_value("cepo_step") == 9


def test_queue_depth_counts_requests_in_flight():
    name = "depth-rollout"
    gauge = lambda: REGISTRY.get_sample_value("cepo_rollout_queue_depth", {"replica": name})  # noqa: E731
    with telemetry.track_rollout(name):
        assert gauge() == 1
        with telemetry.track_rollout(name):
            assert gauge() == 2
    assert gauge() == 0
    with pytest.raises(ValueError, match="verifier"):
        telemetry.set_adapter_version("verifier", "v", 1)


def test_write_prometheus_targets(tmp_path):
    out = telemetry.write_prometheus_targets(
        tmp_path / "run" / "prometheus_targets.json",
        [
            {"service": "controller", "host": "10.0.0.1", "port": 9400, "run": "r1"},
            {"service": "rollout", "host": "10.0.0.2", "port": 9420, "replica": "rollout-0", "run": "r1"},
            {"targets": ["10.0.0.3:9460"], "labels": {"job": "cepo-verifier", "replica": "verifier-0"}},
        ],
    )
    assert out == tmp_path / "run" / "prometheus_targets.json"
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left behind
    assert json.loads(out.read_text()) == [
        {
            "targets": ["10.0.0.1:9400"],
            "labels": {"job": "cepo-controller", "service": "controller", "run": "r1"},
        },
        {
            "targets": ["10.0.0.2:9420"],
            "labels": {"job": "cepo-rollout", "service": "rollout", "replica": "rollout-0", "run": "r1"},
        },
        {"targets": ["10.0.0.3:9460"], "labels": {"job": "cepo-verifier", "replica": "verifier-0"}},
    ]
    with pytest.raises(ValueError, match="lacks"):
        telemetry.write_prometheus_targets(out, [{"service": "rollout", "port": 1}])
    with pytest.raises(ValueError, match="not a bound port"):
        telemetry.write_prometheus_targets(out, [{"service": "rollout", "host": "h", "port": 0}])
    assert json.loads(out.read_text())[0]["targets"] == ["10.0.0.1:9400"]  # a failed write changes nothing


def test_recorder_records_heldout_accuracy(tmp_path):
    from cepo.config import load_config
    from cepo.controller.recorder import StepRecorder

    results = {"rec-test": {"n": 16, "samples": 1, "sampled": 0.625, "sampled_se": 0.1, "greedy": 0.75}}
    off = StepRecorder(load_config(None, ["data.source=arithmetic"]), tmp_path / "a", "a", log=print)
    off.record_eval(0, results)  # metrics off: nothing recorded
    assert REGISTRY.get_sample_value("cepo_heldout_accuracy", {"suite": "rec-test"}) is None
    cfg = load_config(None, ["data.source=arithmetic", "logging.metrics_port=0"])
    StepRecorder(cfg, tmp_path / "b", "b", log=print).record_eval(5, results)
    assert REGISTRY.get_sample_value("cepo_heldout_accuracy", {"suite": "rec-test"}) == 0.625


# ------------------------------------------------------------------------------------------------ replicas
def test_replicas_record_their_metrics(tmp_path):
    """The real replica classes (plain objects, transformers engine, a real math-verify worker)."""
    from _tiny import save_random_adapter, save_tiny_model
    from transformers import AutoTokenizer

    from cepo_proto import AdapterPayload
    from cepo_proto.pipeline import GenerateRequest, GradeRequest, SamplingSpec, TeacherItem, TeacherRequest
    from cepo_services.common.templates import chat_prompt_ids
    from cepo_services.rollout.replica import RolloutReplica
    from cepo_services.teacher.replica import TeacherReplica
    from cepo_services.verifier.replica import VerifierReplica

    model_dir = save_tiny_model(tmp_path / "model")
    payload = AdapterPayload.from_dir(3, save_random_adapter(model_dir, tmp_path / "adapter", seed=1))
    prompt = "Compute 4+1+8.\nPut ONLY the final answer inside \\boxed{}"
    get = REGISTRY.get_sample_value

    rollout = RolloutReplica("tel-rollout-0", "transformers", str(model_dir))
    try:
        assert rollout.service == "rollout"
        ip, port = rollout.metrics_endpoint(0)
        assert ip == "127.0.0.1" and port == telemetry.serve_metrics(0)
        rollout.load_adapter(payload)
        assert get("cepo_rollout_adapter_version", {"replica": "tel-rollout-0"}) == 3
        prompt_ids = chat_prompt_ids(AutoTokenizer.from_pretrained(model_dir), prompt)
        request = GenerateRequest(
            prompts=[prompt_ids], sampling=SamplingSpec(n=2, max_tokens=5), expected_version=3
        )
        result = rollout.generate(request)
        labels = {"replica": "tel-rollout-0"}
        assert get("cepo_rollout_tokens_total", labels) == result.generated_tokens > 0
        assert get("cepo_rollout_requests_total", labels) == 1
        assert get("cepo_rollout_request_seconds_count", labels) == 1
        assert get("cepo_rollout_queue_depth", labels) == 0
    finally:
        rollout.shutdown()

    teacher = TeacherReplica("tel-teacher-0", "transformers", str(model_dir))
    try:
        assert teacher.service == "teacher"
        teacher.load_adapter(payload)
        assert get("cepo_teacher_adapter_version", {"replica": "tel-teacher-0"}) == 3
        assert get("cepo_rollout_adapter_version", {"replica": "tel-teacher-0"}) is None
        response = teacher.tokenizer.encode(" 4+1=5. 5+8=13. \\boxed{13}", add_special_tokens=False)
        item = TeacherItem(
            student_prompt=prompt,
            student_prompt_ids=prompt_ids,
            response_ids=response,
            positive="13",
            negative="12",
        )
        scores = teacher.score(TeacherRequest(items=[item], temperature=1.0, expected_version=3))
        labels = {"replica": "tel-teacher-0"}
        assert get("cepo_teacher_tokens_total", labels) == scores.scored_tokens == 2 * len(response)
        assert get("cepo_teacher_request_seconds_count", labels) == 1
    finally:
        teacher.shutdown()

    verifier = VerifierReplica("tel-verifier-0")
    try:
        assert verifier.metrics_endpoint(0)[1] == telemetry.serve_metrics(0)
        request = GradeRequest(responses=["so \\boxed{13}", "so \\boxed{12}", "no box"], answers=["13"] * 3)
        verdicts = verifier.grade(request).verdicts
        labels = {"replica": "tel-verifier-0"}
        assert get("cepo_verifier_request_seconds_count", labels) == 1
        assert get("cepo_verifier_timeouts_total", labels) == 0  # exists (at 0) before the first timeout
        for v in verdicts:
            assert get("cepo_verifier_verdicts_total", {**labels, "reason": v.reason}) >= 1
        total = sum(
            s.value
            for family in REGISTRY.collect()
            if family.name == "cepo_verifier_verdicts"
            for s in family.samples
            if s.name.endswith("_total") and s.labels.get("replica") == "tel-verifier-0"
        )
        assert total == 3
    finally:
        verifier.shutdown()


# ------------------------------------------------------------------------------------------------ dashboard
def test_dashboard_covers_every_metric_and_only_defined_ones():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39 and dashboard["uid"] == "cepo"
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Controller", "Rollout", "Teacher", "Verifier", "Learner"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(set(ids)) == len(ids)
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["type"] == "timeseries"

    queries = telemetry.dashboard_queries(DASHBOARD)
    assert len(queries) >= len(telemetry.METRICS)
    used: dict[str, list[str]] = {}
    for title, expr in queries:
        names = telemetry.metric_names_in(expr)
        assert names, f"panel {title!r}: no cepo metric in {expr!r}"
        unknown = names - set(telemetry.METRICS)
        assert not unknown, f"panel {title!r} uses undefined metrics {sorted(unknown)}"
        for name in names:
            used.setdefault(name, []).append(expr)
            kind = telemetry.METRICS[name][0]
            sel = r"(\{[^}]*\})?"
            if kind == "counter":
                assert re.search(rf"rate\({name}{sel}\[1m\]\)", expr), (
                    f"counter {name} must be a rate: {expr}"
                )
            if kind == "histogram":
                assert re.search(
                    rf"histogram_quantile\(0\.\d+, .*rate\({name}_bucket{sel}\[1m\]\)", expr
                ) or re.search(rf"rate\({name}_count{sel}\[1m\]\)", expr), expr
    missing = set(telemetry.METRICS) - set(used)
    assert not missing, f"no dashboard panel shows {sorted(missing)}"
    for name, (kind, _, _) in telemetry.METRICS.items():
        if kind == "histogram":
            assert any("histogram_quantile" in e for e in used[name]), f"{name}: no quantile panel"


_SELECTOR = re.compile(r"\b(cepo_[a-z0-9_]*[a-z0-9])(\{[^}]*\})?")


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out += panel.get("panels") or []
    return out


def test_dashboard_works_in_an_existing_install():
    """A $run variable every query filters on, the data source a variable (no hard-wired uid), held-out
    accuracy shown."""
    text = DASHBOARD.read_text()
    dashboard = json.loads(text)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    run = variables["run"]
    assert run["type"] == "query" and run["multi"] and run["includeAll"] and run["allValue"] == ".*"
    assert run["datasource"]["uid"] == "${datasource}"
    # a plain query string: every Grafana version reads it (newer ones migrate it to their query object)
    assert run["query"] == run["definition"] == 'label_values(up{job="cepo-controller"}, run)'
    # no data source uid but the variable, anywhere (panels, targets, variables)
    uids = re.findall(r'"uid":\s*"([^"]*)"', text)
    assert set(uids) <= {"${datasource}", "-- Grafana --", "cepo"}, set(uids)
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            expr = target["expr"]
            selectors = _SELECTOR.findall(expr)
            assert selectors, expr
            for name, labels in selectors:
                assert 'run=~"$run"' in labels, (
                    f"panel {panel['title']!r}: {name} not filtered by run: {expr}"
                )
            for agg in re.findall(r"\b(?:sum|max|min|avg)\b(?: by \(([^)]*)\))?", expr):
                assert "run" in [a.strip() for a in agg.split(",")], f"an aggregation mixes runs: {expr}"
            assert "{{run}}" in target["legendFormat"], (panel["title"], target["legendFormat"])
    held = [p for p in _panels(dashboard) if p["title"].startswith("Held-out accuracy")]
    assert len(held) == 1
    exprs = [t["expr"] for t in held[0]["targets"]]
    assert 'cepo_heldout_accuracy{run=~"$run"}' in exprs
    assert 'avg by (run) (cepo_heldout_accuracy{run=~"$run"})' in exprs


def test_dashboard_queries_walks_nested_rows(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        json.dumps(
            {
                "dashboard": {
                    "panels": [
                        {"type": "timeseries", "title": "top", "targets": [{"expr": "cepo_step"}]},
                        {
                            "type": "row",
                            "title": "collapsed",
                            "collapsed": True,
                            "panels": [
                                {
                                    "type": "timeseries",
                                    "title": "inner",
                                    "targets": [{"expr": "cepo_lambda"}, {"expr": "cepo_accuracy"}],
                                },
                                {"type": "text", "title": "note"},
                            ],
                        },
                    ]
                }
            }
        )
    )
    assert telemetry.dashboard_queries(path) == [
        ("top", "cepo_step"),
        ("inner", "cepo_lambda"),
        ("inner", "cepo_accuracy"),
    ]
    assert telemetry.metric_names_in(
        "histogram_quantile(0.9, sum by (le) (rate(cepo_learner_step_seconds_bucket[1m]))) "
        "+ rate(cepo_rollout_request_seconds_count[1m]) + cepo_steps_total"
    ) == {"cepo_learner_step_seconds", "cepo_rollout_request_seconds", "cepo_steps_total"}


def test_promtool_accepts_the_deployed_config():
    done = subprocess.run(
        [PROMTOOL, "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


# ------------------------------------------------------------------------------------------------ Prometheus
class _Driver(threading.Thread):
    """Records a little of everything, every 0.2 s, as a running pipeline would, until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        step = 0
        try:
            while not self.halt.is_set():
                stages = {"gen": 1.0, "verify": 0.2, "adv": 0.01, "teacher": 0.4, "old_logp": 0.3}
                timings = {**stages, "update": 0.5, "sync": 0.1}
                # no restart, but the counter exists (the test does not depend on an earlier one's restarts)
                telemetry.observe_step(report(step, stage_seconds=timings, replica_restarts={"rollout": 0}))
                for i in range(2):
                    with telemetry.track_rollout(f"prom-rollout-{i}") as t:
                        self.halt.wait(0.01)
                        t.tokens = 30 + i
                    telemetry.set_adapter_version("rollout", f"prom-rollout-{i}", step)
                    telemetry.observe_learner_update(i, 0.1 * step, 1.0, 0.1, 0.05 + 0.01 * i)
                with telemetry.track_teacher("prom-teacher-0") as t:
                    t.tokens = 64
                telemetry.set_adapter_version("teacher", "prom-teacher-0", step)
                reasons = ["correct", "wrong_answer", "no_boxed", "timeout"]
                telemetry.observe_verdicts("prom-verifier-0", [verdict(r) for r in reasons], 0.02)
                telemetry.observe_eval({"prom-test": {"sampled": 0.5}, "prom-hard": {"sampled": 0.25}})
                telemetry.set_replicas("rollout", 2 + step % 2)  # a run being scaled
                step += 1
                self.halt.wait(0.2)
        except BaseException as exc:
            self.error = exc


def deployed_config(interval: str = "1s") -> str:
    """deploy/prometheus/prometheus.yml itself, every interval made ``interval`` (the test's patience)."""
    text = PROMETHEUS_YML.read_text()
    for key, value in (
        ("scrape_interval", "5s"),
        ("scrape_timeout", "4s"),
        ("evaluation_interval", "5s"),
        ("refresh_interval", "30s"),
    ):
        assert f"{key}: {value}" in text, f"{PROMETHEUS_YML}: no {key}: {value}"
        text = text.replace(f"{key}: {value}", f"{key}: {interval}")
    return text


def test_deployed_prometheus_config_has_only_the_file_sd_job():
    import yaml

    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    (job,) = config["scrape_configs"]
    assert "static_configs" not in job and job["honor_labels"] is True
    assert job["file_sd_configs"] == [{"files": ["targets/*.json"], "refresh_interval": "30s"}]


def test_link_run_links_and_removes_a_runs_targets(tmp_path):
    deploy = tmp_path / "prometheus"
    shutil.copytree(PROMETHEUS_YML.parent, deploy, ignore=shutil.ignore_patterns("*.json"))
    run = tmp_path / "runs" / "tiny"
    targets = run / "prometheus_targets.json"
    telemetry.write_prometheus_targets(
        targets, [{"service": "controller", "host": "127.0.0.1", "port": 9400, "run": "tiny 20240101"}]
    )
    link = deploy / "targets" / "tiny_20240101.json"

    def link_run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(deploy / "link-run"), *args], capture_output=True, text=True, timeout=60, check=False
        )

    assert link_run(str(run)).returncode == 0
    assert link.is_symlink() and link.resolve() == targets.resolve()
    assert "tiny_20240101.json" in link_run("--list").stdout
    assert link_run("--remove", str(run)).returncode == 0 and not link.exists()
    done = link_run(str(tmp_path / "nothing"))
    assert done.returncode == 1 and "no prometheus_targets.json" in done.stdout


def test_real_prometheus_answers_every_dashboard_query(tmp_path):
    port = telemetry.serve_metrics(0)
    driver = _Driver()
    driver.start()
    try:
        services = ["controller", "learner", "rollout", "teacher", "verifier"]
        telemetry.write_prometheus_targets(
            tmp_path / "prom" / "targets" / "run.json",
            [
                {
                    "service": s,
                    "host": "127.0.0.1",
                    "port": port,
                    "replica": f"{s}-0",
                    "run": "telemetry-test",
                }
                for s in services
            ],
        )
        # a concurrent run (the same endpoint under another run label): the dashboard must keep them apart
        telemetry.write_prometheus_targets(
            tmp_path / "prom" / "targets" / "other.json",
            [{"service": "controller", "host": "127.0.0.1", "port": port, "run": "other-run"}],
        )
        # the deployed config itself, at a 1 s interval
        with prometheus_server(deployed_config(), tmp_path / "prom") as base:

            def targets_up() -> list[dict]:
                up = [r for r in prometheus_query(base, "up == 1") if r["metric"]["run"] == "telemetry-test"]
                return up if len(up) == len(services) else []

            up = wait_for(targets_up, 60, what="every file_sd target to be up")
            assert sorted(r["metric"]["job"] for r in up) == [f"cepo-{s}" for s in services]
            assert {r["metric"]["service"] for r in up} == set(services)
            # the $run variable's query: label_values(up{job="cepo-controller"}, run)
            runs = wait_for(
                lambda: (
                    {r["metric"]["run"] for r in prometheus_query(base, 'up{job="cepo-controller"}')}
                    >= {"telemetry-test", "other-run"}
                ),
                60,
                what="both runs' controllers",
            )
            assert runs

            # every query with $run set to one run: data, and only that run's
            queries = [
                (title, expr.replace("$run", "telemetry-test"))
                for title, expr in telemetry.dashboard_queries(DASHBOARD)
            ]
            pending = dict.fromkeys(expr for _, expr in queries)
            leaks: dict[str, dict] = {}  # a query that returned another run's series

            def answered(expr: str) -> bool:
                results = prometheus_query(base, expr)
                for r in results:
                    if r["metric"].get("run", "telemetry-test") != "telemetry-test":
                        leaks.setdefault(expr, r["metric"])
                values = [float(r["value"][1]) for r in results]
                return any(math.isfinite(v) for v in values)

            def all_answered() -> bool:
                for expr in list(pending):
                    if answered(expr):
                        del pending[expr]
                return not pending

            try:
                wait_for(all_answered, 60, 1.0, what="every dashboard query to return data")
            except TimeoutError as exc:
                raise AssertionError(f"{exc}; still empty: {sorted(pending)}") from None
            assert not leaks, f"queries filtered by run returned other runs' series: {leaks}"

            # honor_labels: the metrics' own replica label wins over the target's
            replicas = {r["metric"]["replica"] for r in prometheus_query(base, "cepo_rollout_requests_total")}
            assert {"prom-rollout-0", "prom-rollout-1"} <= replicas
            # without the filter the two runs mix: that is what the $run variable is for
            assert {r["metric"]["run"] for r in prometheus_query(base, "cepo_step")} == {
                "telemetry-test",
                "other-run",
            }
            held = prometheus_query(base, 'cepo_heldout_accuracy{run="telemetry-test", suite=~"prom-.*"}')
            assert {r["metric"]["suite"]: float(r["value"][1]) for r in held} == {
                "prom-test": 0.5,
                "prom-hard": 0.25,
            }
            names = {r["metric"]["__name__"] for r in prometheus_query(base, '{__name__=~"cepo_.+"}')}
            for name, (kind, _, _) in telemetry.METRICS.items():
                assert (name + "_bucket" if kind == "histogram" else name) in names
    finally:
        driver.halt.set()
        driver.join(10)
    assert driver.error is None, driver.error
