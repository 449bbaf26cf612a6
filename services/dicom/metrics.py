"""Prometheus metrics of the DICOM front door, declared once per server in its own registry.

Labels are fixed and low-cardinality (``outcome``, ``reason``, ``side``): never an AE title of a peer (a free
text a PACS chooses), a UID or anything else that identifies a study, series or patient.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cxr.metrics_endpoint import MetricsEndpoint

# Seconds; from a cached answer (~10 ms) to a slow CPU analysis of a large instance.
STORE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Seconds from an instance's arrival to its results being stored at the destination (explanation included).
DELIVERY_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0)


class DicomMetrics:
    """The front door's metrics. ``registry`` is private to this object so several servers can share a process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.associations = Counter(
            "cxr_dicom_associations", "Association requests by outcome (accepted, rejected)", ["outcome"], registry=r
        )
        self.active_associations = Gauge("cxr_dicom_active_associations", "Associations open now", registry=r)
        self.instances = Counter(
            "cxr_dicom_instances",
            "C-STORE requests answered, by outcome (success, retry = refused for now, rejected = permanent, error)",
            ["outcome"],
            registry=r,
        )
        self.rejections = Counter(
            "cxr_dicom_rejections", "C-STORE requests refused, by machine-readable reason", ["reason"], registry=r
        )
        self.received_bytes = Counter("cxr_dicom_received_bytes", "Bytes of instances received", registry=r)
        self.store_seconds = Histogram(
            "cxr_dicom_store_seconds", "Time to answer one C-STORE (analysis included)", buckets=STORE_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("cxr_dicom_in_flight", "Instances being analysed now", registry=r)
        self.deliveries = Counter(
            "cxr_dicom_deliveries",
            "Result deliveries by outcome (sent, retry, dead = given up, see the dead-letter list)",
            ["outcome"],
            registry=r,
        )
        self.sent_instances = Counter("cxr_dicom_sent_instances", "Result instances stored at the destination",
                                      registry=r)  # fmt: skip
        self.outbox_pending = Gauge("cxr_dicom_outbox_pending", "Deliveries waiting in the outbox", registry=r)
        self.outbox_dead = Gauge("cxr_dicom_outbox_dead", "Deliveries given up (dead-letter list)", registry=r)
        self.delivery_seconds = Histogram(
            "cxr_dicom_delivery_seconds", "From an instance's arrival to its results stored at the destination",
            buckets=DELIVERY_BUCKETS, registry=r,
        )  # fmt: skip
        self._endpoint = MetricsEndpoint(self.registry)

    def record_store(self, outcome: str, reason: str | None, seconds: float) -> None:
        """Count one answered C-STORE and its time; a refusal also counts under its reason."""
        self.instances.labels(outcome=outcome).inc()
        if reason:
            self.rejections.labels(reason=reason).inc()
        self.store_seconds.observe(seconds)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint on ``host:port`` (port 0 = a free port). Returns the bound port."""
        return self._endpoint.serve(host, port)

    def close(self) -> None:
        """Stop the HTTP endpoint, if it was started."""
        self._endpoint.close()
