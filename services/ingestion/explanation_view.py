"""GetExplanation / WatchExplanation: read a job's state, findings and heatmaps from the store and shape them
into the API's messages (rendering overlays on request). Numpy + Pillow only."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from cxr.core.errors import CxrError, InvalidInputError, NotFoundError, UnsupportedError
from cxr.core.jobs import JobStatus, is_job_id
from cxr.explain.heatmap_store import HeatmapSet, unpack_heatmaps
from cxr.explain.panels import side_by_side
from cxr.explain.render import disagreement_image, encode_png, overlay_image, overlay_title
from cxr.ingestion.v1 import ingestion_pb2 as pb
from services.ingestion.pipeline import NOTICE
from services.ingestion.result_objects import NO_SOURCE, dicom_objects, summary_png
from services.ingestion.result_store import ResultStore

logger = logging.getLogger(__name__)

STATUS: dict[str, pb.JobStatus] = {
    JobStatus.QUEUED: pb.JOB_STATUS_QUEUED,
    JobStatus.RUNNING: pb.JOB_STATUS_RUNNING,
    JobStatus.DONE: pb.JOB_STATUS_DONE,
    JobStatus.FAILED: pb.JOB_STATUS_FAILED,
    JobStatus.SKIPPED: pb.JOB_STATUS_SKIPPED,
}
TERMINAL = frozenset({pb.JOB_STATUS_DONE, pb.JOB_STATUS_FAILED, pb.JOB_STATUS_SKIPPED})


class JobNotFoundError(NotFoundError):
    reason = "JOB_NOT_FOUND"


def job_status(state: dict[str, str]) -> pb.JobStatus:
    """Job hash -> JobStatus (an unknown word is UNSPECIFIED, never an error)."""
    return STATUS.get(state.get("status", ""), pb.JOB_STATUS_UNSPECIFIED)


def progress_message(job_id: str, state: dict[str, str]) -> pb.ExplanationProgress:
    """Job hash -> ExplanationProgress."""
    try:
        progress = float(state.get("progress") or 0.0)
    except ValueError:
        progress = 0.0
    return pb.ExplanationProgress(
        job_id=job_id,
        status=job_status(state),
        progress=min(1.0, max(0.0, progress)),
        message=state.get("message", ""),
        failure_reason=state.get("failure_reason", ""),
    )


def select_labels(findings: Sequence[dict[str, Any]], wanted: Sequence[str], positive_only: bool) -> list[dict]:
    """The findings of the requested labels (all by default), optionally only the positive ones.

    Raises InvalidInputError UNKNOWN_LABEL for a label the ensemble does not know.
    """
    known = {f["label"] for f in findings}
    unknown = [label for label in wanted if label not in known]
    if unknown:
        raise InvalidInputError(f"unknown labels {unknown}; known: {sorted(known)}", reason="UNKNOWN_LABEL")
    chosen = [f for f in findings if not wanted or f["label"] in wanted]
    return [f for f in chosen if f["positive"]] if positive_only else chosen


def model_message(document: dict[str, Any]) -> pb.ModelInfo:
    model = document.get("model", {})
    return pb.ModelInfo(
        name=model.get("name", ""),
        version=str(model.get("version", "")),
        members=list(model.get("members", [])),
        ensemble_rule=model.get("ensemble_rule", ""),
        intended_use=model.get("intended_use", ""),
    )


def read_png(blob: bytes) -> np.ndarray:
    """PNG bytes -> 2-D uint8 greyscale array."""
    with Image.open(io.BytesIO(blob)) as image:
        return np.asarray(image.convert("L"), dtype=np.uint8)


class ExplanationView:
    """Reads explanation jobs. ``stop`` ends every watch promptly (server shutdown)."""

    def __init__(self, store: ResultStore, *, poll_s: float = 0.25, watch_max_s: float = 900.0) -> None:
        self._store = store
        self._poll_s = poll_s
        self._watch_max_s = watch_max_s
        self.stop = threading.Event()

    def get(self, request: pb.GetExplanationRequest) -> pb.Explanation:
        """The explanation as it is now. Raises JobNotFoundError, InvalidInputError UNKNOWN_LABEL."""
        state = self._state(request.job_id)
        status = job_status(state)
        document = self._findings(request.job_id)
        chosen = select_labels(document["findings"], list(request.labels), request.positive_only)
        explanation = pb.Explanation(
            job_id=request.job_id,
            status=status,
            failure_reason=state.get("failure_reason", ""),
            model=model_message(document),
            notice=NOTICE,
        )
        if status == pb.JOB_STATUS_DONE:
            heatmaps = self._heatmaps(request.job_id)
            explanation.method = heatmaps.method
            source = self._store.job_blob(request.job_id, "source") if request.dicom else None
            if request.dicom and source is None:  # refuse before any rendering work
                raise UnsupportedError("this job has no stored DICOM header to build results on", reason=NO_SOURCE)
            wants_display = request.render or request.dicom
            display = read_png(self._blob(request.job_id, "display")) if wants_display else None
            explanation.labels.extend(self._label(f, heatmaps, display if request.render else None) for f in chosen)
            if request.render and display is not None:
                explanation.summary_png = summary_png(document, heatmaps, display)
            if request.dicom and display is not None:
                explanation.dicom_objects.extend(dicom_objects(source, document, heatmaps, display))
        else:
            explanation.labels.extend(self._label(f, None, None) for f in chosen)
        return explanation

    def watch(
        self, job_id: str, *, time_remaining: Callable[[], float | None], is_active: Callable[[], bool]
    ) -> Iterator[pb.ExplanationProgress]:
        """Yield the job's progress on every change until DONE/FAILED/SKIPPED, the caller's deadline, the
        watch limit or shutdown. Raises JobNotFoundError for an unknown (or meanwhile expired) job.

        The job hash is read again when the worker announces a change on the job's events channel, and at
        least every ``poll_s`` (a missed announcement, or a Redis without pub/sub, only delays an update)."""
        remaining = time_remaining()
        limit = self._watch_max_s if remaining is None else min(self._watch_max_s, remaining)
        deadline = time.monotonic() + limit
        last: pb.ExplanationProgress | None = None
        with self._store.job_events(job_id) as events:  # subscribed before the first read: no change is missed
            while True:
                progress = progress_message(job_id, self._state(job_id))
                if progress != last:
                    yield progress
                    last = progress
                if progress.status in TERMINAL or not is_active() or time.monotonic() >= deadline:
                    return
                events.wait(max(0.0, min(self._poll_s, deadline - time.monotonic())))
                if self.stop.is_set():
                    return

    def _label(self, finding: dict[str, Any], heatmaps: HeatmapSet | None, display: np.ndarray | None) -> Any:
        item = pb.LabelExplanation(
            label=finding["label"],
            probability=float(finding["probability"]),
            votes=int(finding["votes"]),
            n_models=int(finding["n_models"]),
            positive=bool(finding["positive"]),
        )
        if heatmaps is None or finding["label"] not in heatmaps.labels:
            return item
        j = heatmaps.label_index(finding["label"])
        item.explained = heatmaps.is_explained(finding["label"])
        item.spatial_agreement = float(heatmaps.spatial_agreement[j])
        item.mean_disagreement = float(heatmaps.mean_disagreement[j])
        if display is not None and item.explained:
            title = overlay_title(item.label, item.probability, item.votes, item.n_models)
            subtitle = f"fused Grad-CAM, spatial agreement {item.spatial_agreement:.2f} - {NOTICE}"
            overlay = overlay_image(display, heatmaps.fused[j], title=title, subtitle=subtitle)
            disagreement = disagreement_image(
                display, heatmaps.std[j], title=f"{item.label}: disagreement between models (per-pixel std)"
            )
            item.overlay_png, item.disagreement_png = encode_png(overlay), encode_png(disagreement)
            if item.positive:  # the paper's panel, for positive findings only
                item.panel_png = encode_png(side_by_side(overlay, disagreement))
        return item

    def _state(self, job_id: str) -> dict[str, str]:
        state = self._store.job_state(job_id) if is_job_id(job_id) else None
        if state is None:
            raise JobNotFoundError("unknown or expired job id")
        return state

    def _blob(self, job_id: str, name: str) -> bytes:
        blob = self._store.job_blob(job_id, name)
        if blob is None:
            raise JobNotFoundError(f"the job's {name} has expired")
        return blob

    def _findings(self, job_id: str) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self._blob(job_id, "findings"))
        return document

    def _heatmaps(self, job_id: str) -> HeatmapSet:
        try:
            return unpack_heatmaps(self._blob(job_id, "heatmaps"))
        except InvalidInputError as e:  # our own stored data is broken: a server fault, not the caller's
            raise CxrError(f"stored heatmaps of job {job_id} are unreadable: {e}", reason="BAD_HEATMAPS") from e
