"""One received instance -> the gRPC API's Analyze -> a C-STORE status (and, with a destination, a delivery).

The front door does not analyse anything itself: every instance goes through the ingestion service's Analyze
(``services.ingestion.pipeline``), exactly as a gRPC client's upload does, so both doors share one pipeline, one
result cache, one concurrency budget in front of TorchServe and one set of rejection reasons. Here only the
DICOM side is decided: the size cap before anything is read, a bounded wait for capacity, the mapping of the
API's answer to a C-STORE status (``services.dicom.statuses``), and queuing the results delivery.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian

from cxr.client import ClientError, IngestionClient
from cxr.core.dicom_read import BAD_CONTENT_ERRORS, brief
from cxr.core.errors import CxrError, InvalidInputError
from cxr.dicom_results import source_header
from cxr.ingestion.v1 import ingestion_pb2 as pb
from services.dicom import statuses
from services.dicom.metrics import DicomMetrics
from services.dicom.outbox import Outbox, StoreUnavailableError
from services.dicom.settings import DicomSettings
from services.dicom.statuses import StoreOutcome

logger = logging.getLogger(__name__)

OVERLOAD_BACKOFF_S = (0.1, 0.2, 0.4, 0.8, 1.6)  # then 1.6 s until the wait budget is spent


class InstanceGateway:
    """Answers C-STOREs. Thread-safe: pynetdicom calls ``store`` from one thread per association."""

    def __init__(
        self, settings: DicomSettings, client: IngestionClient, outbox: Outbox | None, metrics: DicomMetrics
    ) -> None:
        self._settings = settings
        self._client = client
        self._outbox = outbox
        self._metrics = metrics
        self._slots = threading.BoundedSemaphore(settings.max_concurrent)

    def store(self, path: Path, calling_aet: str) -> StoreOutcome:
        """Analyse the instance written at ``path`` (Part 10, as received) for ``calling_aet``. Never raises."""
        t0 = time.monotonic()
        try:
            outcome = self._store(path, calling_aet)
        except Exception:  # the peer always gets a status; the traceback is logged
            logger.exception("C-STORE failed with an internal error")
            outcome = statuses.refused(statuses.PROCESSING_FAILURE, "INTERNAL", "internal error; see the cxr logs")
        self._metrics.record_store(_outcome_label(outcome), outcome.reason or None, time.monotonic() - t0)
        if not outcome.ok:
            logger.info("C-STORE from %s refused: 0x%04X %s", _printable(calling_aet), outcome.status, outcome.reason)
        return outcome

    def _store(self, path: Path, calling_aet: str) -> StoreOutcome:
        size = path.stat().st_size
        self._metrics.received_bytes.inc(size)
        if size > self._settings.max_upload_bytes:
            message = f"instance of {size} bytes exceeds the limit of {self._settings.max_upload_bytes}"
            return statuses.refused(statuses.TOO_LARGE, "TOO_LARGE", message)
        if not self._slots.acquire(timeout=self._settings.overload_wait_s):
            message = f"{self._settings.max_concurrent} instances are being analysed; retry later"
            return statuses.refused(statuses.OUT_OF_RESOURCES, "OVERLOADED", message)
        self._metrics.in_flight.inc()
        try:
            return self._analyse(path.read_bytes(), calling_aet)
        finally:
            self._metrics.in_flight.dec()
            self._slots.release()

    def _analyse(self, data: bytes, calling_aet: str) -> StoreOutcome:
        try:
            if self._outbox is not None:
                self._outbox.check_room()
            response = self._analyze_with_backoff(data, calling_aet)
            if self._outbox is not None:
                self._queue_delivery(data, response)
        except ClientError as e:
            return statuses.outcome_for_api_error(e.code, e.reason, e.message)
        except CxrError as e:  # outbox full, Redis down, or a source whose results could not reference it
            return statuses.outcome_for_error(e)
        return statuses.SUCCEEDED

    def _analyze_with_backoff(self, data: bytes, calling_aet: str) -> pb.AnalyzeResponse:
        """Analyze; OVERLOADED answers are retried with backoff within ``overload_wait_s``."""
        deadline = time.monotonic() + self._settings.overload_wait_s
        for attempt in range(1000):
            try:
                return self._client.analyze(
                    data,
                    client_name=f"dicom:{_printable(calling_aet)}",
                    skip_explanation=self._outbox is None,  # nobody would fetch it
                    timeout_s=self._settings.analyze_timeout_s,
                )
            except ClientError as e:
                pause = OVERLOAD_BACKOFF_S[min(attempt, len(OVERLOAD_BACKOFF_S) - 1)]
                if e.code != "RESOURCE_EXHAUSTED" or time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)
        raise AssertionError("not reached")

    def _queue_delivery(self, data: bytes, response: pb.AnalyzeResponse) -> None:
        """Queue the results delivery. Raises StoreUnavailableError (the peer must send again) and
        InvalidInputError BAD_SOURCE_DICOM (no study / series UID for the results to reference)."""
        assert self._outbox is not None
        findings = self._outbox.findings_of(response.job_id)
        if findings is None:  # the job expired between the answer and now (or the store lost it): resend
            raise StoreUnavailableError("the analysis result is no longer in the store; send the instance again")
        self._outbox.add(response.job_id, header_bytes(data), findings, time.time())


def header_bytes(data: bytes) -> bytes:
    """The instance's header, without pixel data, as Part 10 Explicit VR Little Endian: all the results need of
    their source (studies, series and instance to reference, patient module), a few kB instead of megabytes.

    Raises InvalidInputError: BAD_SOURCE_DICOM when the header lacks a UID the results must reference or cannot be
    re-encoded (e.g. a body whose encoding contradicts its declared transfer syntax)."""
    ds = source_header(data)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    try:
        ds.save_as(buf, implicit_vr=False, little_endian=True, enforce_file_format=True)
    except BAD_CONTENT_ERRORS as e:
        raise InvalidInputError(
            f"analysed, but its header cannot be re-encoded for the results: {brief(e)}", reason="BAD_SOURCE_DICOM"
        ) from e
    return buf.getvalue()


def _outcome_label(outcome: StoreOutcome) -> str:
    if outcome.ok:
        return "success"
    if outcome.retryable:
        return "retry"
    return "error" if outcome.status == statuses.PROCESSING_FAILURE else "rejected"


def _printable(text: str) -> str:
    return "".join(c for c in text.strip()[:16] if c.isprintable()) or "-"
