"""Analyze, as domain steps: receive -> identify -> cache -> decode -> preprocess -> infer -> store -> enqueue.

Numpy, Pillow and pydicom only (through the shared core); never torch. The servicer calls
``AnalyzePipeline.analyze`` and nothing else.

The synchronous path does only what the findings need: the file is decoded at the model's resolution
(``decode_radiograph(min_side=model size)``), and nothing is made for display. When an explanation is requested
the uploaded bytes are stored (``cxr:job:{id}:dicom``) and the explanation worker makes the display image from
them at the resolution the overlays need.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from cxr.core.dicom_decode import DecodePolicy, DicomIdentity, decode_radiograph, read_identity
from cxr.core.errors import (
    CxrError,
    InvalidInputError,
    LateralViewError,
    OverloadedError,
    TooLargeError,
    TruncatedDicomError,
)
from cxr.core.jobs import JobStatus, result_key, sop_digest
from cxr.core.manifest import Manifest
from cxr.core.preprocess import prepare_image
from cxr.core.wire import encode_input
from cxr.explain.methods import GRADCAM, check_method
from cxr.ingestion.v1 import ingestion_pb2 as pb
from services.ingestion.inference_client import InferenceFailedError, Prediction, TorchServeClient
from services.ingestion.metrics import IngestionMetrics
from services.ingestion.result_store import NewJob, ResultStore
from services.ingestion.task_queue import ExplanationQueue

logger = logging.getLogger(__name__)

NOTICE = "NOT FOR CLINICAL USE"
LATERAL_PREFIX = LateralViewError.reason + ":"
CLIENT_NAME_MAX = 64


class ModelMismatchError(CxrError):
    """TorchServe serves another ensemble than the manifest this service was started with (deployment error)."""

    reason = "MODEL_MISMATCH"


class ConcurrencyLimit:
    """At most ``limit`` holders at once; one more is refused at once (never queued)."""

    def __init__(self, limit: int, what: str) -> None:
        self._slots = threading.BoundedSemaphore(limit)
        self._what = what

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Hold a slot for the block. Raises OverloadedError when none is free."""
        if not self._slots.acquire(blocking=False):
            raise OverloadedError(f"too many {self._what} in progress; back off and retry")
        try:
            yield
        finally:
            self._slots.release()


class StageTimer:
    """Wall-clock milliseconds per named stage, plus ``total`` since creation."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self.ms: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - t0) * 1000.0

    def finish(self) -> dict[str, float]:
        self.ms["total"] = (time.perf_counter() - self._start) * 1000.0
        return self.ms


@dataclass(frozen=True)
class Upload:
    """A received DICOM file and the client's options."""

    data: bytes
    metadata: pb.AnalyzeMetadata


def receive_upload(requests: Iterable[pb.AnalyzeRequest], max_bytes: int) -> Upload:
    """Collect the streamed chunks, enforcing the size cap as they arrive.

    Raises TooLargeError as soon as more than ``max_bytes`` arrived (or are announced), InvalidInputError
    EMPTY_UPLOAD without bytes and METADATA_MISMATCH for metadata after the first message,
    TruncatedDicomError when ``expected_size`` differs from what arrived.
    """
    metadata = pb.AnalyzeMetadata()
    chunks: list[bytes] = []
    total = 0
    for index, message in enumerate(requests):
        part = message.WhichOneof("part")
        if part == "metadata":
            if index:
                raise InvalidInputError("metadata may only come in the first message", reason="METADATA_MISMATCH")
            metadata = message.metadata
            _check_announced_size(metadata.expected_size, max_bytes)
        elif part == "chunk":
            total += len(message.chunk)
            if total > max_bytes:
                raise TooLargeError(f"upload exceeds the limit of {max_bytes} bytes")
            chunks.append(message.chunk)
    if total == 0:
        raise InvalidInputError("no DICOM bytes were sent", reason="EMPTY_UPLOAD")
    if metadata.expected_size and metadata.expected_size != total:
        raise TruncatedDicomError(f"expected {metadata.expected_size} bytes, received {total}")
    return Upload(data=chunks[0] if len(chunks) == 1 else b"".join(chunks), metadata=metadata)


def _check_announced_size(expected: int, max_bytes: int) -> None:
    if expected < 0:
        raise InvalidInputError(f"expected_size must not be negative, got {expected}", reason="METADATA_MISMATCH")
    if expected > max_bytes:
        raise TooLargeError(f"announced size {expected} exceeds the limit of {max_bytes} bytes")


def model_info(document: dict, manifest: Manifest) -> pb.ModelInfo:
    """The handler's ``model`` section -> ModelInfo, checked against our manifest."""
    model = document["model"]
    if model["name"] != manifest.name or str(model["version"]) != manifest.version:
        raise ModelMismatchError(
            f"TorchServe serves {model['name']} {model['version']}, this service expects "
            f"{manifest.name} {manifest.version}"
        )
    return pb.ModelInfo(
        name=model["name"],
        version=str(model["version"]),
        members=list(model.get("members", manifest.model_names)),
        ensemble_rule=model.get("ensemble_rule", manifest.ensemble_rule),
        intended_use=model.get("intended_use", manifest.intended_use),
    )


def findings(document: dict, manifest: Manifest) -> list[pb.Finding]:
    """The handler's ``findings`` -> one Finding per manifest label, in manifest order."""
    items = document["findings"]
    if [f["label"] for f in items] != list(manifest.labels):
        raise ModelMismatchError("TorchServe's labels differ from the manifest's")
    return [
        pb.Finding(
            label=f["label"],
            probability=float(f["probability"]),
            model_probabilities={k: float(v) for k, v in f["model_probabilities"].items()},
            votes=int(f["votes"]),
            n_models=int(f["n_models"]),
            threshold=float(f["threshold"]),
            positive=bool(f["positive"]),
        )
        for f in items
    ]


def identity_message(identity: DicomIdentity) -> pb.DicomIdentity:
    return pb.DicomIdentity(
        study_instance_uid=identity.study_instance_uid,
        series_instance_uid=identity.series_instance_uid,
        sop_instance_uid=identity.sop_instance_uid,
        modality=identity.modality,
        view_position=identity.view_position or "",
    )


def check_prediction(prediction: Prediction, manifest: Manifest) -> tuple[pb.ModelInfo, list[pb.Finding]]:
    """The handler's answer -> (model info, findings), both checked against the manifest.

    Raises ModelMismatchError when another ensemble answered, InferenceFailedError on a malformed answer.
    """
    try:
        return model_info(prediction.document, manifest), findings(prediction.document, manifest)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InferenceFailedError(f"TorchServe's answer is malformed: {type(e).__name__}: {e}") from e


def build_response(identity: DicomIdentity, prediction: Prediction, manifest: Manifest) -> pb.AnalyzeResponse:
    """Identity echo + model info + findings + notice (see ``check_prediction`` for what is raised)."""
    model, items = check_prediction(prediction, manifest)
    return pb.AnalyzeResponse(identity=identity_message(identity), model=model, findings=items, notice=NOTICE)


class AnalyzePipeline:
    """One Analyze call from chunks to stored result and queued explanation."""

    def __init__(
        self,
        *,
        manifest: Manifest,
        inference: TorchServeClient,
        store: ResultStore,
        queue: ExplanationQueue,
        metrics: IngestionMetrics,
        max_upload_bytes: int,
        max_concurrent: int,
        lateral_policy: str,
    ) -> None:
        self.manifest = manifest
        self._inference = inference
        self._store = store
        self._queue = queue
        self._metrics = metrics
        self._max_upload_bytes = max_upload_bytes
        self._limit = ConcurrencyLimit(max_concurrent, "Analyze calls")
        self._policy = DecodePolicy(lateral=lateral_policy)

    def analyze(self, requests: Iterable[pb.AnalyzeRequest], time_remaining: float | None = None) -> pb.AnalyzeResponse:
        """Run Analyze. ``time_remaining``: seconds left of the caller's deadline (None = none).

        Raises the CxrError of the failed step; on any error nothing is stored and nothing enqueued.
        """
        with self._limit.hold():
            self._metrics.in_flight.inc()
            try:
                timer = StageTimer()
                response = self._analyze(requests, timer, time_remaining)
                response.timings_ms.update(timer.finish())
                self._metrics.observe_stages(response.timings_ms)
                return response
            finally:
                self._metrics.in_flight.dec()

    def _analyze(
        self, requests: Iterable[pb.AnalyzeRequest], timer: StageTimer, time_remaining: float | None
    ) -> pb.AnalyzeResponse:
        with timer.stage("receive"):
            upload = receive_upload(requests, self._max_upload_bytes)
        method = check_method(upload.metadata.explanation_method)  # before any work: UNKNOWN_EXPLANATION_METHOD
        with timer.stage("decode"):
            identity = read_identity(upload.data)
        key = result_key(self.manifest.version, identity.sop_instance_uid) if identity.sop_instance_uid else None
        if key is not None and not upload.metadata.skip_cache and method == GRADCAM:  # comparisons get a new job
            with timer.stage("cache"):
                cached = self._cached(key, want_explanation=not upload.metadata.skip_explanation)
            if cached is not None:
                return cached
        return self._analyze_new(upload, identity, key, timer, time_remaining)

    def _cached(self, key: str, *, want_explanation: bool) -> pb.AnalyzeResponse | None:
        """The stored response for ``key`` (cached=true), or None to analyse anew: nothing stored, or the stored
        job has no explanation coming (skipped earlier, or its job expired) while the caller wants one.

        Raises LateralViewError when the result was made under the "warn" policy and this service rejects.
        """
        blob = self._store.cached_response(key)
        if blob is None:
            return None
        response = pb.AnalyzeResponse.FromString(blob)
        if self._policy.lateral == "reject" and any(w.startswith(LATERAL_PREFIX) for w in response.warnings):
            raise LateralViewError("the stored result is of a lateral view, which this service rejects")
        if want_explanation and self._explanation_gone(response.job_id):
            return None
        response.cached = True
        response.timings_ms.clear()
        self._metrics.cache_hits.inc()
        logger.info("cache hit for sop#%s", key.rsplit(":", 1)[-1][:12])
        return response

    def _explanation_gone(self, job_id: str) -> bool:
        """True when no explanation will come for the job: it was skipped, or its job has expired."""
        return (self._store.job_state(job_id) or {}).get("status") in (None, JobStatus.SKIPPED)

    def _analyze_new(
        self, upload: Upload, identity: DicomIdentity, key: str | None, timer: StageTimer, time_remaining: float | None
    ) -> pb.AnalyzeResponse:
        spec = self.manifest.preprocess
        with timer.stage("decode"):  # only the resolution the model needs; the worker makes the display image
            decoded = decode_radiograph(upload.data, min_side=spec.size, policy=self._policy)
        with timer.stage("preprocess"):
            model_input = encode_input(prepare_image(decoded.pixels, spec))
        with timer.stage("inference"):
            prediction = self._inference.predict(model_input, timeout_s=self._inference_timeout(time_remaining))
        explain = not upload.metadata.skip_explanation
        response = build_response(decoded.identity, prediction, self.manifest)
        response.warnings.extend(decoded.warnings)
        response.job_id = uuid.uuid4().hex
        job = NewJob(
            job_id=response.job_id,
            result_key=key,
            response=response.SerializeToString(),
            model_input=model_input,
            dicom=upload.data if explain else None,
            findings_json=prediction.raw,
            model_name=response.model.name,
            model_version=response.model.version,
            status=JobStatus.QUEUED if explain else JobStatus.SKIPPED,
            study_uid=decoded.identity.study_instance_uid,
            explanation_method=check_method(upload.metadata.explanation_method),
        )
        with timer.stage("store"):
            self._store_and_enqueue(job)
        self._metrics.observe_findings(response.findings)  # drift monitoring: only results that were delivered
        client = "".join(c for c in upload.metadata.client_name[:CLIENT_NAME_MAX] if c.isprintable()) or "-"
        digest = sop_digest(identity.sop_instance_uid)[:12]
        logger.info("analysed sop#%s for %s -> job %s (%s)", digest, client, job.job_id, job.status)
        return response

    def _inference_timeout(self, time_remaining: float | None) -> float:
        limit = self._inference.timeout_s
        return limit if time_remaining is None else max(0.001, min(limit, time_remaining))

    def _store_and_enqueue(self, job: NewJob) -> None:
        self._store.save(job)
        if job.status != JobStatus.QUEUED:
            return
        try:
            self._queue.enqueue(job.job_id)
        except CxrError:
            self._store.discard(job)  # the client resends; never leave a job that no worker will ever run
            raise
