"""The job hash and job keys in Redis (docs/ARCHITECTURE.md, "Redis keys"), as the worker reads and writes them.

Ingestion writes ``cxr:job:{id}`` (status queued), ``:input``, ``:display`` and ``:findings``; the worker adds
``:heatmaps`` and moves the hash through running -> done | failed. Every key written here gets the remaining TTL
of the job hash (or ``ttl_s`` when the hash has none), so a job's keys expire together.

Timestamps (``created``, ``updated``) are Unix epoch seconds as decimal strings; ``parse_timestamp`` also
accepts ISO 8601. No patient data is ever written or logged here: a job is named by its random id only.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum

import redis
from redis.typing import EncodableT, FieldT

from cxr.core.errors import CxrError, InvalidInputError, NotFoundError

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


Fields = dict[FieldT, EncodableT]
TERMINAL = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.SKIPPED})


def job_key(job_id: str) -> str:
    return f"cxr:job:{job_id}"


def input_key(job_id: str) -> str:
    return f"cxr:job:{job_id}:input"


def display_key(job_id: str) -> str:
    return f"cxr:job:{job_id}:display"


def findings_key(job_id: str) -> str:
    return f"cxr:job:{job_id}:findings"


def heatmaps_key(job_id: str) -> str:
    return f"cxr:job:{job_id}:heatmaps"


def check_job_id(job_id: object) -> str:
    """Return ``job_id`` if it is a uuid4 hex string; raise InvalidInputError (BAD_JOB_ID) otherwise."""
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise InvalidInputError("job id must be 32 lowercase hex digits", reason="BAD_JOB_ID")
    return job_id


def now_timestamp() -> str:
    """Current time as the job hash stores it (epoch seconds, millisecond precision)."""
    return f"{time.time():.3f}"


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
        attempts, _, ttl = pipe.execute()
        if int(ttl) < 0:  # the hash expired after read() and HINCRBY recreated it: give it a TTL again
            self._redis.expire(job_key(job_id), self._ttl_s)
        return int(attempts)

    def set_progress(self, job_id: str, progress: float, message: str) -> None:
        self._redis.hset(job_key(job_id), mapping=self._fields(JobStatus.RUNNING, message, progress))

    def read_input(self, job_id: str) -> bytes:
        """The model input blob. Raises NotFoundError (JOB_INPUT_MISSING) when missing or expired."""
        blob = self._redis.get(input_key(job_id))
        if blob is None:
            raise NotFoundError("the job's model input is missing or has expired", reason="JOB_INPUT_MISSING")
        return blob  # type: ignore[return-value]

    def finish(self, job_id: str, heatmaps: bytes) -> None:
        """Store the packed heatmaps and mark the job done (one transaction)."""
        ttl_ms = self._job_ttl_ms(job_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(heatmaps_key(job_id), heatmaps, px=ttl_ms)
        pipe.hset(job_key(job_id), mapping=self._fields(JobStatus.DONE, "explanations ready", 1.0, failure_reason=""))
        pipe.pexpire(job_key(job_id), ttl_ms)
        pipe.execute()

    def fail(self, job_id: str, error: CxrError) -> None:
        """Mark the job failed; ``failure_reason`` is ``"REASON: message"`` (as gRPC status details are)."""
        self._write_existing(job_id, self._fields(JobStatus.FAILED, "explanation failed", failure_reason=str(error)))

    def requeue(self, job_id: str, message: str) -> None:
        """Mark the job queued again (a retry is scheduled)."""
        self._write_existing(job_id, self._fields(JobStatus.QUEUED, message))

    def _write_existing(self, job_id: str, fields: Fields) -> None:
        # Only touch a hash that still exists: never resurrect an expired job as a bare hash.
        if not self._redis.exists(job_key(job_id)):
            raise NotFoundError("job unknown or expired", reason="JOB_NOT_FOUND")
        self._redis.hset(job_key(job_id), mapping=fields)

    def _job_ttl_ms(self, job_id: str) -> int:
        ttl = int(self._redis.pttl(job_key(job_id)))  # type: ignore[arg-type]
        return ttl if ttl > 0 else self._ttl_s * 1000

    @staticmethod
    def _fields(status: JobStatus, message: str, progress: float | None = None, **extra: str) -> Fields:
        fields: Fields = {"status": status.value, "message": message, "updated": now_timestamp()}
        fields.update(extra)
        if progress is not None:
            fields["progress"] = f"{progress:.3f}"
        return fields
