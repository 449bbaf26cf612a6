"""Prometheus metrics of the explanation worker, declared once.

The worker is a prefork pool: tasks run in child processes, so the metrics use prometheus-client's multiprocess
mode. ``python -m services.worker`` sets ``PROMETHEUS_MULTIPROC_DIR`` (a fresh folder) BEFORE this module, or
anything else importing prometheus_client, is imported; the parent serves what every child wrote.

Labels are fixed and low-cardinality: ``outcome`` (done, failed, retry, noop), ``reason`` (a stable error code),
``model`` and ``version`` of the ensemble. Never a job id, never anything about a patient.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import REGISTRY, Collector

log = logging.getLogger(__name__)

OUTCOMES = ("done", "failed", "retry", "noop")
_SECONDS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 180.0, 300.0)

TASKS = Counter("cxr_worker_tasks_total", "Explanation tasks finished, by outcome", ["outcome"])
FAILURES = Counter("cxr_worker_job_failures_total", "Jobs marked failed, by reason code", ["reason"])
TASK_DURATION = Histogram(
    "cxr_worker_task_duration_seconds", "Wall time of one explanation task, by outcome", ["outcome"], buckets=_SECONDS
)
QUEUE_WAIT = Histogram(
    "cxr_worker_queue_wait_seconds", "From the job's creation to the start of its first attempt", buckets=_SECONDS
)
IN_FLIGHT = Gauge("cxr_worker_tasks_in_flight", "Explanation tasks running now", multiprocess_mode="livesum")
MODEL_INFO = Gauge(
    "cxr_worker_model_info",
    "The ensemble this worker explains (value 1)",
    ["model", "version"],
    multiprocess_mode="max",
)

for _outcome in OUTCOMES:
    TASKS.labels(outcome=_outcome)

_PID_IN_NAME = re.compile(r"_(\d+)\.db$")


def record_outcome(outcome: str, seconds: float, reason: str | None = None) -> None:
    """Count one finished task; ``reason`` (a stable error code) only for failures."""
    TASKS.labels(outcome=outcome).inc()
    TASK_DURATION.labels(outcome=outcome).observe(seconds)
    if reason is not None:
        FAILURES.labels(reason=reason).inc()


def live_gauge_pids(path: str) -> set[int]:
    """Process ids that have live-gauge files in a multiprocess folder."""
    pids = set()
    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        if m := _PID_IN_NAME.search(name):
            pids.add(int(m.group(1)))
    return pids


def prune_dead_processes(path: str) -> list[int]:
    """Drop the live-gauge files of processes that no longer exist (e.g. a SIGKILLed pool child)."""
    dead = [pid for pid in live_gauge_pids(path) if not _pid_alive(pid)]
    for pid in dead:
        mark_process_dead(pid, path)
    return dead


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LiveMultiProcessCollector(Collector):
    """MultiProcessCollector that first forgets processes that died without saying so."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._inner = MultiProcessCollector(None, path=path)

    def collect(self) -> Iterable[Any]:
        prune_dead_processes(self._path)
        return self._inner.collect()


def metrics_registry() -> CollectorRegistry:
    """The registry to serve: all processes' files in multiprocess mode, else this process's default one."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return REGISTRY
    registry = CollectorRegistry()
    registry.register(LiveMultiProcessCollector(path))
    return registry


def start_metrics_server(host: str, port: int) -> Any:
    """Serve /metrics on host:port in a daemon thread; returns the server (``.shutdown()``) or None if port 0."""
    if port == 0:
        return None
    server, _thread = start_http_server(port, addr=host, registry=metrics_registry())
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server
