"""Static checks of the container deployment (no Docker engine runs here): docker-compose.yml, the CPU override,
the Dockerfile, TorchServe's properties and the Prometheus configs agree with each other and with the local
stack's defaults; Prometheus configs pass `promtool check config` (Debian package `prometheus`)."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cxr.serving.torchserve_config import TorchServeSettings
from cxr.stack import health
from cxr.stack.settings import StackSettings
from services.ingestion import settings as ingestion_settings
from services.worker import settings as worker_settings

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DEFAULTS = StackSettings.from_env({}, cwd=REPO)


class _ComposeLoader(yaml.SafeLoader):
    """YAML as Docker Compose reads it: the `!reset` tag of override files resets a value."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: "!reset")


def _yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)  # a SafeLoader subclass


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(_yaml(REPO / "docker-compose.yml"))


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in service.get("environment", {}).items()}


def _port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_every_service_has_a_healthcheck_and_waits_for_healthy_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "torchserve", "ingestion", "worker", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        test = svc.get("healthcheck", {}).get("test")
        assert isinstance(test, list) and test[0] == "CMD" and len(test) > 1, name
    assert services["ingestion"]["depends_on"] == {
        "redis": {"condition": "service_healthy"}, "torchserve": {"condition": "service_healthy"},
    }  # fmt: skip
    assert services["worker"]["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert {d["condition"] for d in services["prometheus"]["depends_on"].values()} == {"service_healthy"}


def test_python_healthchecks_compile_and_call_existing_probes(compose: dict[str, Any]) -> None:
    for name in ("torchserve", "ingestion"):
        test = compose["services"][name]["healthcheck"]["test"]
        assert test[1:3] == ["python", "-c"], name
        tree = ast.parse(test[3])
        imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names}
        assert imported and all(hasattr(health, n) for n in imported), (name, imported)


def test_ports_and_environment_match_the_stack_defaults(compose: dict[str, Any]) -> None:
    s = compose["services"]
    ingestion, worker = _env(s["ingestion"]), _env(s["worker"])
    assert _port_of(ingestion["CXR_INGESTION_ADDR"]) == DEFAULTS.ingestion_port
    assert int(ingestion["CXR_INGESTION_METRICS_PORT"]) == DEFAULTS.ingestion_metrics_port
    assert int(worker["CXR_WORKER_METRICS_PORT"]) == DEFAULTS.worker_metrics_port
    assert _port_of(ingestion["CXR_TORCHSERVE_GRPC"]) == DEFAULTS.ts_grpc_port
    assert ingestion["CXR_TORCHSERVE_MODEL"] == "cxr"
    redis_url = f"redis://redis:{DEFAULTS.redis_port}/0"
    assert ingestion["CXR_REDIS_URL"] == worker["CXR_REDIS_URL"] == redis_url
    assert s["redis"]["command"][1:3] == ["--port", str(DEFAULTS.redis_port)]
    assert s["redis"]["healthcheck"]["test"][2:4] == ["-p", str(DEFAULTS.redis_port)]
    assert s["ingestion"]["ports"] == [f"127.0.0.1:{DEFAULTS.ingestion_port}:{DEFAULTS.ingestion_port}"]
    assert ingestion["CXR_MODEL_DIR"] == worker["CXR_MODEL_DIR"] == "/app/model_store/cxr-nih14-imagenet"


def test_the_services_accept_their_compose_environment(compose: dict[str, Any], tmp_path: Path) -> None:
    """Each service's own settings loader parses the compose environment, and knows every variable in it."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "manifest.json").write_text("{}")  # the loaders only check that the bundle is there
    for name, module in (("ingestion", ingestion_settings), ("worker", worker_settings)):
        env = {**_env(compose["services"][name]), "CXR_MODEL_DIR": str(model)}
        module.load_settings([], environ=env)
        documented = module.build_parser().format_help()
        assert all(f"[{var}]" in documented for var in env), (name, env)


def test_torchserve_properties_match_the_defaults_and_keep_the_model_api_off() -> None:
    props = dict(
        line.split("=", 1) for line in (DEPLOY / "torchserve.properties").read_text().splitlines()
        if line and not line.startswith("#")
    )  # fmt: skip
    ts = TorchServeSettings(home=Path("/x"), model_store=Path("/srv/model-store"))
    assert (
        props["inference_address"].endswith(f":{ts.inference_port}") and ts.inference_port == DEFAULTS.ts_inference_port
    )
    assert props["management_address"].endswith(f":{DEFAULTS.ts_management_port}")
    assert props["metrics_address"].endswith(f":{DEFAULTS.ts_metrics_port}")
    assert int(props["grpc_inference_port"]) == DEFAULTS.ts_grpc_port == ts.grpc_inference_port
    assert int(props["grpc_management_port"]) == DEFAULTS.ts_grpc_management_port
    assert props["metrics_mode"] == "prometheus" and props["enable_model_api"] == "false"
    assert props["load_models"] == "cxr=cxr.mar" and props["model_store"] == "/srv/model-store"


def test_torchserve_command_uses_flags_torchserve_knows(compose: dict[str, Any]) -> None:
    command = compose["services"]["torchserve"]["command"]
    assert command[0] == "torchserve" and "--foreground" in command
    help_text = subprocess.run([str(REPO / ".venv" / "bin" / "torchserve"), "--help"], capture_output=True,
                               text=True, timeout=60, check=True).stdout  # fmt: skip
    for flag in (c for c in command if c.startswith("--")):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), flag
    assert "/app/deploy/torchserve.properties" in command


def test_torchserve_gets_the_gpu_and_the_cpu_override_removes_it(compose: dict[str, Any]) -> None:
    devices = compose["services"]["torchserve"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    override = _yaml(DEPLOY / "compose.cpu.yml")
    assert override["services"]["torchserve"]["deploy"]["resources"]["reservations"]["devices"] == "!reset"
    readme = (DEPLOY / "README.md").read_text()
    assert "deploy/compose.cpu.yml" in readme and "nvidia" in readme.lower()


def test_dockerfile_base_java_requirements_and_sources() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert "openjdk-17-jre-headless" in text and "pip install -r requirements.txt" in text
    sources = [m.split()[:-1] for m in re.findall(r"^COPY (.+)$", text, re.M)]
    for src in (p for group in sources for p in group if "*" not in p):
        assert (REPO / src).exists(), src
    assert "build_archive(" in text  # the TorchServe archive is built at image build
    images = {svc.get("image") for svc in _yaml(REPO / "docker-compose.yml")["services"].values()}
    assert "cxr:0.1.0" in images


def _targets(path: Path) -> dict[str, list[str]]:
    """job -> its static targets, or ``name:port`` of each DNS service discovery."""
    config = yaml.safe_load(path.read_text())
    return {
        job["job_name"]: [t for sc in job.get("static_configs", []) for t in sc["targets"]]
        + [f"{n}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
        for job in config["scrape_configs"]
    }


def test_prometheus_scrapes_every_metrics_endpoint(compose: dict[str, Any]) -> None:
    metrics = {"cxr-ingestion": DEFAULTS.ingestion_metrics_port, "cxr-worker": DEFAULTS.worker_metrics_port,
               "torchserve": DEFAULTS.ts_metrics_port, "cxr-dicom": DEFAULTS.dicom_metrics_port}  # fmt: skip
    hosts = {"cxr-ingestion": "ingestion", "cxr-worker": "worker", "torchserve": "torchserve", "cxr-dicom": "dicom"}
    in_compose = {job: p for job, p in metrics.items() if hosts[job] in compose["services"]}
    assert _targets(DEPLOY / "prometheus.yml") == {job: [f"{hosts[job]}:{p}"] for job, p in in_compose.items()}
    assert _targets(DEPLOY / "prometheus.local.yml") == {job: [f"127.0.0.1:{p}"] for job, p in metrics.items()}


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus.local.yml"])
def test_promtool_accepts_the_prometheus_configs(name: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: install the Debian package `prometheus` (apt-get install -y prometheus)"
    done = subprocess.run([promtool, "check", "config", str(DEPLOY / name)], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr
