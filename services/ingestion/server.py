"""Assembles and runs the ingestion gRPC server: servicer + standard health + reflection, the error
interceptor, metrics, TLS / mutual TLS when configured, readiness (Redis accepts writes and the served model
predicts) and then a health monitor that keeps health true while the service runs, graceful shutdown."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cxr.core.errors import DependencyUnavailableError
from cxr.core.manifest import Manifest, read_manifest
from cxr.cpu_allocator import keep_freed_memory
from cxr.ingestion.v1 import ingestion_pb2, ingestion_pb2_grpc
from cxr.shutdown import stop_on_signals
from services.ingestion.dependencies import ModelProbe, dependency_checks
from services.ingestion.errors import ErrorInterceptor
from services.ingestion.explanation_view import ExplanationView
from services.ingestion.health_monitor import HealthMonitor
from services.ingestion.inference_client import TorchServeClient
from services.ingestion.metrics import IngestionMetrics
from services.ingestion.pipeline import AnalyzePipeline
from services.ingestion.result_store import ResultStore
from services.ingestion.servicer import IngestionServicer
from services.ingestion.settings import IngestionSettings
from services.ingestion.task_queue import QUEUE, ExplanationQueue
from services.ingestion.tls import describe, server_credentials

logger = logging.getLogger(__name__)

SERVICE_NAME = ingestion_pb2.DESCRIPTOR.services_by_name["IngestionService"].full_name
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # chunks are at most 1 MiB by contract; leave room, refuse the absurd
MAX_SEND_BYTES = 256 * 1024 * 1024  # rendered explanations: two PNGs per label (cxr.client accepts as much)
EXTRA_WORKERS = 8  # threads beyond Analyze's: GetExplanation and refusing surplus calls quickly
MAX_WATCHES = 16
READY_POLL_S = 0.5


class IngestionServer:
    """The ingestion service on one port. ``start`` binds and serves (health NOT_SERVING); ``wait_ready``
    flips health to SERVING once dependencies answer; ``stop`` shuts down gracefully."""

    def __init__(self, settings: IngestionSettings, manifest: Manifest | None = None) -> None:
        self.settings = settings
        self.manifest = manifest or read_manifest(settings.model_dir)
        self.metrics = IngestionMetrics()
        self.metrics.set_model(self.manifest.name, self.manifest.version, self.manifest.labels)
        self.metrics.watch_queue(settings.redis_url, QUEUE)
        self.store = ResultStore.from_url(settings.redis_url, settings.result_ttl_s, dicom_ttl_s=settings.dicom_ttl_s)
        self.queue = ExplanationQueue(settings.redis_url)
        self.inference = TorchServeClient(
            settings.torchserve_grpc,
            settings.torchserve_model,
            timeout_s=settings.inference_timeout_s,
            retries=settings.inference_retries,
            token_file=settings.torchserve_token_file,
            on_retry=self.metrics.inference_retries.inc,
        )
        self.view = ExplanationView(self.store, watch_max_s=settings.watch_max_s)
        self.health = health.HealthServicer()
        probe = ModelProbe(
            self.inference, self.manifest, fresh_s=settings.health_interval_s, timeout_s=settings.health_timeout_s
        )
        self.monitor = HealthMonitor(
            self.health,
            dependency_checks(self.store, probe),
            services=("", SERVICE_NAME),
            interval_s=settings.health_interval_s,
            registry=self.metrics.registry,
        )
        self._server = self._build_grpc_server()
        self.port: int | None = None
        self.metrics_port: int | None = None

    def _build_grpc_server(self) -> grpc.Server:
        s = self.settings
        self.pipeline = pipeline = AnalyzePipeline(
            manifest=self.manifest,
            inference=self.inference,
            store=self.store,
            queue=self.queue,
            metrics=self.metrics,
            max_upload_bytes=s.max_upload_bytes,
            max_concurrent=s.max_concurrent,
            lateral_policy=s.lateral_policy,
        )
        workers = s.max_concurrent + MAX_WATCHES + EXTRA_WORKERS
        server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingestion"),
            interceptors=[ErrorInterceptor(self.metrics.record_outcome)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ],
            maximum_concurrent_rpcs=workers,  # beyond this gRPC refuses at once: nothing queues unboundedly
        )
        servicer = IngestionServicer(pipeline, self.view, max_watches=MAX_WATCHES, upload_idle_s=s.upload_idle_s)
        ingestion_pb2_grpc.add_IngestionServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        return server

    def start(self) -> int:
        """Bind (TLS when configured), serve (health NOT_SERVING) and start the metrics endpoint. Returns the
        bound gRPC port."""
        self.monitor.mark_not_serving()
        credentials = server_credentials(self.settings)
        if credentials is None:
            self.port = self._server.add_insecure_port(self.settings.addr)
        else:
            self.port = self._server.add_secure_port(self.settings.addr, credentials)
        if self.port == 0:
            raise OSError(f"cannot bind {self.settings.addr}")
        self._server.start()
        if self.settings.metrics_port:
            self.metrics_port = self.metrics.serve(self.settings.metrics_host, self.settings.metrics_port)
        logger.info("ingestion gRPC on %s (port %d, %s)", self.settings.addr, self.port, describe(self.settings))
        return self.port

    def wait_ready(self, timeout_s: float, stop: threading.Event | None = None) -> None:
        """Wait (bounded) until Redis accepts writes and the served model predicts a blank image with the
        expected name, version and labels; then health is SERVING and the health monitor keeps it true from
        then on. Raises DependencyUnavailableError on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            problems = self.monitor.check_now()
            if not problems:
                self.monitor.start()
                logger.info("ready: Redis answers and %s %s is served", self.manifest.name, self.manifest.version)
                return
            problem = "; ".join(f"{name}: {text}" for name, text in problems.items())
            if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                raise DependencyUnavailableError(f"not ready after {timeout_s:g} s: {problem}")
            logger.info("waiting for dependencies: %s", problem)
            time.sleep(READY_POLL_S)

    def stop(self, grace_s: float | None = None) -> None:
        """Refuse new calls, end watches, let running calls finish within the grace period, release all."""
        self.monitor.stop()
        self.health.enter_graceful_shutdown()
        self.view.stop.set()
        self._server.stop(self.settings.grace_s if grace_s is None else grace_s).wait()
        self.metrics.close()
        self.inference.close()
        self.queue.close()
        self.store.close()
        logger.info("ingestion stopped")


def serve(settings: IngestionSettings) -> int:
    """Run until SIGTERM/SIGINT; 0 after a graceful stop, 1 when dependencies never became ready."""
    # decoding allocates several MB per upload: keep it mapped (cxr.cpu_allocator), in 2 arenas shared by the gRPC
    # threads (one per thread kept 600-840 MiB after a 5-minute load run)
    keep_freed_memory(max_arenas=2)
    stop = stop_on_signals(settings.grace_s)
    server = IngestionServer(settings)
    server.start()
    try:
        server.wait_ready(settings.startup_wait_s, stop)
    except DependencyUnavailableError as e:
        logger.error("%s", e)
        server.stop(0)
        return 1
    stop.wait()
    server.stop()
    return 0
