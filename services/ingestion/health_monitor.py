"""Health that tells the truth: the standard gRPC health status follows the dependencies while the service runs.

Every ``interval_s`` a daemon thread per dependency runs its check (Redis accepts a write; the served model answers
a prediction) and sets the health statuses:

* ``""`` and ``cxr.ingestion.v1.IngestionService``: SERVING only when every dependency answered its last check;
* ``dependency/<name>`` (``dependency/redis``, ``dependency/torchserve``): each dependency on its own, so that
  ``cxr status`` and an operator can see which one is down.

A dependency that stops answering turns the service NOT_SERVING within one period plus the duration of the
failing check (each check is bounded: Redis by its socket timeout, TorchServe by ``CXR_HEALTH_TIMEOUT_S``); it
turns SERVING again at the first check that passes. The gauge ``cxr_ingestion_dependency_up{dependency}`` shows
the same, for alerts. Problems are logged when they change (never with patient data: checks carry none).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from grpc_health.v1 import health, health_pb2
from prometheus_client import CollectorRegistry, Gauge

from cxr.core.errors import CxrError

logger = logging.getLogger(__name__)

DEPENDENCY_PREFIX = "dependency/"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class DependencyCheck:
    """A named check that returns when the dependency works and raises CxrError (with the reason) when not."""

    name: str
    check: Callable[[], None]


def dependency_service(name: str) -> str:
    """The health service name under which dependency ``name`` is reported: ``dependency/<name>``."""
    return DEPENDENCY_PREFIX + name


class HealthMonitor:
    """Keeps ``health`` (a grpc HealthServicer) in line with ``checks``; ``services`` are the names that carry
    the overall status. Call ``check_now`` once, then ``start``; ``stop`` ends the thread."""

    def __init__(
        self,
        health_servicer: health.HealthServicer,
        checks: Sequence[DependencyCheck],
        *,
        services: Sequence[str],
        interval_s: float,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._health = health_servicer
        self._checks = tuple(checks)
        self._services = tuple(services)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._problems: dict[str, str | None] = {}
        self._gauge = Gauge(
            "cxr_ingestion_dependency_up",
            "1 when the dependency answered the service's last health check, else 0",
            ["dependency"],
            registry=registry,
        )

    @property
    def problems(self) -> dict[str, str]:
        """The failing dependencies of the last check and why: {name: "REASON: message"}."""
        return {name: p for name, p in list(self._problems.items()) if p is not None}

    def check_now(self) -> dict[str, str]:
        """Run every check once, publish the statuses; return the problems (empty when all answered)."""
        for check in self._checks:
            self._publish(check.name, _run(check))
        return self.problems

    def _publish(self, name: str, problem: str | None) -> None:
        """Record one dependency's result and publish it and the overall status (thread-safe)."""
        with self._lock:
            previous = self._problems.get(name)
            if problem is not None and problem != previous:
                logger.warning("dependency %s is down: %s", name, problem)
            elif problem is None and previous is not None:
                logger.info("dependency %s answers again", name)
            self._problems[name] = problem
            self._health.set(dependency_service(name), NOT_SERVING if problem else SERVING)
            self._gauge.labels(dependency=name).set(0 if problem else 1)
            overall = NOT_SERVING if self.problems else SERVING
            for service in self._services:
                self._health.set(service, overall)

    def mark_not_serving(self) -> None:
        """Publish NOT_SERVING for the service and every dependency (before the first check)."""
        for check in self._checks:
            self._health.set(dependency_service(check.name), NOT_SERVING)
        for service in self._services:
            self._health.set(service, NOT_SERVING)

    def start(self) -> None:
        """Check every dependency every ``interval_s``, each in its own daemon thread (a slow TorchServe probe
        never delays noticing that Redis is down), until ``stop``."""
        if self._threads:
            return
        for check in self._checks:
            thread = threading.Thread(target=self._loop, args=(check,), name=f"health-{check.name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """End the checks (waits for checks in progress, which are bounded)."""
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self._threads = []

    def _loop(self, check: DependencyCheck) -> None:
        while not self._stop.wait(self._interval_s):
            self._publish(check.name, _run(check))


def _run(check: DependencyCheck) -> str | None:
    """None when the check passes, else its problem as text."""
    try:
        check.check()
    except CxrError as e:
        return str(e)
    except Exception as e:  # an unexpected failure of a check means "not healthy" (a bug: logged)
        logger.exception("health check of %s failed unexpectedly", check.name)
        return f"CHECK_FAILED: {type(e).__name__}"
    return None
