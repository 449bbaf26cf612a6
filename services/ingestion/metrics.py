"""Prometheus metrics of the ingestion service, declared once per server in its own registry.

Labels are fixed and low-cardinality (``rpc``, ``outcome``, ``reason``, ``stage``, ``name``/``version`` of the
model, ``label``: a finding name of the served manifest). Never a UID or any other identifier of a study, series or
patient.

What the model decided is recorded for monitoring drift, for every image the model analysed (cache hits are not
counted again): ``cxr_ingestion_analysed_images_total``, ``cxr_ingestion_positive_findings_total{label}`` (their
ratio is the prevalence of each predicted finding) and ``cxr_ingestion_vote_fraction{label}`` (histogram of
votes / n_models: 0 and 1 are unanimous decisions). ``cxr_ingestion_explain_queue_length`` is read from Redis at
each scrape (LLEN of the Celery queue), so the queue depth is visible even when no worker runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Protocol

import grpc
import redis
import redis.exceptions
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cxr.metrics_endpoint import MetricsEndpoint

logger = logging.getLogger(__name__)

STAGES = ("receive", "decode", "cache", "preprocess", "inference", "store", "total")
# Seconds; from a cache hit on a tiny image (~1 ms) to a slow CPU ensemble forward (~10 s).
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# votes / n_models: tenths separate every fraction of an ensemble of up to 5 models (1/3 -> 0.4, 2/3 -> 0.7)
VOTE_FRACTION_BUCKETS = tuple(i / 10 for i in range(11))
QUEUE_PROBE_TIMEOUT_S = 1.0


class DecidedFinding(Protocol):
    """What the metrics need of one finding (``cxr.ingestion.v1.Finding`` has it)."""

    label: str
    votes: int
    n_models: int
    positive: bool


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
        self.analysed_images = Counter(
            "cxr_ingestion_analysed_images", "Images analysed by the model (cache hits not counted)", registry=r
        )
        self.positive_findings = Counter(
            "cxr_ingestion_positive_findings",
            "Positive decisions of the ensemble, by finding (divide by analysed images: prevalence)",
            ["label"],
            registry=r,
        )
        self.vote_fraction = Histogram(
            "cxr_ingestion_vote_fraction",
            "Share of the ensemble's models voting for the finding (votes / n_models), by finding",
            ["label"],
            buckets=VOTE_FRACTION_BUCKETS,
            registry=r,
        )
        self._queue_probe: QueueLengthCollector | None = None
        self._endpoint = MetricsEndpoint(self.registry)

    def set_model(self, name: str, version: str, labels: Sequence[str] = ()) -> None:
        """Publish the served ensemble's name and version (one series) and create the per-finding series of its
        ``labels`` at zero, so that a finding never predicted still has a prevalence (0) and nothing is absent."""
        self.model.info({"name": name, "version": version})
        for label in labels:
            self.positive_findings.labels(label=label)
            self.vote_fraction.labels(label=label)

    def observe_findings(self, findings: Iterable[DecidedFinding]) -> None:
        """Record the decisions of one image the model analysed: one image, its positives, each vote fraction."""
        self.analysed_images.inc()
        for f in findings:
            self.vote_fraction.labels(label=f.label).observe(f.votes / f.n_models if f.n_models else 0.0)
            if f.positive:
                self.positive_findings.labels(label=f.label).inc()

    def watch_queue(self, redis_url: str, queue: str) -> None:
        """Export the length of the Redis list ``queue`` (the Celery queue), read at each scrape."""
        self._queue_probe = QueueLengthCollector(redis_url, queue)
        self.registry.register(self._queue_probe)

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
        return self._endpoint.serve(host, port)

    def close(self) -> None:
        """Stop the HTTP endpoint, if it was started, and the queue probe's Redis connections."""
        self._endpoint.close()
        if self._queue_probe is not None:
            self.registry.unregister(self._queue_probe)
            self._queue_probe.close()
            self._queue_probe = None


class QueueLengthCollector(Collector):
    """``cxr_ingestion_explain_queue_length``: LLEN of the queue's Redis list at scrape time. When Redis does not
    answer (within ``QUEUE_PROBE_TIMEOUT_S``) the sample is left out: an unknown length is not zero."""

    def __init__(self, redis_url: str, queue: str) -> None:
        self._queue = queue
        self._client = redis.Redis.from_url(
            redis_url, socket_timeout=QUEUE_PROBE_TIMEOUT_S, socket_connect_timeout=QUEUE_PROBE_TIMEOUT_S
        )

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "cxr_ingestion_explain_queue_length",
            "Explanation jobs waiting in the Celery queue (Redis list), read at scrape time",
            labels=["queue"],
        )
        try:
            family.add_metric([self._queue], float(self._client.llen(self._queue)))  # type: ignore[arg-type]
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            logger.debug("queue length unknown: %s", type(e).__name__)
        yield family

    def close(self) -> None:
        """Release the Redis connections."""
        self._client.close()
