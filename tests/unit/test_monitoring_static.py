"""Static checks of the monitoring under deploy/monitoring: the alert and recording rules pass `promtool check
rules` and their `promtool test rules` unit tests (every alert has a case where it fires and one where it must
not); every PromQL expression of the Grafana dashboard passes promtool; every metric name the dashboard and the
rules read is declared by a service (the integration test test_monitoring.py finds them in real /metrics output);
the Grafana provisioning matches docker-compose.yml. Needs promtool (Debian package `prometheus`)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from cxr import monitoring
from cxr.serving.torchserve_config import METRICS_YAML, TorchServeSettings, render_config
from services.ingestion.metrics import IngestionMetrics

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
MONITORING = DEPLOY / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "cxr-serving.json"
RULE_FILES = sorted(
    p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml") and ("rules" in p.name or "alert" in p.name)
)
TEST_FILES = sorted(MONITORING.glob("promtool-*tests.yml"))
TORCHSERVE_METRICS_YAML = DEPLOY / "torchserve-metrics.yaml"


def _promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: install the Debian package `prometheus` (apt-get install -y prometheus)"
    return subprocess.run([promtool, *map(str, args)], capture_output=True, text=True, timeout=120, check=False)


def _alerts(path: Path) -> set[str]:
    doc = yaml.safe_load(path.read_text())
    return {r["alert"] for g in doc["groups"] for r in g["rules"] if "alert" in r}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return monitoring.load_dashboard(DASHBOARD)


def test_the_rule_files_are_where_the_checks_look_and_pass_promtool_check_rules() -> None:
    assert {p.name for p in RULE_FILES} == {"cxr-alerts.rules.yml", "cxr-prevalence.rules.yml"}
    done = _promtool("check", "rules", *RULE_FILES)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == len(RULE_FILES)


def test_the_issue_asks_for_these_alerts() -> None:
    alerts = set().union(*map(_alerts, RULE_FILES))
    assert {"CxrTargetDown", "CxrTargetMissing", "CxrAnalyzeLatencyHigh", "CxrExplanationBacklog",
            "CxrExplanationFailures", "CxrFindingPrevalenceDrift"} <= alerts  # fmt: skip


@pytest.mark.parametrize("test_file", TEST_FILES, ids=lambda p: p.name)
def test_promtool_unit_tests_of_the_rules_pass(test_file: Path) -> None:
    done = _promtool("test", "rules", test_file)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_firing_case_and_a_silent_case() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for path in TEST_FILES:
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    alerts = set().union(*map(_alerts, RULE_FILES))
    assert alerts - firing == set(), "alerts never shown to fire"
    assert alerts - silent == set(), "alerts never shown to stay silent"


def test_every_alert_has_a_severity_summary_and_description() -> None:
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in (r for r in group["rules"] if "alert" in r):
                assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
                assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_the_dashboard_shows_what_the_issue_asks_for(dashboard: dict[str, Any]) -> None:
    exprs = monitoring.dashboard_expressions(dashboard)
    used = set().union(*map(monitoring.metric_names, exprs.values()))
    assert {"cxr_ingestion_requests_total", "cxr_ingestion_stage_seconds_bucket",  # throughput, latency per stage
            "cxr_ingestion_explain_queue_length", "cxr_worker_queue_wait_seconds_bucket",  # queue depth and wait
            "cxr_ingestion_rejections_total",  # rejections by reason
            "cxr_ingestion_positive_findings_total", "cxr_ingestion_analysed_images_total",  # prevalence (drift)
            "cxr_ingestion_vote_fraction_bucket"} <= used  # fmt: skip  # inter-model agreement
    titles = {p["title"] for p in monitoring.dashboard_panels(dashboard)}
    assert "Prevalence of each predicted finding" in titles and "Latency per stage (p95, p50)" in titles


def test_every_dashboard_expression_passes_promtool(dashboard: dict[str, Any], tmp_path: Path) -> None:
    exprs = monitoring.dashboard_expressions(dashboard)
    assert len(exprs) >= 15
    rules = tmp_path / "dashboard.rules.yml"
    substituted = {k: monitoring.substitute(e) for k, e in exprs.items()}
    rules.write_text(yaml.safe_dump(monitoring.as_recording_rules(substituted)))
    done = _promtool("check", "rules", rules)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in done.stdout


def test_a_broken_expression_is_caught_by_the_same_check(tmp_path: Path) -> None:
    rules = tmp_path / "broken.rules.yml"
    rules.write_text(yaml.safe_dump(monitoring.as_recording_rules({"x": "sum by (le (rate(x[1m]))"})))
    assert _promtool("check", "rules", rules).returncode != 0


def test_dashboard_panels_variables_and_layout(dashboard: dict[str, Any]) -> None:
    panels = monitoring.dashboard_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in panels:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel.get("description"), panel["title"]
        for target in panel["targets"]:
            unknown = monitoring.variables(target["expr"]) - defined - {"__rate_interval", "__range", "__interval"}
            assert not unknown, (panel["title"], unknown)
    assert dashboard["uid"] == "cxr-serving" and dashboard["templating"]["list"][0]["query"] == "prometheus"


def _declared_names() -> set[str]:
    """Every sample name the ingestion service, the worker and TorchServe can expose."""
    names: set[str] = set()
    metrics = IngestionMetrics(CollectorRegistry())
    metrics.set_model("m", "1", ["a"])
    for family in metrics.registry.collect():
        names |= monitoring.exposed_names(family.name, family.type)
    names |= {"cxr_ingestion_explain_queue_length"}  # read from Redis at scrape time: no sample without Redis
    from services.worker import metrics as worker_metrics  # prometheus_client only, no torch

    for metric in (worker_metrics.TASKS, worker_metrics.FAILURES, worker_metrics.TASK_DURATION,
                   worker_metrics.QUEUE_WAIT, worker_metrics.IN_FLIGHT, worker_metrics.MODEL_INFO):  # fmt: skip
        for family in metric.describe():
            names |= monitoring.exposed_names(family.name, family.type)
    ts = yaml.safe_load(TORCHSERVE_METRICS_YAML.read_text())
    names |= {m["name"] for kind in ts["ts_metrics"].values() for m in kind}
    return names


def test_every_metric_the_dashboard_and_rules_read_is_declared(dashboard: dict[str, Any]) -> None:
    used = set().union(*map(monitoring.metric_names, monitoring.dashboard_expressions(dashboard).values()))
    used |= monitoring.variable_metric_names(dashboard)
    for path in RULE_FILES:
        used |= set().union(*map(monitoring.metric_names, monitoring.rule_expressions(path).values()))
    known = _declared_names() | monitoring.recorded_names(RULE_FILES) | monitoring.PROMETHEUS_SERIES
    assert used - known == set()
    assert "cxr_ingestion_vote_fraction_bucket" in known and "ts_inference_requests_total" in known


def test_metric_names_of_promql() -> None:
    expr = 'sum by (le, stage) (rate(a_bucket{x="y", le="0.5"}[5m] offset 1h)) / on () group_left () b > 1e6'
    assert monitoring.metric_names(expr) == {"a_bucket", "b"}
    assert monitoring.metric_names("absent(up{job='x'}) or vector(0)") == {"up"}
    assert monitoring.substitute('rate(x[$__rate_interval]) and y{l=~"${label}"}') == 'rate(x[1m]) and y{l=~".+"}'


def test_grafana_provisioning_matches_compose() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    grafana, prometheus = compose["services"]["grafana"], compose["services"]["prometheus"]
    mounts = dict(v.removesuffix(":ro").split(":", 1)[::-1] for v in grafana["volumes"])  # target -> source
    for source in mounts.values():
        assert (REPO / source).is_dir(), source
    assert mounts["/var/lib/grafana/dashboards/cxr"] == "./deploy/monitoring/grafana/dashboards"
    provider = yaml.safe_load((MONITORING / "grafana/provisioning/dashboards/cxr.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/cxr" and provider["type"] == "file"
    source = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090" and source["datasources"][0]["type"] == (
        "prometheus"
    )
    assert "9090" in prometheus["ports"][0] and grafana["ports"] == ["127.0.0.1:3000:3000"]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert ":?" in grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"], "no default admin password"
    rule_mount = [v for v in prometheus["volumes"] if v.startswith("./deploy/monitoring:")]
    assert rule_mount == ["./deploy/monitoring:/etc/prometheus/monitoring:ro"]
    for config in ("prometheus.yml", "prometheus.local.yml"):
        assert yaml.safe_load((DEPLOY / config).read_text())["rule_files"] == ["monitoring/*.rules.yml"]


def test_compose_worker_can_be_scaled_and_every_replica_is_scraped() -> None:
    """`docker compose up --scale worker=N`: no fixed name, host port or Celery node name; one shared broker."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    worker = compose["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker and "hostname" not in worker
    assert "CXR_WORKER_HOSTNAME" not in worker["environment"]  # default: unique per process and container
    assert worker["environment"]["CXR_REDIS_URL"] == compose["services"]["ingestion"]["environment"]["CXR_REDIS_URL"]
    jobs = {j["job_name"]: j for j in yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]}
    assert jobs["cxr-worker"]["dns_sd_configs"] == [
        {"names": ["worker"], "type": "A", "port": 9152, "refresh_interval": "30s"}
    ]


def test_torchserve_records_only_lint_clean_metrics_everywhere() -> None:
    """TorchServe's default metric names fail `promtool check metrics`; every deployment uses the cxr list."""
    listed = yaml.safe_load(TORCHSERVE_METRICS_YAML.read_text())
    assert yaml.safe_load(METRICS_YAML) == listed
    names = [m["name"] for kind in listed["ts_metrics"].values() for m in kind]
    assert names and all(re.fullmatch(r"[a-z][a-z0-9_]*", n) for n in names)
    assert all(n.endswith("_total") for n in (m["name"] for m in listed["ts_metrics"].get("counter", [])))
    properties = (DEPLOY / "torchserve.properties").read_text()
    assert "metrics_config=/app/deploy/torchserve-metrics.yaml" in properties.splitlines()  # COPY deploy /app/deploy
    settings = TorchServeSettings(home=Path("/x"), model_store=Path("/y"))
    assert f"metrics_config={settings.metrics_config_path}" in render_config(settings, {"cxr": "cxr.mar"})
