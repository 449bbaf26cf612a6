"""Results and explanation jobs in Redis (keys and contents: docs/ARCHITECTURE.md, "Redis keys").

Everything one Analyze writes goes in one MULTI/EXEC transaction with the same TTL, so a reader sees all of
it or none of it. Redis being unreachable is ``StoreUnavailableError`` (UNAVAILABLE, retry later).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis
import redis.exceptions

from cxr.core.errors import DependencyUnavailableError

logger = logging.getLogger(__name__)

JOB_BLOBS = ("input", "display", "findings", "heatmaps")
REDIS_TIMEOUT_S = 2.0


class StoreUnavailableError(DependencyUnavailableError):
    """Redis did not answer; nothing of this request is known to be stored."""

    reason = "STORE_UNAVAILABLE"


def sop_digest(sop_instance_uid: str) -> str:
    """The SOP Instance UID as it may appear in keys and logs: first 32 hex digits of its SHA-256."""
    return hashlib.sha256(sop_instance_uid.encode("utf-8")).hexdigest()[:32]


def result_key(model_version: str, sop_instance_uid: str) -> str:
    """Key of the cached AnalyzeResponse of one SOP instance analysed by one ensemble version."""
    return f"cxr:result:{model_version}:{sop_digest(sop_instance_uid)}"


def job_key(job_id: str) -> str:
    """Key of a job's state hash."""
    return f"cxr:job:{job_id}"


def blob_key(job_id: str, name: str) -> str:
    """Key of one of a job's blobs (``input``, ``display``, ``findings``, ``heatmaps``)."""
    if name not in JOB_BLOBS:
        raise ValueError(f"unknown job blob {name!r}")
    return f"{job_key(job_id)}:{name}"


@dataclass(frozen=True)
class NewJob:
    """Everything one successful Analyze stores."""

    job_id: str
    result_key: str | None  # None when the instance has no SOP Instance UID (nothing to cache under)
    response: bytes  # serialized AnalyzeResponse
    model_input: bytes  # npy, wire format
    display_png: bytes
    findings_json: bytes  # TorchServe's answer as sent
    model_name: str
    model_version: str
    status: str  # "queued", or "skipped" when no explanation was asked for


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

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self._redis = client
        self.ttl_s = ttl_s

    @classmethod
    def from_url(cls, url: str, ttl_s: int, *, timeout_s: float = REDIS_TIMEOUT_S) -> ResultStore:
        """A store on ``url`` whose every command gives up after ``timeout_s`` (no unbounded waits)."""
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        return cls(client, ttl_s)

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
        """Write result, job hash and blobs atomically, all with the store's TTL."""
        now = f"{time.time():.3f}"
        state = {
            "status": job.status,
            "progress": "0",
            "message": "explanation not requested" if job.status == "skipped" else "waiting for a worker",
            "failure_reason": "",
            "attempts": "0",
            "created": now,
            "updated": now,
            "model_name": job.model_name,
            "model_version": job.model_version,
        }
        with store_errors():
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(job_key(job.job_id), mapping=state)  # type: ignore[arg-type]
            pipe.expire(job_key(job.job_id), self.ttl_s)
            pipe.set(blob_key(job.job_id, "input"), job.model_input, ex=self.ttl_s)
            pipe.set(blob_key(job.job_id, "display"), job.display_png, ex=self.ttl_s)
            pipe.set(blob_key(job.job_id, "findings"), job.findings_json, ex=self.ttl_s)
            if job.result_key is not None:
                pipe.set(job.result_key, job.response, ex=self.ttl_s)
            pipe.execute()

    def discard(self, job: NewJob) -> None:
        """Best effort: remove what ``save`` wrote (used when the job could not be enqueued)."""
        keys = [job_key(job.job_id)] + [blob_key(job.job_id, n) for n in ("input", "display", "findings")]
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
