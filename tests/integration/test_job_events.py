"""Job events on a real redis-server: the worker announces each state change on the job's pub/sub channel, and a
WatchExplanation wakes on it instead of waiting for its next poll (a missed announcement only delays an update)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from cxr.core.errors import InvalidInputError
from cxr.core.jobs import JobStatus, events_channel, job_key, new_job_fields
from cxr.ingestion.v1 import ingestion_pb2 as pb
from services.ingestion.explanation_view import ExplanationView
from services.ingestion.result_store import JobEvents, ResultStore
from services.worker.job_state import JobStore

POLL_S = 60.0  # a watch that only polled would see nothing for a minute


@pytest.fixture
def rds(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def queued_job(rds: redis.Redis) -> str:
    job_id = os.urandom(16).hex()
    fields = new_job_fields(JobStatus.QUEUED, "queued", model_name="m", model_version="1")
    rds.hset(job_key(job_id), mapping=fields)  # type: ignore[arg-type]
    rds.expire(job_key(job_id), 120)
    return job_id


def test_every_state_change_of_the_worker_is_announced(rds: redis.Redis) -> None:
    job_id = queued_job(rds)
    pubsub = rds.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(events_channel(job_id))
    store = JobStore(rds, ttl_s=120)
    store.begin_attempt(job_id, "started")
    store.set_progress(job_id, 0.5, "half")
    store.requeue(job_id, "retry")
    store.begin_attempt(job_id, "started again")
    store.fail(job_id, InvalidInputError("broken", reason="CORRUPT_PIXEL_DATA"))
    store.finish(job_id, b"heatmaps", b"display")
    heard = []
    deadline = time.monotonic() + 10
    while len(heard) < 6 and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=1.0)
        if message is not None:
            heard.append(message["data"].decode())
    pubsub.close()
    assert heard == ["running", "running", "queued", "running", "failed", "done"]


def test_a_watch_wakes_on_the_announcement_not_on_its_poll(rds: redis.Redis, redis_url: str) -> None:
    job_id = queued_job(rds)
    view = ExplanationView(ResultStore(redis.Redis.from_url(redis_url), ttl_s=120), poll_s=POLL_S)
    seen: list[tuple[int, float]] = []
    watching = view.watch(job_id, time_remaining=lambda: 120.0, is_active=lambda: True)
    assert next(watching).status == pb.JOB_STATUS_QUEUED  # subscribed from here on

    def worker() -> None:
        time.sleep(0.3)
        JobStore(redis.Redis.from_url(redis_url), ttl_s=120).finish(job_id, b"heatmaps", b"display")

    threading.Thread(target=worker, daemon=True).start()
    started = time.monotonic()
    for progress in watching:
        seen.append((progress.status, time.monotonic() - started))
    assert [status for status, _ in seen] == [pb.JOB_STATUS_DONE]
    assert seen[-1][1] < POLL_S / 4, f"the watch saw DONE after {seen[-1][1]:.1f} s: it polled, it was not woken"


def test_without_pub_sub_the_subscription_only_sleeps() -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, socket_timeout=0.5)  # nothing listens
    events = JobEvents(dead, events_channel("0" * 32))
    started = time.monotonic()
    assert events.wait(0.2) is False  # never raises: the watch falls back to polling the hash
    assert time.monotonic() - started >= 0.2
    events.close()
