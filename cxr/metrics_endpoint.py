"""``MetricsEndpoint``: a service's Prometheus ``/metrics`` HTTP endpoint (prometheus-client's own server), started
and stopped with the service. Shared by the ingestion service and the DICOM front door."""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

logger = logging.getLogger(__name__)


class MetricsEndpoint:
    """Serves one registry over HTTP in a daemon thread."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, host: str, port: int) -> int:
        """Start the endpoint on ``host:port`` (port 0 = a free port). Returns the bound port."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._http.server_address[1])
        logger.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        """Stop the endpoint, if it was started (idempotent)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
