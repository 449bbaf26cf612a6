"""The results loop: takes due deliveries from the outbox, waits (bounded) for each one's explanation, builds its
result objects (``cxr.dicom_results``: the SR first, then the Secondary Captures) and C-STOREs them to the
destination; retries with exponential backoff while the destination is down, gives up after
``send_max_attempts`` (dead-letter set, logged and counted).

Build inputs live in the delivery itself (the source header, the findings, and the heatmaps and display image once
the job is done), so a delivery can wait out a long outage after the job's own keys have expired. Result UIDs are
deterministic, so rebuilding them for a retry re-sends the same objects.
"""

from __future__ import annotations

import io
import json
import logging
import random
import threading
import time
from collections.abc import Callable

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset

from cxr.core.errors import CxrError
from cxr.core.jobs import JobStatus
from cxr.dicom_results import build_result_datasets
from cxr.explain.heatmap_store import unpack_heatmaps
from services.dicom.metrics import DicomMetrics
from services.dicom.outbox import READY, Delivery, Outbox
from services.dicom.sender import SendReport, SendTimeouts, send_datasets
from services.dicom.settings import DicomSettings

logger = logging.getLogger(__name__)

POLL_S = 0.5  # how often an idle loop looks for due deliveries
EXPLANATION_POLL_S = 1.0  # how often a waiting delivery checks its job
LEASE_S = 300.0  # a claimed delivery is claimable again after this (its sender died)
CLAIM_BATCH = 8

Sender = Callable[[list[Dataset]], SendReport]
_TERMINAL = {JobStatus.DONE, JobStatus.FAILED, JobStatus.SKIPPED}


def build_results(delivery: Delivery) -> list[Dataset]:
    """A delivery's result objects, SR first (SR only when the explanation did not come).

    Raises CxrError (InvalidInputError BAD_SOURCE_DICOM / BAD_FINDINGS / BAD_HEATMAPS) for inputs the builder
    refuses; ValueError for a display image that cannot be rendered."""
    source = dcmread(io.BytesIO(delivery.source))
    findings = json.loads(delivery.findings)
    heatmaps = unpack_heatmaps(delivery.heatmaps) if delivery.heatmaps else None
    display = _png_to_array(delivery.display) if delivery.display else None
    return build_result_datasets(source, findings, heatmaps, display)


def _png_to_array(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("L"))


def backoff_s(attempts: int, first_s: float, max_s: float) -> float:
    """Delay before attempt ``attempts + 1``: first_s * 2**(attempts-1), capped, with +-10% jitter."""
    delay = min(max_s, first_s * 2.0 ** max(0, attempts - 1))
    return delay * random.uniform(0.9, 1.1)


class DeliveryLoop:
    """One background thread delivering the outbox's results; ``stop`` ends it after the current delivery."""

    def __init__(self, outbox: Outbox, settings: DicomSettings, metrics: DicomMetrics,
                 sender: Sender | None = None) -> None:  # fmt: skip
        self._outbox = outbox
        self._settings = settings
        self._metrics = metrics
        self._send = sender or self._send_to_destination
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dicom-delivery", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _send_to_destination(self, datasets: list[Dataset]) -> SendReport:
        s = self._settings
        assert s.destination is not None
        timeouts = SendTimeouts(acse_s=s.acse_timeout_s, dimse_s=s.dimse_timeout_s, network_s=s.network_timeout_s)
        return send_datasets(s.destination, datasets, calling_aet=s.ae_title, timeouts=timeouts)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ids = self._outbox.claim(CLAIM_BATCH, LEASE_S)
                self._publish_counts()
            except CxrError as e:
                logger.warning("results outbox unavailable: %s", e)
                self._stop.wait(5 * POLL_S)
                continue
            for job_id in ids:
                if self._stop.is_set():
                    break
                self.process(job_id)
            if not ids:
                self._stop.wait(POLL_S)

    def _publish_counts(self) -> None:
        pending, dead = self._outbox.counts()
        self._metrics.outbox_pending.set(pending)
        self._metrics.outbox_dead.set(dead)

    def process(self, job_id: str) -> None:
        """One step of one delivery: wait for its explanation, or build and send. Never raises."""
        try:
            delivery = self._outbox.load(job_id)
            if delivery is None:
                return
            if delivery.state != READY and not self._explanation_settled(delivery):
                return
            self._deliver(self._outbox.load(job_id) or delivery)
        except CxrError as e:
            logger.warning("delivery of job %s postponed: %s", job_id, e)
        except Exception:  # one bad delivery must not stop the loop; it is dead-lettered
            logger.exception("delivery of job %s failed unexpectedly; given up", job_id)
            self._give_up(job_id, "INTERNAL: unexpected error while building or sending (see the log)")

    def _explanation_settled(self, delivery: Delivery) -> bool:
        """Copy the explanation into the delivery once the job is over (or waited long enough); False = not yet."""
        job = self._outbox.job_snapshot(delivery.job_id)
        waited = time.time() - delivery.received
        if job.status not in _TERMINAL and job.status and waited < self._settings.explanation_wait_s:
            self._outbox.reschedule(delivery.job_id, EXPLANATION_POLL_S)
            return False
        if job.status != JobStatus.DONE:
            logger.info("job %s is %s: results go without heatmaps", delivery.job_id, job.status or "expired")
        done = job.status == JobStatus.DONE
        self._outbox.mark_ready(delivery.job_id, job.heatmaps if done else None, job.display if done else None)
        return True

    def _deliver(self, delivery: Delivery) -> None:
        try:
            datasets = build_results(delivery)
        except (CxrError, ValueError) as e:
            self._give_up(delivery.job_id, f"results cannot be built: {e}")
            return
        todo = [ds for ds in datasets if str(ds.SOPInstanceUID) not in delivery.sent]
        report = self._send(todo)
        sent = delivery.sent | frozenset(report.stored)
        self._metrics.sent_instances.inc(len(report.stored))
        if report.complete:
            self._outbox.complete(delivery.job_id)
            self._metrics.deliveries.labels(outcome="sent").inc()
            self._metrics.delivery_seconds.observe(max(0.0, time.time() - delivery.received))
            logger.info("results of job %s delivered (%d objects)", delivery.job_id, len(datasets))
            return
        if report.stored:
            self._outbox.mark_sent(delivery.job_id, sent)
        self._after_failure(delivery, report)

    def _after_failure(self, delivery: Delivery, report: SendReport) -> None:
        attempts = delivery.attempts + 1
        s = self._settings
        if not report.retryable or attempts >= s.send_max_attempts:
            why = "refused for good" if not report.retryable else f"still failing after {attempts} attempts"
            self._give_up(delivery.job_id, f"{why}: {report.describe()}")
            return
        delay = backoff_s(attempts, s.send_retry_s, s.send_retry_max_s)
        self._outbox.reschedule(delivery.job_id, delay, attempts=attempts, error=report.describe())
        self._metrics.deliveries.labels(outcome="retry").inc()
        logger.warning("results of job %s not delivered (%s); attempt %d, next in %.0f s",
                       delivery.job_id, report.describe(), attempts, delay)  # fmt: skip

    def _give_up(self, job_id: str, error: str) -> None:
        try:
            self._outbox.give_up(job_id, error)
        except CxrError as e:
            logger.warning("could not dead-letter job %s: %s", job_id, e)
            return
        self._metrics.deliveries.labels(outcome="dead").inc()
        logger.error("results of job %s given up: %s", job_id, error)
