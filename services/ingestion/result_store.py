"""Results and explanation jobs in Redis (keys and contents: docs/ARCHITECTURE.md, "Redis keys"; every key name,
status and timestamp comes from ``cxr.core.jobs``, shared with the worker).

Everything one Analyze writes goes in one MULTI/EXEC transaction with the same TTL, so a reader sees all of
it or none of it. Redis being unreachable is ``StoreUnavailableError`` (UNAVAILABLE, retry later).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis
import redis.exceptions

from cxr.core.errors import DependencyUnavailableError, OverloadedError
from cxr.core.jobs import (
    JobStatus,
    blob_key,
    dicom_key,
    events_channel,
    findings_key,
    input_key,
    job_key,
    new_job_fields,
    study_key,
)

logger = logging.getLogger(__name__)

REDIS_TIMEOUT_S = 2.0
HEALTH_KEY = "cxr-health:ingestion"  # written by the health check (no data; expires; outside the cxr:* schema)
HEALTH_KEY_TTL_S = 60
FULL_MARGIN = 0.05  # health reports the store full above 95% of Redis's maxmemory


class StoreUnavailableError(DependencyUnavailableError):
    """Redis did not answer; nothing of this request is known to be stored."""

    reason = "STORE_UNAVAILABLE"


class StoreFullError(OverloadedError):
    """Redis refused a write because its memory limit is reached (``maxmemory`` with ``noeviction``: queued work
    is never evicted, new work is refused instead). Nothing of this request was stored; retry later."""

    reason = "STORE_FULL"


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
    study_uid: str = ""  # Study Instance UID: the job is indexed under it (hashed) for purging; "" = not indexed
    explanation_method: str = ""  # "" = the worker's default (Grad-CAM); cxr.explain.methods.ATTRIBUTION_METHODS


@contextmanager
def store_errors() -> Iterator[None]:
    """Turn Redis failures that are the server's state into our errors: unreachable, loading its data, read-only
    or failing to persist -> StoreUnavailableError; out of memory -> StoreFullError. Other Redis errors are bugs:
    left as is."""
    try:
        yield
    except redis.exceptions.OutOfMemoryError as e:
        logger.warning("Redis refused a write: memory limit reached")
        raise StoreFullError("the result store (Redis) is full; nothing was stored, retry later") from e
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ReadOnlyError) as e:
        logger.warning("Redis unavailable: %s", type(e).__name__)
        raise StoreUnavailableError("the result store (Redis) is unavailable; nothing was stored, retry later") from e
    except redis.exceptions.ResponseError as e:
        if not str(e).startswith(("MISCONF", "EXECABORT")):
            raise
        logger.warning("Redis refused a write: %s", str(e).split(" ", 1)[0])
        raise StoreUnavailableError("the result store (Redis) refuses writes now; nothing was stored") from e


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

    def check_writable(self) -> None:
        """Raise StoreUnavailableError unless Redis accepts a (tiny, expiring) write, StoreFullError when its
        memory is within ``FULL_MARGIN`` of ``maxmemory`` (a tiny write still passes there, an upload would not)."""
        with store_errors():
            self._redis.set(HEALTH_KEY, b"1", ex=HEALTH_KEY_TTL_S)
            used, limit = self._memory_use()
        if limit and used >= limit * (1 - FULL_MARGIN):
            raise StoreFullError(f"the result store (Redis) is full: {used / limit:.0%} of its memory limit in use")

    def _memory_use(self) -> tuple[int, int]:
        """(used_memory, maxmemory) in bytes; maxmemory 0 = no limit. Raises what redis-py raises."""
        memory = self._redis.info("memory")
        return int(memory.get("used_memory", 0)), int(memory.get("maxmemory", 0))  # type: ignore[union-attr]

    def _check_room(self, size: int) -> None:
        """Raise StoreFullError when ``size`` more bytes would take Redis within ``FULL_MARGIN`` of its limit."""
        used, limit = self._memory_use()
        if limit and used + size > limit * (1 - FULL_MARGIN):
            logger.warning("new job refused: Redis would be within %.0f%% of its memory limit", FULL_MARGIN * 100)
            raise StoreFullError(
                f"the result store (Redis) is nearly full ({used / limit:.0%} of its memory limit): new work waits "
                "until queued explanations finish or expire; nothing was stored, retry later"
            )

    def cached_response(self, key: str) -> bytes | None:
        """The stored AnalyzeResponse bytes under ``key``, or None."""
        with store_errors():
            value = self._redis.get(key)
        return None if value is None else bytes(value)  # type: ignore[arg-type]

    def save(self, job: NewJob) -> None:
        """Write result, job hash and blobs (``:dicom`` only when given) and add the job to its study's index,
        atomically, all with the store's TTL (the index lives as long as the study's newest job).

        Raises StoreFullError, writing nothing, when Redis refuses the write or when the job would take Redis
        within ``FULL_MARGIN`` of its memory limit: that room is left to the workers, whose writes finish queued
        explanations and so free their uploads. A Redis filled by new jobs would refuse the workers' writes and
        Celery's own acknowledgements (Celery then stops the worker: "Unrecoverable error: OutOfMemoryError",
        seen in a load run) until TTLs freed memory."""
        message = "explanation not requested" if job.status == JobStatus.SKIPPED else "waiting for a worker"
        state = new_job_fields(
            job.status, message, model_name=job.model_name, model_version=job.model_version,
            explanation_method=job.explanation_method,
        )  # fmt: skip
        with store_errors():
            self._check_room(sum(len(b) for b in (job.model_input, job.dicom or b"", job.findings_json, job.response)))
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(job_key(job.job_id), mapping=state)  # type: ignore[arg-type]
            pipe.expire(job_key(job.job_id), self.ttl_s)
            pipe.set(input_key(job.job_id), job.model_input, ex=self.ttl_s)
            if job.dicom is not None:
                pipe.set(dicom_key(job.job_id), job.dicom, ex=self.dicom_ttl_s)
            pipe.set(findings_key(job.job_id), job.findings_json, ex=self.ttl_s)
            if job.result_key is not None:
                pipe.set(job.result_key, job.response, ex=self.ttl_s)
            if job.study_uid:  # the job id and its cached result, for purging (cxr.stack.purge)
                pipe.sadd(study_key(job.study_uid), job.job_id, *([job.result_key] if job.result_key else []))
                pipe.expire(study_key(job.study_uid), self.ttl_s)
            pipe.execute()

    def discard(self, job: NewJob) -> None:
        """Best effort: remove what ``save`` wrote (used when the job could not be enqueued)."""
        keys = [job_key(job.job_id)] + [blob_key(job.job_id, n) for n in ("input", "dicom", "findings")]
        if job.result_key is not None:
            keys.append(job.result_key)
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(*keys)
            if job.study_uid:
                pipe.srem(study_key(job.study_uid), job.job_id)
            pipe.execute()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            logger.warning("could not remove the keys of an unqueued job; they expire with their TTL")

    def job_state(self, job_id: str) -> dict[str, str] | None:
        """The job's hash as text, or None when the job is unknown or expired."""
        with store_errors():
            raw = self._redis.hgetall(job_key(job_id))
        if not raw:
            return None
        return {k.decode(): v.decode() for k, v in raw.items()}  # type: ignore[union-attr]

    @contextmanager
    def job_events(self, job_id: str) -> Iterator[JobEvents]:
        """A subscription to the job's events channel (``cxr.core.jobs.events_channel``) for the block; closed
        after. Never raises: without Redis pub/sub the subscription only sleeps (watchers then poll)."""
        events = JobEvents(self._redis, events_channel(job_id))
        try:
            yield events
        finally:
            events.close()

    def job_blob(self, job_id: str, name: str) -> bytes | None:
        """One of the job's blobs, or None when absent."""
        with store_errors():
            value = self._redis.get(blob_key(job_id, name))
        return None if value is None else bytes(value)  # type: ignore[arg-type]


class JobEvents:
    """One job's events channel: ``wait`` returns on the next announced change or after the timeout."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self._pubsub: redis.client.PubSub | None = client.pubsub(ignore_subscribe_messages=True)
        try:
            self._pubsub.subscribe(channel)
        except redis.exceptions.RedisError as e:
            logger.info("no job events (%s): watching by polling only", type(e).__name__)
            self.close()

    def wait(self, timeout_s: float) -> bool:
        """Block until a change is announced (True) or ``timeout_s`` passed (False)."""
        if self._pubsub is not None:
            try:
                return self._pubsub.get_message(timeout=timeout_s) is not None
            except redis.exceptions.RedisError as e:
                logger.info("job events lost (%s): watching by polling only", type(e).__name__)
                self.close()
        time.sleep(timeout_s)
        return False

    def close(self) -> None:
        if self._pubsub is not None:
            try:
                self._pubsub.close()
            except redis.exceptions.RedisError:
                pass
            self._pubsub = None
