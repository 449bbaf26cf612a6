"""``cxr up`` / ``cxr down``: start the local stack in dependency order (redis-server, TorchServe, ingestion,
worker, the DICOM front door), each with a bounded wait for readiness, and stop it in reverse order.

``up`` is idempotent: services recorded in the state file that are still ready are kept; the rest are started.
On any failure it stops what this call started and raises ServiceStartError carrying that service's log tail.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr.core.errors import CxrError, ManifestError
from cxr.core.manifest import read_manifest
from cxr.stack import health
from cxr.stack.dicom_probe import dicom_echo
from cxr.stack.errors import BadSettingError, ModelDirError, PortInUseError, ServiceStartError, StackError
from cxr.stack.processes import ProcessRef, group_pids, log_tail, port_holder, port_is_free, spawn, stop_process
from cxr.stack.redis_config import redis_server_argv
from cxr.stack.settings import HOST, SERVICES, TORCHSERVE_MODEL, StackSettings
from cxr.stack.state import ServiceRecord, StackState, read_state, remove_state, write_state
from cxr.stack.torchserve_ctl import ARCHIVE, ensure_archive, torchserve
from cxr.tls import ClientTLS, TlsConfigError, stack_probe_tls

log = logging.getLogger(__name__)
Say = Callable[[str], None]
POLL_S = 0.2


@dataclass(frozen=True)
class _Start:
    """What a service starter needs: the settings, and whom to tell as soon as its process exists."""

    settings: StackSettings
    on_spawn: Callable[[ServiceRecord], None]


def model_summary(model_dir: Path) -> dict[str, Any]:
    """What the served ensemble is, from its manifest (no torch): name, version, description, members, ...

    Raises ModelDirError if the directory or its manifest is missing or malformed."""
    try:
        m = read_manifest(model_dir)
    except ManifestError as e:
        raise ModelDirError(
            f"cannot serve {model_dir}: {e.message}. Set CXR_MODEL_DIR to an ensemble directory "
            "(manifest.json + weights), e.g. one written by cxr.models.testing.make_random_ensemble"
        ) from e
    return {
        "name": m.name, "version": m.version, "description": m.description, "trained_on": m.trained_on,
        "members": [{"name": e.name, "arch": e.arch} for e in m.models], "labels": list(m.labels),
        "ensemble_rule": m.ensemble_rule, "input_size": m.preprocess.size, "intended_use": m.intended_use,
        "dir": str(model_dir), "notice": "NOT FOR CLINICAL USE", "held_out": held_out_summary(model_dir),
    }  # fmt: skip


def held_out_summary(model_dir: Path) -> dict[str, Any] | None:
    """The bundle's own held-out evidence, when its evaluation report (report.json, written by `cxr evaluate
    --out`) and frozen-feature baseline (baseline.json) are there: CTP mean AUROC with its 95% CI, the best single
    model's, the baseline's, and on how many images. None without a readable report."""
    try:
        report = json.loads((model_dir / "report.json").read_text())
        ctp = report["ensembles"]["ctp"]
        best_name, best = max(report["models"].items(), key=lambda kv: kv[1]["auroc_mean"] or 0.0)
        out: dict[str, Any] = {"n_images": report["n_images"], "part": report["data"]["part"],
                               "ctp_auroc_mean": ctp["auroc_mean"], "ctp_ci95": ctp["ci95"]["auroc_mean"],
                               "best_model": best_name, "best_model_auroc_mean": best["auroc_mean"]}  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        baseline = json.loads((model_dir / "baseline.json").read_text())
        out["baseline_auroc_mean"] = baseline["auroc_mean"]["mean_of_probes"]["auroc_mean"]
    except (OSError, ValueError, KeyError, TypeError):
        out["baseline_auroc_mean"] = None
    return out


# -- up ----------------------------------------------------------------------------------------------
def up(settings: StackSettings, say: Say = log.info) -> StackState:
    """Start every service that is not already up and ready; return the state written to stack.json.

    Raises ModelDirError, PortInUseError, StackError (already up with another model, missing executable),
    ServiceStartError (a service exited or was not ready within ``settings.start_timeout_s``)."""
    model = model_summary(settings.model_dir)
    state = _current_state(settings, model)
    to_start = [name for name in SERVICES if name not in state.services]
    if not to_start:
        say("the stack is already up")
        return state
    check_ports(settings, to_start)
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    started: list[str] = []
    try:
        for name in to_start:
            say(f"starting {name} ...")
            t0 = time.monotonic()
            state.services[name] = _STARTERS[name](_Start(settings, _recorder(settings, state, name, started)))
            write_state(settings.state_file, state)
            say(f"{name} ready in {time.monotonic() - t0:.1f} s")
    except BaseException:
        _stop_services(settings, state, list(reversed(started)), say)
        _save_or_remove(settings, state)
        raise
    return state


def _recorder(
    settings: StackSettings, state: StackState, name: str, started: list[str]
) -> Callable[[ServiceRecord], None]:
    """Record a service in stack.json as soon as its process exists, so that it can be stopped even if this
    `cxr up` dies while waiting for it."""

    def on_spawn(rec: ServiceRecord) -> None:
        state.services[name] = rec
        started.append(name)
        write_state(settings.state_file, state)

    return on_spawn


def _current_state(settings: StackSettings, model: dict[str, Any]) -> StackState:
    """The recorded state with only the services that are still ready (others are stopped and forgotten)."""
    state = read_state(settings.state_file)
    alive = [name for name, rec in state.services.items() if rec.ref.alive()] if state is not None else []
    if state is None or not alive:
        return StackState(home=str(settings.home), model_dir=str(settings.model_dir), model=model)
    if state.model_dir != str(settings.model_dir):
        raise StackError(f"the stack in {settings.home} is up serving {state.model_dir}; run `cxr down` first")
    stale = [name for name in reversed(SERVICES) if name in state.services and not _still_ready(name, state, settings)]
    _stop_services(settings, state, stale, log.info)
    state.model = model
    return state


def check_ports(settings: StackSettings, services: list[str]) -> None:
    """Raise PortInUseError naming every port of ``services`` that is already bound (and by what, if known)."""
    busy = []
    for service in services:
        for var, port in settings.service_ports(service).items():
            if not port_is_free(port, HOST):
                holder = port_holder(port)
                busy.append(f"{HOST}:{port} ({var}, for {service}) is in use" + (f" by {holder}" if holder else ""))
    if busy:
        raise PortInUseError("; ".join(busy) + ". Stop that process or choose another port with the variable named.")


def _wait_ready(
    service: str, probe: Callable[[], bool], proc: subprocess.Popen | None, settings: StackSettings, log_file: Path
) -> None:
    """Poll ``probe`` until True; raise ServiceStartError if ``proc`` exits or the start timeout passes."""
    deadline = time.monotonic() + settings.start_timeout_s
    while time.monotonic() < deadline:
        if probe():
            return
        if proc is not None and proc.poll() is not None:
            raise ServiceStartError(
                f"{service} exited with status {proc.returncode} while starting (log: {log_file})",
                service=service, log_tail=log_tail(log_file),
            )  # fmt: skip
        time.sleep(POLL_S)
    raise ServiceStartError(
        f"{service} was not ready after {settings.start_timeout_s:.0f} s (log: {log_file})",
        service=service, log_tail=log_tail(log_file),
    )  # fmt: skip


def _spawn_and_wait(
    service: str, argv: list[str], env: dict[str, str], probe: Callable[[], bool], ctx: _Start
) -> ServiceRecord:
    settings = ctx.settings
    log_file = settings.log_file(service)
    try:
        proc, ref = spawn(argv, log_file=log_file, env=env, cwd=settings.home)
    except OSError as e:
        raise ServiceStartError(f"cannot run {argv[0]}: {e}", service=service) from e
    rec = _record(service, ref, settings, log_file)
    ctx.on_spawn(rec)
    _wait_ready(service, probe, proc, settings, log_file)
    rec.ready_at = time.time()
    return rec


def _record(
    service: str, ref: ProcessRef, settings: StackSettings, log_file: Path, ready: bool = False
) -> ServiceRecord:
    return ServiceRecord(
        pid=ref.pid, create_time=ref.create_time, address=settings.addresses()[service],
        metrics_url=settings.metrics_urls()[service], log=str(log_file), ports=settings.service_ports(service),
        ready_at=time.time() if ready else None,
    )  # fmt: skip


def _start_redis(ctx: _Start) -> ServiceRecord:
    settings = ctx.settings
    binary = shutil.which("redis-server")
    if binary is None:
        raise StackError("redis-server is not installed (Debian/Ubuntu: apt-get install -y redis-server)")
    settings.redis_dir.mkdir(parents=True, exist_ok=True)
    argv = redis_server_argv(
        binary, port=settings.redis_port, host=HOST, data_dir=settings.redis_dir, maxmemory=settings.redis_maxmemory
    )
    return _spawn_and_wait("redis", argv, dict(os.environ), lambda: health.redis_ready(settings.redis_url), ctx)


def _start_torchserve(ctx: _Start) -> ServiceRecord:
    settings = ctx.settings
    log_file = settings.log_file("torchserve")
    ts = torchserve(settings)
    try:
        ensure_archive(settings)
        ts.start({TORCHSERVE_MODEL: ARCHIVE})
        pid = _wait_for(lambda: ts.pid, 30.0)
        if pid is None:
            raise ServiceStartError(
                "TorchServe did not start its frontend", service="torchserve", log_tail=ts.log_tail()
            )
        rec = _record("torchserve", ProcessRef.of(pid), settings, log_file)
        rec.pgid = os.getpgid(pid)  # the launcher's group: launcher + Java frontend + model workers
        ctx.on_spawn(rec)
        ts.wait_ready(TORCHSERVE_MODEL, timeout=settings.start_timeout_s)
    except BaseException as e:
        ts.stop(timeout=settings.stop_grace_s)  # also when interrupted before its pid was recorded
        if isinstance(e, CxrError) and not isinstance(e, StackError):
            raise ServiceStartError(f"TorchServe did not start: {e.message}", service="torchserve") from e
        raise
    rec.ready_at = time.time()
    return rec


def _wait_for(get: Callable[[], int | None], timeout_s: float) -> int | None:
    deadline = time.monotonic() + timeout_s
    while (value := get()) is None and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return value


def _service_env(settings: StackSettings) -> dict[str, str]:
    """The environment of the ingestion service and the worker: the caller's, plus the stack's wiring."""
    return {
        **os.environ,
        "CXR_REDIS_URL": settings.redis_url,
        "CXR_MODEL_DIR": str(settings.model_dir),
        "MPLCONFIGDIR": str(settings.home / "matplotlib"),
        "PYTHONUNBUFFERED": "1",
    }


def _start_ingestion(ctx: _Start) -> ServiceRecord:
    settings = ctx.settings
    env = {
        **_service_env(settings),
        "CXR_INGESTION_ADDR": settings.ingestion_address,
        "CXR_INGESTION_METRICS_PORT": str(settings.ingestion_metrics_port),
        "CXR_TORCHSERVE_GRPC": settings.torchserve_grpc_address,
        "CXR_TORCHSERVE_MODEL": TORCHSERVE_MODEL,
        "CXR_TORCHSERVE_TOKEN_FILE": str(settings.token_file) if settings.token_file.is_file() else "",
    }
    argv = [sys.executable, "-m", "services.ingestion"]
    tls = ingestion_probe_tls()
    probe = lambda: health.grpc_serving(settings.ingestion_address, tls=tls)  # noqa: E731
    return _spawn_and_wait("ingestion", argv, env, probe, ctx)


def ingestion_probe_tls() -> ClientTLS | None:
    """The certificates the stack's probe needs for an ingestion service with TLS (``cxr.tls.stack_probe_tls``).
    Raises BadSettingError for unusable client TLS settings."""
    try:
        return stack_probe_tls()
    except TlsConfigError as e:
        raise BadSettingError(f"client TLS settings: {e}") from None


def _start_worker(ctx: _Start) -> ServiceRecord:
    settings = ctx.settings
    settings.worker_ready_file.parent.mkdir(parents=True, exist_ok=True)
    settings.worker_ready_file.unlink(missing_ok=True)
    env = {
        **_service_env(settings),
        "CXR_WORKER_METRICS_PORT": str(settings.worker_metrics_port),
        "CXR_WORKER_READY_FILE": str(settings.worker_ready_file),
    }
    argv = [sys.executable, "-m", "services.worker"]
    probe = lambda: health.file_exists(settings.worker_ready_file)  # noqa: E731
    return _spawn_and_wait("worker", argv, env, probe, ctx)


def _start_dicom(ctx: _Start) -> ServiceRecord:
    """The DICOM front door: forwards every instance to the ingestion API; ready once it answers a C-ECHO."""
    settings = ctx.settings
    settings.dicom_spool_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **_service_env(settings),
        "CXR_DICOM_ADDR": settings.dicom_address,
        "CXR_DICOM_METRICS_PORT": str(settings.dicom_metrics_port),
        "CXR_DICOM_AE_TITLE": settings.dicom_ae_title,
        "CXR_DICOM_INGESTION_ADDR": settings.ingestion_address,
        "CXR_DICOM_SPOOL_DIR": str(settings.dicom_spool_dir),
    }
    argv = [sys.executable, "-m", "services.dicom"]
    probe = lambda: dicom_echo(settings.dicom_address, settings.dicom_ae_title)  # noqa: E731
    return _spawn_and_wait("dicom", argv, env, probe, ctx)


_STARTERS: dict[str, Callable[[_Start], ServiceRecord]] = {
    "redis": _start_redis, "torchserve": _start_torchserve, "ingestion": _start_ingestion, "worker": _start_worker,
    "dicom": _start_dicom,
}  # fmt: skip


# -- readiness of a recorded service -----------------------------------------------------------------
def _still_ready(service: str, state: StackState, settings: StackSettings) -> bool:
    return state.services[service].ref.alive() and service_ready(service, settings)


def service_ready(service: str, settings: StackSettings) -> bool:
    """True if ``service`` answers its readiness probe now."""
    if service == "redis":
        return health.redis_ready(settings.redis_url)
    if service == "torchserve":
        return health.torchserve_model_ready(settings.ts_management_port, TORCHSERVE_MODEL, settings.token_file)
    if service == "ingestion":
        return health.grpc_serving(settings.ingestion_address, tls=ingestion_probe_tls())
    if service == "dicom":
        return dicom_echo(settings.dicom_address, settings.dicom_ae_title)
    return health.file_exists(settings.worker_ready_file)


# -- down --------------------------------------------------------------------------------------------
def down(settings: StackSettings, say: Say = log.info) -> list[str]:
    """Stop every recorded service in reverse start order (SIGTERM, grace period, SIGKILL; TorchServe through
    its own stop) and remove the state. Returns the services that were stopped; [] when nothing was up."""
    state = read_state(settings.state_file)
    if state is None:
        return []
    names = [name for name in reversed(SERVICES) if name in state.services]
    stopped = _stop_services(settings, state, names, say)
    remove_state(settings.state_file)
    settings.worker_ready_file.unlink(missing_ok=True)
    return stopped


def _stop_services(settings: StackSettings, state: StackState, names: list[str], say: Say) -> list[str]:
    """Stop ``names`` in the given order and forget them; returns those that were still running."""
    stopped = []
    for name in names:
        rec = state.services.pop(name, None)
        if rec is None or not (rec.ref.alive() or group_pids(rec.pgid or rec.pid)):
            continue
        say(f"stopping {name} ...")
        if name == "torchserve":
            _stop_torchserve(settings)
        if stop_process(rec.ref, settings.stop_grace_s, rec.pgid):
            say(f"{name} did not stop within {settings.stop_grace_s:.0f} s and was killed")
        stopped.append(name)
    return stopped


def _stop_torchserve(settings: StackSettings) -> None:
    """TorchServe's own stop (SIGTERM to the frontend, wait for its workers); the caller kills leftovers."""
    try:
        torchserve(settings).stop(timeout=settings.stop_grace_s)
    except Exception as e:  # noqa: BLE001 - stopping must go on; leftovers are killed by the caller
        log.warning("TorchServe stop failed: %s", e)


def _save_or_remove(settings: StackSettings, state: StackState) -> None:
    if state.services:
        write_state(settings.state_file, state)
    else:
        remove_state(settings.state_file)
