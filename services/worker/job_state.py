"""The job hash and job keys in Redis as the worker reads and writes them. Key names, statuses and timestamps are
``cxr.core.jobs``' (one schema for ingestion and worker; docs/ARCHITECTURE.md, "Redis keys").

Ingestion writes ``cxr:job:{id}`` (status queued), ``:input``, ``:findings`` and ``:dicom`` (the uploaded file);
the worker moves the hash through running -> done | failed and, when done, has written ``:display`` and
``:heatmaps`` and deleted ``:dicom``, in one transaction with the status. Every key written here gets the
remaining TTL of the job hash (or ``ttl_s`` when the hash has none), so a job's keys expire together.

No patient data is ever written or logged here: a job is named by its random id only.
"""

from __future__ import annotations

from collections.abc import Mapping

import redis
from redis.typing import EncodableT, FieldT

from cxr.core.errors import CxrError, NotFoundError
from cxr.core.jobs import (
    TERMINAL,
    JobStatus,
    check_job_id,
    dicom_key,
    display_key,
    events_channel,
    findings_key,
    heatmaps_key,
    input_key,
    job_key,
    now_timestamp,
    parse_timestamp,
    source_key,
)

__all__ = [
    "TERMINAL",
    "Fields",
    "JobStatus",
    "JobStore",
    "check_job_id",
    "dicom_key",
    "display_key",
    "findings_key",
    "heatmaps_key",
    "input_key",
    "job_key",
    "now_timestamp",
    "parse_timestamp",
    "source_key",
]  # the schema names are re-exported for the worker's callers and tests

Fields = dict[FieldT, EncodableT]


class JobStore:
    """Reads and updates one Redis's job keys. All methods may raise redis.RedisError (transient)."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self._redis = client
        self._ttl_s = ttl_s

    def read(self, job_id: str) -> dict[str, str]:
        """The job hash as text. Raises NotFoundError (JOB_NOT_FOUND) when it does not exist or has expired."""
        raw: Mapping[bytes, bytes] = self._redis.hgetall(job_key(job_id))  # type: ignore[assignment]
        if not raw:
            raise NotFoundError("job unknown or expired", reason="JOB_NOT_FOUND")
        return {k.decode(): v.decode(errors="replace") for k, v in raw.items()}

    def begin_attempt(self, job_id: str, message: str) -> int:
        """Count one more delivery, mark the job running at progress 0; return the attempt number."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.hincrby(job_key(job_id), "attempts", 1)
        pipe.hset(job_key(job_id), mapping=self._fields(JobStatus.RUNNING, message, 0.0))
        pipe.pttl(job_key(job_id))
        pipe.publish(events_channel(job_id), JobStatus.RUNNING.value)
        attempts, _, ttl, _ = pipe.execute()
        if int(ttl) < 0:  # the hash expired after read() and HINCRBY recreated it: give it a TTL again
            self._redis.expire(job_key(job_id), self._ttl_s)
        return int(attempts)

    def set_progress(self, job_id: str, progress: float, message: str) -> None:
        """Update a running job's progress. Raises NotFoundError when the job was purged or has expired."""
        self._write_existing(job_id, self._fields(JobStatus.RUNNING, message, progress))

    def read_input(self, job_id: str) -> bytes:
        """The model input blob. Raises NotFoundError (JOB_INPUT_MISSING) when missing or expired."""
        blob = self._redis.get(input_key(job_id))
        if blob is None:
            raise NotFoundError("the job's model input is missing or has expired", reason="JOB_INPUT_MISSING")
        return blob  # type: ignore[return-value]

    def read_dicom(self, job_id: str) -> bytes:
        """The uploaded DICOM file. Raises NotFoundError (JOB_DICOM_MISSING) when missing or expired."""
        blob = self._redis.get(dicom_key(job_id))
        if blob is None:
            raise NotFoundError("the job's DICOM file is missing or has expired", reason="JOB_DICOM_MISSING")
        return blob  # type: ignore[return-value]

    def read_display(self, job_id: str) -> bytes | None:
        """The display PNG, when a job already has one (written by an ingestion older than ``:dicom``)."""
        return self._redis.get(display_key(job_id))  # type: ignore[return-value]

    def finish(self, job_id: str, heatmaps: bytes, display: bytes, source: bytes | None = None) -> None:
        """Store the packed heatmaps, the display PNG and (when given) the source header (``:source``, the DICOM
        file without pixel data, for the DICOM results), delete the DICOM file and mark the job done (one
        transaction: ``:display`` appears and ``:dicom`` goes exactly when the job is done). Raises NotFoundError,
        writing nothing, when the job hash is gone (purged or expired) by the time the transaction runs."""

        def write(pipe: redis.client.Pipeline) -> None:
            ttl_ms = int(pipe.pttl(job_key(job_id)))  # type: ignore[arg-type]
            if ttl_ms == -2:  # no such key: never resurrect a purged job's results
                raise NotFoundError("job unknown, expired or purged", reason="JOB_NOT_FOUND")
            ttl_ms = ttl_ms if ttl_ms > 0 else self._ttl_s * 1000
            pipe.multi()
            pipe.set(heatmaps_key(job_id), heatmaps, px=ttl_ms)
            pipe.set(display_key(job_id), display, px=ttl_ms)
            if source is not None:
                pipe.set(source_key(job_id), source, px=ttl_ms)
            pipe.delete(dicom_key(job_id))
            pipe.hset(
                job_key(job_id), mapping=self._fields(JobStatus.DONE, "explanations ready", 1.0, failure_reason="")
            )
            pipe.pexpire(job_key(job_id), ttl_ms)
            pipe.publish(events_channel(job_id), JobStatus.DONE.value)

        self._redis.transaction(write, job_key(job_id))  # WATCH: a purge in between aborts and re-checks

    def fail(self, job_id: str, error: CxrError) -> None:
        """Mark the job failed; ``failure_reason`` is ``"REASON: message"`` (as gRPC status details are)."""
        self._write_existing(job_id, self._fields(JobStatus.FAILED, "explanation failed", failure_reason=str(error)))

    def requeue(self, job_id: str, message: str) -> None:
        """Mark the job queued again (a retry is scheduled)."""
        self._write_existing(job_id, self._fields(JobStatus.QUEUED, message))

    def _write_existing(self, job_id: str, fields: Fields) -> None:
        # Only touch a hash that still exists: never resurrect an expired or purged job as a bare hash (WATCH:
        # a delete between the check and the write aborts the write, which is then checked again).
        def write(pipe: redis.client.Pipeline) -> None:
            if not pipe.exists(job_key(job_id)):
                raise NotFoundError("job unknown, expired or purged", reason="JOB_NOT_FOUND")
            pipe.multi()
            pipe.hset(job_key(job_id), mapping=fields)
            pipe.publish(events_channel(job_id), fields["status"])

        self._redis.transaction(write, job_key(job_id))

    @staticmethod
    def _fields(status: JobStatus, message: str, progress: float | None = None, **extra: str) -> Fields:
        fields: Fields = {"status": status.value, "message": message, "updated": now_timestamp()}
        fields.update(extra)
        if progress is not None:
            fields["progress"] = f"{progress:.3f}"
        return fields
