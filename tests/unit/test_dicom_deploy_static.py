"""Static checks of the DICOM front door and the demonstration PACS in docker-compose.yml (no Docker engine runs
here): the front door's compose environment is one its settings accept, its health check calls the real probe,
and Orthanc and the front door name each other with the same AE titles and ports."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from cxr.stack import dicom_probe
from cxr.stack.settings import StackSettings
from services.dicom.settings import build_parser, load_settings

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DEFAULTS = StackSettings.from_env({}, cwd=REPO)


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return dict(yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"])


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in service.get("environment", {}).items()}


def test_the_front_door_accepts_its_compose_environment(services: dict[str, Any]) -> None:
    env = _env(services["dicom"])
    settings = load_settings([], environ=env)  # listens beyond loopback, so the allow-list must be explicit
    assert not settings.any_calling_ae and "ORTHANC" in settings.allowed_aets
    assert settings.port == DEFAULTS.dicom_port and settings.metrics_port == DEFAULTS.dicom_metrics_port
    assert settings.ingestion_addr == f"ingestion:{DEFAULTS.ingestion_port}"
    assert all(f"[{var}]" in build_parser().format_help() for var in env)
    assert services["dicom"]["ports"] == [f"127.0.0.1:{DEFAULTS.dicom_port}:{DEFAULTS.dicom_port}"]
    assert services["dicom"]["depends_on"]["ingestion"] == {"condition": "service_healthy"}


def test_the_front_door_health_check_calls_the_real_probe(services: dict[str, Any]) -> None:
    test = services["dicom"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    tree = ast.parse(test[3])
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names}
    assert imported == {"dicom_echo"} and hasattr(dicom_probe, "dicom_echo")


def test_orthanc_and_the_front_door_know_each_other(services: dict[str, Any]) -> None:
    config = json.loads((REPO / "deploy" / "orthanc" / "orthanc.json").read_text())
    settings = load_settings([], environ=_env(services["dicom"]))
    assert settings.destination is not None
    assert (settings.destination.ae_title, settings.destination.host) == (config["DicomAet"], "orthanc")
    assert settings.destination.port == config["DicomPort"]
    assert config["DicomModalities"]["cxr"] == [settings.ae_title, "dicom", settings.port]
    assert config["AuthenticationEnabled"] is True and "${ORTHANC_PASSWORD}" in config["RegisteredUsers"].values()
    orthanc = services["orthanc"]
    assert orthanc["ports"] == ["127.0.0.1:8042:8042"]  # REST / DICOMweb on the host's loopback only
    assert ":?" in orthanc["environment"]["ORTHANC_PASSWORD"]  # no default password
    assert "orthanc" in (REPO / "deploy" / "orthanc" / "Dockerfile").read_text()
