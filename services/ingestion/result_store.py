"""Results and explanation jobs in Redis (keys and contents: docs/ARCHITECTURE.md, "Redis keys"; every key name,
status and timestamp comes from ``cxr.core.jobs``, shared with the worker).

Everything one Analyze writes goes in one MULTI/EXEC transaction with the same TTL, so a reader sees all of
it or none of it. Redis being unreachable is ``StoreUnavailableError`` (UNAVAILABLE, retry later).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis
import redis.exceptions

from cxr.core.errors import DependencyUnavailableError
from cxr.core.jobs import JobStatus, blob_key, dicom_key, findings_key, input_key, job_key, new_job_fields

logger = logging.getLogger(__name__)

REDIS_TIMEOUT_S = 2.0


class StoreUnavailableError(DependencyUnavailableError):
    """Redis did not answer; nothing of this request is known to be stored."""

    reason = "STORE_UNAVAILABLE"


@dataclass(frozen=True)
class NewJob:
    """Everything one successful Analyze stores."""

    job_id: str
    result_key: str | None  # None when the instance has no SOP Instance UID (nothing to cache under)
    response: bytes  # serialized AnalyzeResponse
    model_input: bytes  # npy, wire format
    dicom: bytes | None  # the uploaded file, for the worker's display image; None when no explanation is queued
    findings_json: bytes  # TorchServe's answer as sent
    model_name: str
    model_version: str
    status: JobStatus  # QUEUED, or SKIPPED when no explanation was asked for


@contextmanager
def store_errors() -> Iterator[None]:
    """Turn Redis connection failures into StoreUnavailableError (other Redis errors are bugs: left as is)."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
        logger.warning("Redis unavailable: %s", type(e).__name__)
        raise StoreUnavailableError("the result store (Redis) is unavailable; nothing was stored, retry later") from e


class ResultStore:
    """Reads and writes results and job state. Thread-safe (redis-py's connection pool)."""

    def __init__(self, client: redis.Redis, ttl_s: int, dicom_ttl_s: int | None = None) -> None:
        self._redis = client
        self.ttl_s = ttl_s
        # the upload waits in Redis only until a worker makes the display from it: bounded separately
        self.dicom_ttl_s = min(ttl_s, dicom_ttl_s) if dicom_ttl_s else ttl_s

    @classmethod
    def from_url(
        cls, url: str, ttl_s: int, *, dicom_ttl_s: int | None = None, timeout_s: float = REDIS_TIMEOUT_S
    ) -> ResultStore:
        """A store on ``url`` whose every command gives up after ``timeout_s`` (no unbounded waits)."""
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        return cls(client, ttl_s, dicom_ttl_s)

    def close(self) -> None:
        """Release the connection pool."""
        self._redis.close()

    def ping(self) -> None:
        """Raise StoreUnavailableError unless Redis answers."""
        with store_errors():
            self._redis.ping()

    def cached_response(self, key: str) -> bytes | None:
        """The stored AnalyzeResponse bytes under ``key``, or None."""
        with store_errors():
            value = self._redis.get(key)
        return None if value is None else bytes(value)  # type: ignore[arg-type]

    def save(self, job: NewJob) -> None:
        """Write result, job hash and blobs (``:dicom`` only when given) atomically, all with the store's TTL."""
        message = "explanation not requested" if job.status == JobStatus.SKIPPED else "waiting for a worker"
        state = new_job_fields(job.status, message, model_name=job.model_name, model_version=job.model_version)
        with store_errors():
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(job_key(job.job_id), mapping=state)  # type: ignore[arg-type]
            pipe.expire(job_key(job.job_id), self.ttl_s)
            pipe.set(input_key(job.job_id), job.model_input, ex=self.ttl_s)
            if job.dicom is not None:
                pipe.set(dicom_key(job.job_id), job.dicom, ex=self.dicom_ttl_s)
            pipe.set(findings_key(job.job_id), job.findings_json, ex=self.ttl_s)
            if job.result_key is not None:
                pipe.set(job.result_key, job.response, ex=self.ttl_s)
            pipe.execute()

    def discard(self, job: NewJob) -> None:
        """Best effort: remove what ``save`` wrote (used when the job could not be enqueued)."""
        keys = [job_key(job.job_id)] + [blob_key(job.job_id, n) for n in ("input", "dicom", "findings")]
        if job.result_key is not None:
            keys.append(job.result_key)
        try:
            self._redis.delete(*keys)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            logger.warning("could not remove the keys of an unqueued job; they expire with their TTL")

    def job_state(self, job_id: str) -> dict[str, str] | None:
        """The job's hash as text, or None when the job is unknown or expired."""
        with store_errors():
            raw = self._redis.hgetall(job_key(job_id))
        if not raw:
            return None
        return {k.decode(): v.decode() for k, v in raw.items()}  # type: ignore[union-attr]

    def job_blob(self, job_id: str, name: str) -> bytes | None:
        """One of the job's blobs, or None when absent."""
        with store_errors():
            value = self._redis.get(blob_key(job_id, name))
        return None if value is None else bytes(value)  # type: ignore[arg-type]
