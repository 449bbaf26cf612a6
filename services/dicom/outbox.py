"""The durable outbox of result deliveries, in Redis: one delivery per analysed instance, kept until its results
are stored at the destination, given up (dead-letter) or expired (``CXR_DICOM_DELIVERY_TTL_S``).

Keys (no patient identifier in any key; the delivery id is the explanation job id):

===============================  ======  ===================================================================
key                              type    content
===============================  ======  ===================================================================
``cxr:dicom:delivery:{job_id}``  hash    ``source`` (the instance's header, Part 10 without pixel data),
                                         ``findings`` (the handler's JSON), ``heatmaps`` / ``display`` (copied
                                         from the job once it is done), ``state`` (waiting | ready),
                                         ``received``, ``attempts``, ``sent`` (result SOP Instance UIDs already
                                         stored), ``last_error``
``cxr:dicom:outbox``             zset    job ids by the time they are due next
``cxr:dicom:dead``               zset    job ids given up, by the time they were given up
===============================  ======  ===================================================================

Claiming is a Lua script (atomic): the due ids are pushed ``lease_s`` into the future as they are handed out, so a
sender that dies mid-delivery leaves them to be claimed again (at-least-once; result UIDs are deterministic, so a
PACS that receives an object twice replaces it). Redis being unreachable is ``StoreUnavailableError``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis
import redis.exceptions

from cxr.core.errors import DependencyUnavailableError, OverloadedError
from cxr.core.jobs import display_key, findings_key, heatmaps_key, job_key

PREFIX = "cxr:dicom"
OUTBOX = f"{PREFIX}:outbox"
DEAD = f"{PREFIX}:dead"
WAITING, READY = "waiting", "ready"
REDIS_TIMEOUT_S = 5.0

_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return due
"""


class StoreUnavailableError(DependencyUnavailableError):
    """Redis did not answer."""

    reason = "STORE_UNAVAILABLE"


class OutboxFullError(OverloadedError):
    """The outbox holds ``outbox_max`` deliveries (the destination has been down for a while)."""

    reason = "RESULTS_BACKLOG"


def delivery_key(job_id: str) -> str:
    """Key of one delivery's hash."""
    return f"{PREFIX}:delivery:{job_id}"


@dataclass(frozen=True)
class Delivery:
    """One pending delivery, as read from Redis."""

    job_id: str
    source: bytes
    findings: bytes
    state: str
    received: float
    attempts: int
    sent: frozenset[str]
    heatmaps: bytes | None = None
    display: bytes | None = None


@dataclass(frozen=True)
class JobSnapshot:
    """The explanation job of a delivery: its status ("" when the job is unknown or expired) and blobs."""

    status: str
    heatmaps: bytes | None
    display: bytes | None


@contextmanager
def redis_errors() -> Iterator[None]:
    """Redis connection failures -> StoreUnavailableError."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
        raise StoreUnavailableError(f"the results outbox (Redis) is unavailable: {type(e).__name__}") from e


class Outbox:
    """Reads and writes deliveries. Thread-safe (redis-py's connection pool)."""

    def __init__(self, client: redis.Redis, *, ttl_s: int, max_pending: int) -> None:
        self._redis = client
        self.ttl_s = ttl_s
        self.max_pending = max_pending
        self._claim = client.register_script(_CLAIM)

    @classmethod
    def from_url(cls, url: str, *, ttl_s: int, max_pending: int) -> Outbox:
        client = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)
        return cls(client, ttl_s=ttl_s, max_pending=max_pending)

    def close(self) -> None:
        self._redis.close()

    def ping(self) -> None:
        """Raise StoreUnavailableError unless Redis answers."""
        with redis_errors():
            self._redis.ping()

    def check_room(self) -> None:
        """Raise OutboxFullError when ``max_pending`` deliveries wait already."""
        with redis_errors():
            pending = int(self._redis.zcard(OUTBOX))  # type: ignore[arg-type]
        if pending >= self.max_pending:
            raise OutboxFullError(
                f"{pending} result deliveries are waiting for the destination; refusing new instances until it "
                "takes them"
            )

    def findings_of(self, job_id: str) -> bytes | None:
        """The job's findings document as ingestion stored it (None when absent)."""
        with redis_errors():
            value = self._redis.get(findings_key(job_id))
        return None if value is None else bytes(value)  # type: ignore[arg-type]

    def add(self, job_id: str, source: bytes, findings: bytes, received: float) -> bool:
        """Queue a delivery, due now. Returns False when one for this job is already pending (nothing changes)."""
        key = delivery_key(job_id)
        fields = {"source": source, "findings": findings, "state": WAITING, "received": f"{received:.3f}",
                  "attempts": "0", "sent": "", "last_error": ""}  # fmt: skip
        with redis_errors():
            if self._redis.zscore(OUTBOX, job_id) is not None:
                return False
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
            pipe.expire(key, self.ttl_s)
            pipe.zadd(OUTBOX, {job_id: time.time()})
            pipe.zrem(DEAD, job_id)
            pipe.execute()
        return True

    def claim(self, limit: int, lease_s: float) -> list[str]:
        """Up to ``limit`` due job ids, each pushed ``lease_s`` into the future (claimed)."""
        now = time.time()
        with redis_errors():
            ids = self._claim(keys=[OUTBOX], args=[now, now + lease_s, limit])
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    def load(self, job_id: str) -> Delivery | None:
        """The delivery, or None when its hash expired (its outbox entry is then dropped)."""
        with redis_errors():
            raw = self._redis.hgetall(delivery_key(job_id))
            if not raw:
                self._redis.zrem(OUTBOX, job_id)
                return None
        h: dict[str, bytes] = {k.decode(): v for k, v in raw.items()}  # type: ignore[union-attr, misc]
        return Delivery(
            job_id=job_id, source=h["source"], findings=h["findings"], state=h["state"].decode(),
            received=float(h["received"]), attempts=int(h["attempts"]),
            sent=frozenset(h.get("sent", b"").decode().split()), heatmaps=h.get("heatmaps"), display=h.get("display"),
        )  # fmt: skip

    def job_snapshot(self, job_id: str) -> JobSnapshot:
        """The explanation job's status and, once done, its heatmaps and display image."""
        with redis_errors():
            status = self._redis.hget(job_key(job_id), "status")
            pipe = self._redis.pipeline(transaction=False)
            pipe.get(heatmaps_key(job_id))
            pipe.get(display_key(job_id))
            heatmaps, display = pipe.execute()
        return JobSnapshot(status.decode() if status else "", heatmaps, display)  # type: ignore[union-attr]

    def mark_ready(self, job_id: str, heatmaps: bytes | None, display: bytes | None) -> None:
        """Keep the explanation with the delivery (it outlives the job's own TTL) and mark it ready to send."""
        fields: dict[str, bytes | str] = {"state": READY}
        if heatmaps is not None and display is not None:
            fields.update(heatmaps=heatmaps, display=display)
        with redis_errors():
            self._redis.hset(delivery_key(job_id), mapping=fields)  # type: ignore[arg-type]

    def mark_sent(self, job_id: str, sent: frozenset[str]) -> None:
        """Record the result instances already stored at the destination (not sent again)."""
        with redis_errors():
            self._redis.hset(delivery_key(job_id), "sent", " ".join(sorted(sent)))

    def reschedule(self, job_id: str, delay_s: float, *, attempts: int | None = None, error: str = "") -> None:
        """Make the delivery due again in ``delay_s``; with ``attempts``, record the failed attempt."""
        with redis_errors():
            pipe = self._redis.pipeline(transaction=True)
            if attempts is not None:
                pipe.hset(delivery_key(job_id), mapping={"attempts": str(attempts), "last_error": error[:500]})
            pipe.zadd(OUTBOX, {job_id: time.time() + delay_s})
            pipe.execute()

    def complete(self, job_id: str) -> None:
        """The results are at the destination: forget the delivery."""
        with redis_errors():
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(delivery_key(job_id))
            pipe.zrem(OUTBOX, job_id)
            pipe.execute()

    def give_up(self, job_id: str, error: str) -> None:
        """Move the delivery to the dead-letter set (its hash stays until its TTL, for inspection)."""
        with redis_errors():
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(delivery_key(job_id), "last_error", error[:500])
            pipe.zrem(OUTBOX, job_id)
            pipe.zadd(DEAD, {job_id: time.time()})
            pipe.execute()

    def retry_dead(self) -> int:
        """Put every dead-lettered delivery whose hash still exists back in the outbox, due now, attempts reset.
        Returns how many (for an operator once the destination is fixed)."""
        with redis_errors():
            ids = [i.decode() for i in self._redis.zrange(DEAD, 0, -1)]  # type: ignore[union-attr]
            revived = 0
            for job_id in ids:
                self._redis.zrem(DEAD, job_id)
                if self._redis.exists(delivery_key(job_id)):
                    self._redis.hset(delivery_key(job_id), "attempts", "0")
                    self._redis.zadd(OUTBOX, {job_id: time.time()})
                    revived += 1
        return revived

    def counts(self) -> tuple[int, int]:
        """(pending, dead) deliveries."""
        with redis_errors():
            return int(self._redis.zcard(OUTBOX)), int(self._redis.zcard(DEAD))  # type: ignore[arg-type]
