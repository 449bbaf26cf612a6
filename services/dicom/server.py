"""Assembles and runs the DICOM front door: a pynetdicom Storage SCP (every storage SOP class, every transfer
syntax, Verification), the calling-AE allow-list, bounded associations and timeouts, metrics, the results
outbox and its delivery loop, readiness (Redis answers, the ingestion API is SERVING) and graceful shutdown.

Incoming datasets are written to a file as their P-DATA arrives (pynetdicom's ``STORE_RECV_CHUNKED_DATASET``), so
a large instance costs disk, not memory, and its size is checked before a byte of it is read back.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from cxr.client import IngestionClient
from cxr.core.errors import CxrError, DependencyUnavailableError
from cxr.shutdown import stop_on_signals
from cxr.stack.health import grpc_serving
from cxr.tls import ClientTLS, TlsConfigError, stack_probe_tls
from services.dicom.delivery import DeliveryLoop
from services.dicom.gateway import InstanceGateway
from services.dicom.metrics import DicomMetrics
from services.dicom.outbox import Outbox
from services.dicom.settings import DicomSettings

logger = logging.getLogger(__name__)

MAX_PDU_BYTES = 256 * 1024  # what we accept per PDU: large instances arrive in few reads
READY_POLL_S = 0.5


def build_ae(settings: DicomSettings) -> AE:
    """The SCP's application entity: contexts, allow-list, association bound and timeouts."""
    ae = AE(ae_title=settings.ae_title)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    ae.require_called_aet = False  # a peer may call us by any title (storescu's default is ANY-SCP)
    ae.require_calling_aet = [] if settings.any_calling_ae else list(settings.allowed_aets)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = MAX_PDU_BYTES
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.network_timeout = settings.network_timeout_s
    return ae


class DicomServer:
    """The front door on one port. ``start`` binds and serves; ``wait_ready`` waits (bounded) for Redis and the
    ingestion API; ``stop`` refuses new associations, lets running ones finish (grace period), stops delivery."""

    def __init__(self, settings: DicomSettings, tls: ClientTLS | None = None) -> None:
        self.settings = settings
        self.tls = tls
        self.metrics = DicomMetrics()
        self.client = IngestionClient(settings.ingestion_addr, timeout_s=settings.analyze_timeout_s, tls=tls)
        self.outbox = Outbox.from_url(settings.redis_url, ttl_s=settings.delivery_ttl_s,
                                      max_pending=settings.outbox_max)  # fmt: skip
        with_results = settings.destination is not None
        self.gateway = InstanceGateway(settings, self.client, self.outbox if with_results else None, self.metrics)
        self.delivery = DeliveryLoop(self.outbox, settings, self.metrics) if with_results else None
        self.ae = build_ae(settings)
        self._server: ThreadedAssociationServer | None = None
        self._tempdir: str | None = tempfile.tempdir
        self.port: int | None = None
        self.metrics_port: int | None = None

    def start(self) -> int:
        """Bind and serve associations; start the metrics endpoint and the delivery loop. Returns the port."""
        _config.STORE_RECV_CHUNKED_DATASET = True  # process-wide pynetdicom switch; only servers set it
        _config.LOG_HANDLER_LEVEL = "none"  # pynetdicom's own event logs would name SOP instances
        self._tempdir = tempfile.tempdir
        if self.settings.spool_dir is not None:
            tempfile.tempdir = str(self.settings.spool_dir)  # where pynetdicom writes incoming datasets
        handlers: list[EventHandlerType] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, _on_echo),
            (evt.EVT_ACCEPTED, self._on_association, ["accepted"]),
            (evt.EVT_REJECTED, self._on_association, ["rejected"]),
        ]
        server = self.ae.start_server((self.settings.host, self.settings.port), block=False, evt_handlers=handlers)
        assert server is not None  # block=False returns the running server
        self._server = server
        self.port = int(server.server_address[1])
        self.metrics.active_associations.set_function(lambda: len(server.active_associations))
        if self.settings.metrics_port:
            self.metrics_port = self.metrics.serve(self.settings.metrics_host, self.settings.metrics_port)
        if self.delivery is not None:
            self.delivery.start()
        logger.info(
            "DICOM Storage SCP %s on %s:%d; calling AE titles: %s; results to %s", self.settings.ae_title,
            self.settings.host, self.port, ", ".join(self.settings.allowed_aets), self.settings.destination or "-",
        )  # fmt: skip
        return self.port

    def _on_store(self, event: Event) -> Dataset:
        calling = event.assoc.requestor.ae_title
        return self.gateway.store(event.dataset_path, calling).as_dataset()

    def _on_association(self, event: Event, outcome: str) -> None:
        self.metrics.associations.labels(outcome=outcome).inc()

    def wait_ready(self, timeout_s: float, stop: threading.Event | None = None) -> None:
        """Wait until Redis answers and the ingestion API is SERVING. Raises DependencyUnavailableError."""
        deadline = time.monotonic() + timeout_s
        while (problem := self._readiness_problem()) is not None:
            if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                raise DependencyUnavailableError(f"not ready after {timeout_s:g} s: {problem}")
            logger.info("waiting for dependencies: %s", problem)
            time.sleep(READY_POLL_S)
        logger.info("ready: Redis answers and the ingestion API at %s is serving", self.settings.ingestion_addr)

    def _readiness_problem(self) -> str | None:
        try:
            self.outbox.ping()
        except CxrError as e:
            return str(e)
        if not grpc_serving(self.settings.ingestion_addr, tls=self.tls):
            return f"the ingestion API at {self.settings.ingestion_addr} is not serving"
        return None

    def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, give open associations the grace period, stop the delivery loop, release all."""
        grace = self.settings.grace_s if grace_s is None else grace_s
        if self._server is not None:
            self._server.shutdown()  # no new connections; open associations go on in their own threads
            deadline = time.monotonic() + grace
            while self._server.active_associations and time.monotonic() < deadline:
                time.sleep(0.1)
            for assoc in self._server.active_associations:
                assoc.abort()
        if self.delivery is not None:
            self.delivery.stop(grace)
        tempfile.tempdir = self._tempdir
        self.metrics.close()
        self.client.close()
        self.outbox.close()
        logger.info("DICOM front door stopped")


def _on_echo(event: Event) -> int:
    return 0x0000


def ingestion_tls() -> ClientTLS | None:
    """How to reach a TLS ingestion API: the local stack's self-signed setup (``CXR_TLS_CERT``), else the
    ``CXR_TLS_CA`` / ``CXR_TLS_CLIENT_*`` client settings; None = plaintext. Raises TlsConfigError."""
    return stack_probe_tls() or ClientTLS.from_values()


def serve(settings: DicomSettings) -> int:
    """Run until SIGTERM/SIGINT; 0 after a graceful stop, 1 when dependencies never became ready, 2 for unusable
    TLS settings."""
    try:
        tls = ingestion_tls()
    except TlsConfigError as e:
        logger.error("client TLS settings: %s", e)
        return 2
    stop = stop_on_signals(settings.grace_s)
    server = DicomServer(settings, tls)
    try:
        server.wait_ready(settings.startup_wait_s, stop)
    except DependencyUnavailableError as e:
        logger.error("%s", e)
        server.stop(0)
        return 1
    server.start()  # listen only once ready: a C-ECHO that succeeds means the door is open
    stop.wait()
    server.stop()
    return 0
