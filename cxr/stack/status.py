"""``cxr status``: the state of each service of the local stack, from stack.json plus live probes."""

from __future__ import annotations

from typing import Any

from cxr import NOT_FOR_CLINICAL_USE
from cxr.stack import health
from cxr.stack.errors import ModelDirError
from cxr.stack.settings import SERVICES, StackSettings
from cxr.stack.state import ServiceRecord, read_state
from cxr.stack.supervisor import ingestion_probe_tls, model_summary, service_ready

# states a service can be in
READY = "ready"  # its process runs and its readiness probe answers
RUNNING = "running"  # its process runs but has not been ready yet (still starting)
UNHEALTHY = "unhealthy"  # its process runs, was ready once, and its probe fails now
STOPPED = "stopped"  # no process
# what the ingestion service checks behind its health (services.ingestion.health_monitor: "dependency/<name>")
INGESTION_DEPENDENCIES = ("redis", "torchserve")


def stack_status(settings: StackSettings) -> dict[str, Any]:
    """{"services": {name: {"state", "pid", "address", "metrics_url", "log"}}, "model": {...}, "home", "notice"}.

    Never raises for a stopped or broken stack: that is what it reports."""
    state = read_state(settings.state_file)
    records = state.services if state is not None else {}
    services = {name: service_status(name, records.get(name), settings) for name in SERVICES}
    return {
        "home": str(settings.home),
        "up": all(s["state"] == READY for s in services.values()),
        "services": services,
        "model": state.model if state is not None else _model_or_error(settings),
        "notice": NOT_FOR_CLINICAL_USE,
    }


def service_status(service: str, rec: ServiceRecord | None, settings: StackSettings) -> dict[str, Any]:
    """The status of one service; ``rec`` is its record in stack.json (None if it was not started)."""
    alive = rec is not None and rec.ref.alive()
    if not alive:
        state = STOPPED
    elif service_ready(service, settings):
        state = READY
    else:
        state = UNHEALTHY if rec is not None and rec.ready_at is not None else RUNNING
    status: dict[str, Any] = {
        "state": state,
        "pid": rec.pid if alive and rec is not None else None,
        "address": rec.address if rec is not None else settings.addresses()[service],
        "metrics_url": rec.metrics_url if rec is not None else settings.metrics_urls()[service],
        "log": rec.log if rec is not None else str(settings.log_file(service)),
    }
    if service == "ingestion" and alive:
        status["dependencies"] = ingestion_dependencies(settings)
    if service == "dicom":
        status["ae_title"] = settings.dicom_ae_title  # storescu -aec <ae_title> <host> <port> (any title works)
    return status


def ingestion_dependencies(settings: StackSettings) -> dict[str, str]:
    """How the running ingestion service sees each dependency now: {"redis": "up" | "down" | "unknown", ...}
    ("unknown" when the service does not answer its health check)."""
    services = [f"dependency/{name}" for name in INGESTION_DEPENDENCIES]
    statuses = health.grpc_health_statuses(settings.ingestion_address, services, tls=ingestion_probe_tls())
    words = {"SERVING": "up", "NOT_SERVING": "down"}
    return {name: words.get(statuses.get(f"dependency/{name}", ""), "unknown") for name in INGESTION_DEPENDENCIES}


def _model_or_error(settings: StackSettings) -> dict[str, Any]:
    try:
        return model_summary(settings.model_dir)
    except ModelDirError as e:
        return {"dir": str(settings.model_dir), "error": e.message}
