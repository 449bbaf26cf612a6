"""Prometheus metrics of the ingestion service, declared once per server in its own registry.

Labels are fixed and low-cardinality (``rpc``, ``outcome``, ``reason``, ``stage``, ``name``/``version`` of the
model). Never a UID or any other identifier of a study, series or patient.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

logger = logging.getLogger(__name__)

STAGES = ("receive", "decode", "cache", "preprocess", "inference", "store", "total")
# Seconds; from a cache hit on a tiny image (~1 ms) to a slow CPU ensemble forward (~10 s).
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class IngestionMetrics:
    """The service's metrics. ``registry`` is private to this object so several servers can share a process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cxr_ingestion_requests", "Finished RPCs by method and gRPC status", ["rpc", "outcome"], registry=r
        )
        self.rejections = Counter(
            "cxr_ingestion_rejections",
            "RPCs answered with an error, by machine-readable reason",
            ["reason"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "cxr_ingestion_stage_seconds", "Analyze latency per stage", ["stage"], buckets=STAGE_BUCKETS, registry=r
        )
        self.in_flight = Gauge("cxr_ingestion_in_flight", "Analyze calls being processed now", registry=r)
        self.cache_hits = Counter(
            "cxr_ingestion_cache_hits", "Analyze calls answered from the result store", registry=r
        )
        self.inference_retries = Counter(
            "cxr_ingestion_inference_retries",
            "Inference attempts repeated because TorchServe was unavailable",
            registry=r,
        )
        self.model = Info("cxr_ingestion_model", "The ensemble this service analyses with", registry=r)
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    def set_model(self, name: str, version: str) -> None:
        """Publish the served ensemble's name and version (one series)."""
        self.model.info({"name": name, "version": version})

    def record_outcome(self, rpc: str, code: grpc.StatusCode, reason: str | None) -> None:
        """Count one finished RPC; an error also counts as a rejection under its reason."""
        self.requests.labels(rpc=rpc, outcome=code.name.lower()).inc()
        if reason is not None:
            self.rejections.labels(reason=reason).inc()

    def observe_stages(self, timings_ms: Mapping[str, float]) -> None:
        """Record the per-stage timings of one Analyze call (milliseconds in, seconds stored)."""
        for stage, ms in timings_ms.items():
            if stage in STAGES:
                self.stage_seconds.labels(stage=stage).observe(ms / 1000.0)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint on ``host:port`` (port 0 = a free port). Returns the bound port."""
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._http.server_address[1])
        logger.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        """Stop the HTTP endpoint, if it was started."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
