"""Prometheus metrics of every CEPO service, their ports, the scrape-target file and the dashboard's queries.

Every service (controller, learner rank, rollout / teacher / verifier replica) runs in its own process (a Ray
actor), records into prometheus-client's default registry of that process and serves it over HTTP with
:func:`serve_metrics` (replicas and learner ranks: their ``metrics_endpoint(port)`` actor method, returning
``(node ip, bound port)``). The services' metrics and the endpoint live in the service library
(``cepo_services.common.metrics``, re-exported here); this module adds the controller's, the port layout, the
scrape-target file and the dashboard checks. The metrics are defined once, at import, so several trainers in
one process share them. Names follow verl's where verl has one (verl ``timing_s/gen`` → ``cepo_timing_seconds{stage="gen"}``).

Metrics
=======

==============================  =========  ==============  ===============================================
name                            type       labels          meaning
==============================  =========  ==============  ===============================================
*controller*
cepo_step                       gauge      —               steps done (last StepReport.step + 1)
cepo_timing_seconds             gauge      stage           last step's seconds per stage: gen, verify, adv,
                                                           teacher, old_logp, update, sync and step (the
                                                           whole step); a stage the step skipped reads 0
cepo_tokens_per_second          gauge      —               last step's response tokens / step seconds
cepo_reward_mean                gauge      —               last step's mean verifier reward
cepo_accuracy                   gauge      —               last step's fraction of correct rollouts
cepo_lambda                     gauge      —               λ of the last step (the evidence mix)
cepo_delta_fraction             gauge      sign            fraction of scored tokens with Δ_t > 0
                                                           (sign="positive") or Δ_t < 0 (sign="negative")
cepo_evidence_clip_fraction     gauge      —               fraction of tokens whose weight w_t was clipped
cepo_abs_advantage              gauge      when            mean |A| before (when="before") and |Â_t| after
                                                           (when="after") the token-level reweighting
cepo_policy_version             gauge      —               adapter version the last step's rollouts used
cepo_zero_variance_groups       gauge      —               groups of the last step whose rollouts all got
                                                           A = 0
cepo_groups                     gauge      —               groups (prompts) in the last step
cepo_heldout_accuracy           gauge      suite           sampled accuracy of the last held-out evaluation
                                                           of that suite (eval.every steps, and the end)
cepo_steps_total                counter    —               steps done
cepo_response_tokens_total      counter    —               response tokens of finished steps
cepo_replica_restarts_total     counter    role            replicas replaced after dying or timing out
                                                           (role: rollout, teacher, verifier)
cepo_skipped_updates_total      counter    —               updates skipped for a non-finite advantage,
                                                           loss or gradient norm
cepo_replicas                   gauge      role            replicas of a role now (rollout, teacher,
                                                           verifier; changes with scaling)
cepo_overlap_seconds            gauge      —               last step's stage seconds hidden behind other
                                                           stages (old log-probs beside the teacher; async:
                                                           the generation ahead)
cepo_staleness                  gauge      —               learner version − the last step's rollouts'
                                                           version (algorithm.max_staleness: 0 or 1)
cepo_importance_weight          gauge      stat            truncated importance weights of the last step's
                                                           stale tokens: stat="mean", "min", "max" (1: none)
cepo_importance_clip_fraction   gauge      —               fraction of those weights cut at algorithm.is_cap
*rollout*
cepo_rollout_tokens_total       counter    replica         generated tokens
cepo_rollout_request_seconds    histogram  replica         seconds per generate request
cepo_rollout_queue_depth        gauge      replica         generate requests in flight in that actor
cepo_rollout_adapter_version    gauge      replica         adapter version loaded (-1: none)
cepo_rollout_requests_total     counter    replica         generate requests finished (failed ones too)
*teacher*
cepo_teacher_tokens_total       counter    replica         scored response tokens (positive + negative rows)
cepo_teacher_request_seconds    histogram  replica         seconds per score request
cepo_teacher_adapter_version    gauge      replica         adapter version loaded (-1: none)
*verifier*
cepo_verifier_verdicts_total    counter    replica,reason  verdicts by Verdict.reason (correct,
                                                           wrong_answer, no_boxed, unclosed_boxed,
                                                           timeout, …)
cepo_verifier_timeouts_total    counter    replica         verdicts whose reason is "timeout"
cepo_verifier_request_seconds   histogram  replica         seconds per grade_batch call
*learner*
cepo_learner_loss               gauge      rank            this rank's loss in its last update
cepo_learner_grad_norm          gauge      rank            global gradient norm of the last update
cepo_learner_ppo_clip_fraction  gauge      rank            PPO-clipped token fraction of the last update
cepo_learner_step_seconds       histogram  rank            seconds per update call on this rank
cepo_learner_updates_total      counter    rank            update calls finished
==============================  =========  ==============  ===============================================

Histograms also expose ``<name>_bucket{le}``, ``<name>_sum`` and ``<name>_count`` (buckets 5 ms … 600 s);
counters also ``<name without _total>_created``. ``replica`` is the actor's name (``rollout-0``,
``teacher-1``, ``verifier-0``), ``rank`` the learner rank as a string.

Ports
=====

:func:`service_port` maps one base port to every service: controller ``base``, learner rank r
``base + 10 + r`` (r < 10), rollout replica i ``base + 20 + i`` (i < 20), teacher ``base + 40 + i`` (i < 20),
verifier ``base + 60 + i`` (i < 20). Base None switches metrics off; base 0 gives every process an ephemeral
port (the safe choice when several runs share a node; Prometheus then finds them in the file written by
:func:`write_prometheus_targets`). ``deploy/prometheus/prometheus.yml`` scrapes only what runs write there:
every file_sd file ``deploy/prometheus/targets/*.json`` (a run's ``prometheus_targets.json``, linked there by
``deploy/prometheus/link-run``), whose targets carry ``service``, ``replica`` and ``run`` labels; every scraped
series thus has the ``run`` label, by which ``deploy/grafana/``'s dashboard (a ``$run`` variable; its queries
:func:`dashboard_queries` lists) keeps concurrent runs apart.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cepo_proto.pipeline import STAGES as STEP_STAGES
from cepo_services.common.metrics import METRICS as SERVICE_METRICS
from cepo_services.common.metrics import (
    RequestTimer,
    define,
    endpoint,
    observe_learner_update,
    observe_verdicts,
    serve_metrics,
    set_adapter_version,
    track_rollout,
    track_teacher,
)

__all__ = [
    "METRICS",
    "SERVICES",
    "STAGES",
    "RequestTimer",
    "dashboard_queries",
    "endpoint",
    "metric_names_in",
    "observe_eval",
    "observe_learner_update",
    "observe_step",
    "observe_verdicts",
    "serve_metrics",
    "service_port",
    "set_adapter_version",
    "set_replicas",
    "track_rollout",
    "track_teacher",
    "write_prometheus_targets",
]

# the step's stages (StepReport.stage_seconds) and the whole step
STAGES = (*STEP_STAGES, "step")

# service → (offset from the base port, how many indices it may use)
SERVICES: dict[str, tuple[int, int]] = {
    "controller": (0, 1),
    "learner": (10, 10),
    "rollout": (20, 20),
    "teacher": (40, 20),
    "verifier": (60, 20),
}

# name (as exposed) → (type, label names, help). The docstring's table documents exactly these.
CONTROLLER_METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    # controller
    "cepo_step": ("gauge", (), "Steps done (last StepReport.step + 1)."),
    "cepo_timing_seconds": ("gauge", ("stage",), "Last step's duration per stage (verl timing_s/<stage>)."),
    "cepo_tokens_per_second": ("gauge", (), "Last step's response tokens per second."),
    "cepo_reward_mean": ("gauge", (), "Last step's mean reward."),
    "cepo_accuracy": ("gauge", (), "Last step's fraction of correct rollouts."),
    "cepo_lambda": ("gauge", (), "Lambda of the last step."),
    "cepo_delta_fraction": ("gauge", ("sign",), "Fraction of scored tokens with Delta > 0 / < 0."),
    "cepo_evidence_clip_fraction": ("gauge", (), "Fraction of tokens whose evidence weight was clipped."),
    "cepo_abs_advantage": ("gauge", ("when",), "Mean |advantage| before / after token reweighting."),
    "cepo_policy_version": ("gauge", (), "Adapter version the last step's rollouts used."),
    "cepo_zero_variance_groups": ("gauge", (), "Groups of the last step whose rollouts all got A = 0."),
    "cepo_groups": ("gauge", (), "Groups (prompts) in the last step."),
    "cepo_heldout_accuracy": ("gauge", ("suite",), "Sampled accuracy of the last held-out evaluation."),
    "cepo_steps_total": ("counter", (), "Steps done."),
    "cepo_response_tokens_total": ("counter", (), "Response tokens of finished steps."),
    "cepo_replica_restarts_total": ("counter", ("role",), "Replicas replaced after dying or timing out."),
    "cepo_skipped_updates_total": (
        "counter",
        (),
        "Updates skipped for a non-finite advantage, loss or norm.",
    ),
    "cepo_replicas": ("gauge", ("role",), "Replicas of a role now (changes with scaling)."),
    "cepo_overlap_seconds": ("gauge", (), "Last step's stage seconds hidden behind other stages."),
    "cepo_staleness": ("gauge", (), "Learner version minus the last step's rollouts' version."),
    "cepo_importance_weight": (
        "gauge",
        ("stat",),
        "Truncated importance weights of stale tokens (mean/min/max).",
    ),
    "cepo_importance_clip_fraction": ("gauge", (), "Fraction of importance weights cut at algorithm.is_cap."),
}
METRICS = {**CONTROLLER_METRICS, **SERVICE_METRICS}

_M = {name: define(name, *spec) for name, spec in CONTROLLER_METRICS.items()}


def service_port(base: int | None, service: str, index: int = 0) -> int | None:
    """The metrics port of ``service`` number ``index`` (see the module docstring for the layout).

    None → None (metrics off), 0 → 0 (ephemeral), else ``base + offset + index``.
    """
    if base is None:
        return None
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}; known: {', '.join(SERVICES)}")
    offset, count = SERVICES[service]
    if not 0 <= index < count:
        raise ValueError(f"{service} index must be in [0, {count}) for the port layout, got {index}")
    if base == 0:
        return 0
    top = 60 + SERVICES["verifier"][1] - 1
    if not 0 < base <= 65535 - top:
        raise ValueError(f"metrics base port must be 0 or in [1, {65535 - top}], got {base} (for {service})")
    return base + offset + index


# ---------------------------------------------------------------------------------------------- controller
def observe_step(report: Any) -> None:
    """Record one finished step: a ``cepo_proto.pipeline.StepReport`` or a metrics.jsonl row (a mapping)."""

    def get(key: str, default: Any = 0.0) -> Any:
        if isinstance(report, Mapping):
            return report.get(key, default)
        return getattr(report, key, default)

    _M["cepo_step"].set(int(get("step")) + 1)
    stages = dict(get("stage_seconds", {}) or {})
    for stage in STEP_STAGES:
        _M["cepo_timing_seconds"].labels(stage=stage).set(float(stages.pop(stage, 0.0)))
    for stage, seconds in stages.items():  # a stage the controller adds later still shows
        _M["cepo_timing_seconds"].labels(stage=str(stage)).set(float(seconds))
    _M["cepo_timing_seconds"].labels(stage="step").set(float(get("step_seconds")))
    _M["cepo_tokens_per_second"].set(float(get("tokens_per_s")))
    _M["cepo_reward_mean"].set(float(get("reward_mean")))
    _M["cepo_accuracy"].set(float(get("accuracy")))
    _M["cepo_lambda"].set(float(get("lam")))
    _M["cepo_delta_fraction"].labels(sign="positive").set(float(get("delta_pos_frac")))
    _M["cepo_delta_fraction"].labels(sign="negative").set(float(get("delta_neg_frac")))
    _M["cepo_evidence_clip_fraction"].set(float(get("weight_clip_frac")))
    _M["cepo_abs_advantage"].labels(when="before").set(float(get("abs_adv_before")))
    _M["cepo_abs_advantage"].labels(when="after").set(float(get("abs_adv_after")))
    _M["cepo_policy_version"].set(int(get("policy_version")))
    _M["cepo_zero_variance_groups"].set(int(get("zero_variance_groups")))
    _M["cepo_groups"].set(int(get("groups")))
    _M["cepo_overlap_seconds"].set(float(get("overlap_seconds")))
    _M["cepo_staleness"].set(int(get("staleness", 0)))
    for stat in ("mean", "min", "max"):
        _M["cepo_importance_weight"].labels(stat=stat).set(float(get(f"is_weight_{stat}", 1.0)))
    _M["cepo_importance_clip_fraction"].set(float(get("is_weight_clip_frac")))
    _M["cepo_steps_total"].inc()
    _M["cepo_response_tokens_total"].inc(max(0, int(get("tokens"))))
    for role, count in dict(get("replica_restarts", {}) or {}).items():
        _M["cepo_replica_restarts_total"].labels(role=str(role)).inc(int(count))
    if get("update_skipped", False):
        _M["cepo_skipped_updates_total"].inc()


def set_replicas(role: str, count: int) -> None:
    """The number of ``role`` replicas the run has now (``cepo_replicas{role}``)."""
    _M["cepo_replicas"].labels(role=str(role)).set(int(count))


def observe_eval(results: Mapping[str, Mapping[str, Any]]) -> None:
    """Record a held-out evaluation ({suite: result}, as eval.jsonl has it): each suite's sampled accuracy."""
    for suite, result in results.items():
        if result.get("sampled") is not None:
            _M["cepo_heldout_accuracy"].labels(suite=str(suite)).set(float(result["sampled"]))


# ---------------------------------------------------------------------------------------------- Prometheus
def write_prometheus_targets(path: str | Path, targets: list[dict[str, Any]]) -> Path:
    """Write a Prometheus file_sd JSON file atomically (temporary file + rename); returns the path.

    Each target is ``{"service": "rollout", "host": "10.0.0.5", "port": 9420, "replica": "rollout-0",
    "run": "run-name", ...}`` (replica and run optional; further keys become string labels) or already a
    file_sd entry ``{"targets": ["host:port"], "labels": {...}}``. Output entries look like
    ``{"targets": ["10.0.0.5:9420"], "labels": {"job": "cepo-rollout", "service": "rollout",
    "replica": "rollout-0", "run": "run-name"}}``.
    """
    entries = []
    for i, target in enumerate(targets):
        if "targets" in target:
            hosts = target["targets"]
            if not isinstance(hosts, list) or not all(isinstance(h, str) and ":" in h for h in hosts):
                raise ValueError(
                    f"target {i}: 'targets' must be a list of 'host:port' strings, got {hosts!r}"
                )
            labels = {str(k): str(v) for k, v in (target.get("labels") or {}).items()}
            entries.append({"targets": list(hosts), "labels": labels})
            continue
        missing = [k for k in ("service", "host", "port") if k not in target]
        if missing:
            raise ValueError(f"target {i} lacks {missing}: {target!r}")
        port = int(target["port"])
        if not 0 < port <= 65535:
            raise ValueError(f"target {i}: port {port} is not a bound port")
        service = str(target["service"])
        labels = {"job": f"cepo-{service}", "service": service}
        for key, value in target.items():
            if key not in ("service", "host", "port") and value is not None:
                labels[str(key)] = str(value)
        entries.append({"targets": [f"{target['host']}:{port}"], "labels": labels})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def dashboard_queries(dashboard_path: str | Path) -> list[tuple[str, str]]:
    """(panel title, PromQL expr) of every target of every panel, panels nested in rows included."""
    dashboard = json.loads(Path(dashboard_path).read_text())
    if "dashboard" in dashboard and "panels" not in dashboard:  # the API's export envelope
        dashboard = dashboard["dashboard"]
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets") or []:
                expr = target.get("expr")
                if expr:
                    found.append((str(panel.get("title", "")), str(expr)))
            walk(panel.get("panels") or [])

    walk(dashboard.get("panels") or [])
    return found


_NAME = re.compile(r"\bcepo_[a-z0-9_]*[a-z0-9]")


def metric_names_in(expr: str) -> set[str]:
    """The metric names an expression uses (``_bucket``, ``_sum``, ``_count`` map to their histogram)."""
    names = set()
    for name in _NAME.findall(expr):
        for suffix in ("_bucket", "_sum", "_count"):
            base = name.removesuffix(suffix)
            if base != name and METRICS.get(base, ("",))[0] == "histogram":
                name = base
                break
        names.add(name)
    return names
