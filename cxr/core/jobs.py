"""The Redis schema of results and explanation jobs, in one place (docs/ARCHITECTURE.md, "Redis keys").

The ingestion service (``services.ingestion.result_store``) and the explanation worker
(``services.worker.job_state``) both build every key, status and timestamp from here, so the two can never
disagree on a name. Pure Python: no Redis client, no numpy, no torch.

Job lifecycle: ingestion writes ``cxr:job:{id}`` (status ``queued``, or ``skipped`` when no explanation was asked
for), ``:input`` and ``:findings``, and ``:dicom`` (the uploaded file) for a queued job; the worker moves the hash
through ``running`` to ``done`` or ``failed`` and, when done, has written ``:display`` and ``:heatmaps`` and deleted
``:dicom`` (in one transaction). ``cxr:study:{hash}`` indexes the job ids of a study's images, so that a study's
data can be purged on request (``cxr purge``). No key ever holds a patient identifier: the SOP Instance and Study
Instance UIDs appear hashed only.
"""

from __future__ import annotations

import hashlib
import re
import time
from datetime import datetime
from enum import StrEnum

from cxr.core.errors import InvalidInputError

JOB_BLOBS = ("input", "dicom", "display", "findings", "heatmaps", "source")
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


class JobStatus(StrEnum):
    """The ``status`` field of a job hash."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


TERMINAL = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.SKIPPED})


def sop_digest(sop_instance_uid: str) -> str:
    """The SOP Instance UID as it may appear in keys and logs: first 32 hex digits of its SHA-256."""
    return hashlib.sha256(sop_instance_uid.encode("utf-8")).hexdigest()[:32]


def result_key(model_version: str, sop_instance_uid: str) -> str:
    """Key of the cached AnalyzeResponse of one SOP instance analysed by one ensemble version."""
    return f"cxr:result:{model_version}:{sop_digest(sop_instance_uid)}"


def study_key(study_instance_uid: str) -> str:
    """Key of a study's index: the set of job ids analysed from its images (``cxr purge`` deletes through it)."""
    return f"cxr:study:{sop_digest(study_instance_uid)}"


def job_key(job_id: str) -> str:
    """Key of a job's state hash."""
    return f"cxr:job:{job_id}"


def events_channel(job_id: str) -> str:
    """Redis pub/sub channel on which the worker announces each change of a job's state (the message: the new
    status). Watchers wake on it instead of waiting for their next poll; the hash stays the only truth."""
    return f"{job_key(job_id)}:events"


def blob_key(job_id: str, name: str) -> str:
    """Key of one of a job's blobs (a name of ``JOB_BLOBS``). Raises ValueError for any other name."""
    if name not in JOB_BLOBS:
        raise ValueError(f"unknown job blob {name!r}")
    return f"{job_key(job_id)}:{name}"


def input_key(job_id: str) -> str:
    """Model input, wire-format bytes (``cxr.core.wire``: layout 1, or the legacy npy)."""
    return blob_key(job_id, "input")


def dicom_key(job_id: str) -> str:
    """The uploaded DICOM file, until the worker has made the display image from it."""
    return blob_key(job_id, "dicom")


def display_key(job_id: str) -> str:
    """8-bit greyscale PNG of the radiograph for overlays (written by the worker)."""
    return blob_key(job_id, "display")


def source_key(job_id: str) -> str:
    """The uploaded DICOM file's header without its pixel data (written by the worker with ``:display``): what
    the DICOM results (SR, Secondary Captures) reference and copy their patient and study from."""
    return blob_key(job_id, "source")


def findings_key(job_id: str) -> str:
    """TorchServe's JSON answer."""
    return blob_key(job_id, "findings")


def heatmaps_key(job_id: str) -> str:
    """Packed heatmaps (``cxr.explain.heatmap_store``)."""
    return blob_key(job_id, "heatmaps")


def is_job_id(value: object) -> bool:
    """True for a job id as ingestion makes them: uuid4 as 32 lowercase hex digits."""
    return isinstance(value, str) and _JOB_ID.match(value) is not None


def check_job_id(job_id: object) -> str:
    """Return ``job_id`` if it is a job id (``is_job_id``); raise InvalidInputError (BAD_JOB_ID) otherwise."""
    if not is_job_id(job_id):
        raise InvalidInputError("job id must be 32 lowercase hex digits", reason="BAD_JOB_ID")
    return str(job_id)


def now_timestamp() -> str:
    """Current time as the job hash stores it (``created``, ``updated``): epoch seconds, millisecond precision."""
    return f"{time.time():.3f}"


def new_job_fields(
    status: JobStatus, message: str, *, model_name: str, model_version: str, explanation_method: str = ""
) -> dict[str, str]:
    """Every field of a new job hash: ``status`` (queued or skipped), progress 0, no failure, 0 attempts,
    ``created`` = ``updated`` = now, the ensemble that made the findings (the worker checks it) and the requested
    ``explanation_method`` ("" = the default, Grad-CAM; ``cxr.explain.methods``)."""
    now = now_timestamp()
    return {
        "explanation_method": explanation_method,
        "status": status.value,
        "progress": "0",
        "message": message,
        "failure_reason": "",
        "attempts": "0",
        "created": now,
        "updated": now,
        "model_name": model_name,
        "model_version": model_version,
    }


def parse_timestamp(text: str | None) -> float | None:
    """Epoch seconds or ISO 8601 text -> epoch seconds; None when absent or unreadable."""
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None
