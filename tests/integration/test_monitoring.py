"""Monitoring against the real local stack: `cxr up` (redis-server, TorchServe, ingestion, explanation worker, DICOM
front door) on free loopback ports serving a tiny random ensemble; real radiographs analysed with `cxr analyze`,
a bad file rejected, a job that fails. Then: every metrics endpoint passes `promtool check metrics`; every metric
the dashboard and the alert rules read is in the real /metrics output; the drift metrics count exactly what the
answers said; a real Prometheus (Debian package) configured from deploy/prometheus.local.yml with the rules of
deploy/monitoring finds every target up, evaluates the rules without error and answers every dashboard query."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
import yaml
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families
from support import DATA, REPO, free_port, wait_until

from cxr import monitoring
from cxr.core.jobs import JobStatus, job_key, new_job_fields
from cxr.core.manifest import Manifest
from cxr.models.testing import make_random_ensemble
from cxr.stack.testing import free_port_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CXR = REPO / ".venv" / "bin" / "cxr"
DICOM = DATA / "dicom"
GOOD = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "siim_pneumothorax_negative.dcm", "nih_no_finding_dx.dcm")
MONITORING = REPO / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "cxr-serving.json"
RULE_FILES = sorted(MONITORING.glob("*.rules.yml"))
# default metrics port in deploy/prometheus.local.yml -> the variable that moves it to a free port here
PORT_VARIABLES = {9151: "CXR_INGESTION_METRICS_PORT", 9152: "CXR_WORKER_METRICS_PORT", 8482: "CXR_TS_METRICS_PORT",
                  9153: "CXR_DICOM_METRICS_PORT"}  # fmt: skip


@dataclass
class Stack:
    env: dict[str, str]
    root: Path
    manifest: Manifest

    def cxr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(CXR), *args], env=self.env, cwd=self.root, capture_output=True, text=True,
                              timeout=timeout, check=False)  # fmt: skip

    def metrics_urls(self) -> dict[str, str]:
        done = self.cxr("status", "--json", timeout=60)
        assert done.returncode == 0, done.stderr
        services = json.loads(done.stdout)["services"]
        return {name: s["metrics_url"] for name, s in services.items() if s["metrics_url"]}


def _kill_leftovers(state_file: Path) -> None:
    if not state_file.exists():
        return
    for s in json.loads(state_file.read_text())["services"].values():
        try:
            p = psutil.Process(s["pid"])
            if abs(p.create_time() - s["create_time"]) < 1:
                os.killpg(s["pgid"] or s["pid"], signal.SIGKILL)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("monitored")
    manifest = make_random_ensemble(root / "model", size=64)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(free_port_env(), CXR_HOME=str(root / "home"), CXR_MODEL_DIR=str(root / "model"),
               CXR_OVERLAY_MAX_SIDE="256", CXR_STACK_START_TIMEOUT_S="200", CXR_STACK_STOP_GRACE_S="20")  # fmt: skip
    st = Stack(env=env, root=root, manifest=manifest)
    try:
        up = st.cxr("up", timeout=400)
        assert up.returncode == 0, f"cxr up failed:\n{up.stdout}\n{up.stderr}"
        yield st
    finally:
        st.cxr("down", timeout=120)
        _kill_leftovers(root / "home" / "stack.json")


def _failing_job(stack: Stack) -> str:
    """A queued job without its uploaded DICOM, enqueued as ingestion does: the real worker fails it."""
    client = redis.Redis.from_url(f"redis://127.0.0.1:{stack.env['CXR_REDIS_PORT']}/0", socket_timeout=10)
    job_id = uuid.uuid4().hex
    fields = new_job_fields(JobStatus.QUEUED, "queued", model_name=stack.manifest.name,
                            model_version=stack.manifest.version)  # fmt: skip
    client.hset(job_key(job_id), mapping=fields)  # type: ignore[arg-type]
    client.expire(job_key(job_id), 600)
    producer = Celery("cxr", broker=f"redis://127.0.0.1:{stack.env['CXR_REDIS_PORT']}/0", set_as_current=False)
    try:
        producer.send_task("cxr.explain", args=[job_id], queue="explain")
    finally:
        producer.close()

    def failed() -> bool:
        return client.hget(job_key(job_id), "status") == b"failed"

    wait_until(failed, 120, "the worker to fail the job", interval_s=0.5)
    client.close()
    return job_id


@pytest.fixture(scope="module")
def traffic(stack: Stack) -> dict[str, Any]:
    """Real traffic: the good files analysed (with explanations), again (cache hits), random bytes, a failed job."""
    files = [str(DICOM / name) for name in GOOD]
    done = stack.cxr("analyze", "--json", "--wait", "--timeout", "180", "--out", str(stack.root / "out"), *files,
                     timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    fresh = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert [r["explanation"]["status"] for r in fresh] == ["done"] * len(GOOD)
    again = stack.cxr("analyze", "--json", *files, timeout=300)
    assert all(json.loads(line)["cached"] for line in again.stdout.splitlines() if line.strip())
    junk = stack.root / "random.dcm"
    junk.write_bytes(os.urandom(2048))
    assert stack.cxr("analyze", "--json", str(junk), timeout=120).returncode == 1
    return {"fresh": fresh, "failed_job": _failing_job(stack)}


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return str(reply.read().decode())


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_every_metrics_endpoint_passes_promtool_check_metrics(stack: Stack, traffic: dict[str, Any]) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: install the Debian package `prometheus`"
    urls = stack.metrics_urls()
    assert {"ingestion", "worker", "torchserve"} <= set(urls)
    for name, url in urls.items():
        body = _scrape(url)
        assert "# TYPE" in body, name
        done = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True,
                              timeout=60, check=False)  # fmt: skip
        assert done.returncode == 0, f"{name}: {done.stdout}{done.stderr}"


def test_every_metric_of_the_dashboard_and_the_rules_is_in_the_real_output(
    stack: Stack, traffic: dict[str, Any]
) -> None:
    exposed: set[str] = set()
    for url in stack.metrics_urls().values():
        for family in _families(_scrape(url)).values():
            exposed |= monitoring.exposed_names(family.name, family.type)
    dashboard = monitoring.load_dashboard(DASHBOARD)
    used = set().union(*map(monitoring.metric_names, monitoring.dashboard_expressions(dashboard).values()))
    used |= monitoring.variable_metric_names(dashboard)
    for path in RULE_FILES:
        used |= set().union(*map(monitoring.metric_names, monitoring.rule_expressions(path).values()))
    needed = used - monitoring.recorded_names(RULE_FILES) - monitoring.PROMETHEUS_SERIES
    assert needed - exposed == set()
    assert len(needed) >= 15


def test_drift_metrics_count_exactly_what_the_answers_said(stack: Stack, traffic: dict[str, Any]) -> None:
    fresh = traffic["fresh"]
    families = _families(_scrape(stack.metrics_urls()["ingestion"]))

    def value(family: str, sample: str, **labels: str) -> float:
        found = [s.value for s in families[family].samples if s.name == sample and s.labels == labels]
        assert len(found) == 1, (sample, labels)
        return float(found[0])

    assert value("cxr_ingestion_analysed_images", "cxr_ingestion_analysed_images_total") == len(fresh)
    assert value("cxr_ingestion_cache_hits", "cxr_ingestion_cache_hits_total") == len(fresh)  # cache: not counted
    for label in stack.manifest.labels:
        decided = [f for row in fresh for f in row["findings"] if f["label"] == label]
        positives = sum(f["positive"] for f in decided)
        assert value("cxr_ingestion_positive_findings", "cxr_ingestion_positive_findings_total", label=label) == (
            positives
        )
        assert value("cxr_ingestion_vote_fraction", "cxr_ingestion_vote_fraction_count", label=label) == len(decided)
        unanimous_no = sum(f["votes"] == 0 for f in decided)
        assert value("cxr_ingestion_vote_fraction", "cxr_ingestion_vote_fraction_bucket", label=label, le="0.0") == (
            unanimous_no
        )
    assert value("cxr_ingestion_explain_queue_length", "cxr_ingestion_explain_queue_length", queue="explain") == 0
    assert value("cxr_ingestion_rejections", "cxr_ingestion_rejections_total", reason="NOT_DICOM") == 1


# -- a real Prometheus ---------------------------------------------------------------------------------------------
def _prometheus_config(stack: Stack, folder: Path) -> Path:
    """deploy/prometheus.local.yml with this stack's ports, 1 s scrapes and the rules of deploy/monitoring."""
    config = yaml.safe_load((REPO / "deploy" / "prometheus.local.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(p) for p in RULE_FILES]
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            static["targets"] = [f"127.0.0.1:{stack.env[PORT_VARIABLES[int(t.rsplit(':', 1)[1])]]}"
                                 for t in static["targets"]]  # fmt: skip
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def prometheus(stack: Stack, traffic: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus scraping the stack; yields its base URL."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus not found: install the Debian package `prometheus`"
    folder = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    log = folder / "prometheus.log"
    argv = [binary, f"--config.file={_prometheus_config(stack, folder)}", f"--web.listen-address=127.0.0.1:{port}",
            f"--storage.tsdb.path={folder / 'data'}", "--storage.tsdb.retention.time=1h"]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.poll() is None and _ready(base), 30, "Prometheus to be ready", interval_s=0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def _api(base: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{base}/api/v1/{path}{query}", timeout=30) as reply:
        body = json.loads(reply.read())
    assert body["status"] == "success", body
    return body["data"]


def test_prometheus_finds_every_target_of_the_stack_up(stack: Stack, prometheus: str) -> None:
    urls = set(stack.metrics_urls().values())

    def all_up() -> list[dict[str, Any]] | None:
        targets = _api(prometheus, "targets")["activeTargets"]
        return targets if targets and all(t["health"] == "up" for t in targets) else None

    targets = wait_until(all_up, 60, "every target up", interval_s=0.5)
    assert {t["scrapeUrl"] for t in targets} == urls  # deploy/prometheus.local.yml covers every endpoint
    up = _api(prometheus, "query", query="up")["result"]
    assert {r["metric"]["job"] for r in up} == {t["labels"]["job"] for t in targets}
    assert all(r["value"][1] == "1" for r in up)


def test_prometheus_loads_and_evaluates_the_alert_rules(prometheus: str) -> None:
    expected = {n for p in RULE_FILES for n in monitoring.rule_expressions(p)}

    def evaluated() -> list[dict[str, Any]] | None:
        rules = [r for g in _api(prometheus, "rules")["groups"] if g["interval"] < 60 for r in g["rules"]]
        return rules if rules and not any(r["lastEvaluation"].startswith("0001") for r in rules) else None

    loaded = {r["name"] for g in _api(prometheus, "rules")["groups"] for r in g["rules"]}
    assert loaded == expected
    rules = wait_until(evaluated, 30, "the alert rules to be evaluated", interval_s=0.5)
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []

    def no_target_alert() -> bool:  # absent() holds before the first scrape: pending at most, then resolved
        return not [a for a in _api(prometheus, "alerts")["alerts"] if a["labels"]["alertname"].startswith("CxrTarget")]

    wait_until(no_target_alert, 30, "no CxrTarget* alert while every target is up", interval_s=0.5)


def test_prometheus_answers_every_dashboard_and_rule_query(
    stack: Stack, prometheus: str, traffic: dict[str, Any]
) -> None:
    time.sleep(3)  # a few scrapes, so that rates have two samples
    dashboard = monitoring.load_dashboard(DASHBOARD)
    panels = {k: monitoring.substitute(e) for k, e in monitoring.dashboard_expressions(dashboard).items()}
    rules = {name: e for p in RULE_FILES for name, e in monitoring.rule_expressions(p).items()}
    for expr in rules.values():
        _api(prometheus, "query", query=expr)  # every rule expression is accepted and evaluated
    results = {k: _api(prometheus, "query", query=q)["result"] for k, q in panels.items()}
    # every panel shows data, except those over recording rules (evaluated every 5 min) and alerts
    must_have_data = [k for k, q in panels.items() if "cxr:" not in q and "ALERTS" not in q]
    assert len(must_have_data) >= 15
    assert [k for k in must_have_data if not results[k]] == []
    reasons = {r["metric"]["reason"] for r in results["Explanation failures by reason / A"]}
    assert len(reasons) == 1 and traffic["failed_job"]
    findings = {r["metric"]["label"] for r in results["Prevalence of each predicted finding / A"]}
    assert findings == set(stack.manifest.labels)
