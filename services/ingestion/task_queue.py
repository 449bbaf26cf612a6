"""Celery producer for explanation jobs: enqueues ``cxr.explain`` by name (the worker is never imported, so
ingestion never imports torch or captum)."""

from __future__ import annotations

import logging

import kombu.exceptions
import redis.exceptions
from celery import Celery

from services.ingestion.result_store import StoreFullError, StoreUnavailableError

logger = logging.getLogger(__name__)

APP_NAME = "cxr"
TASK_NAME = "cxr.explain"
QUEUE = "explain"


class ExplanationQueue:
    """Sends ``cxr.explain(job_id)`` to the ``explain`` queue of the broker at ``broker_url``."""

    def __init__(self, broker_url: str, *, timeout_s: float = 2.0) -> None:
        self._app = Celery(APP_NAME, broker=broker_url, set_as_current=False)
        self._app.conf.update(
            broker_connection_timeout=timeout_s,
            broker_transport_options={"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s},
            task_publish_retry=True,  # a short, bounded retry: a broker hiccup is not a lost request
            task_publish_retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2},
        )

    def enqueue(self, job_id: str) -> None:
        """Publish the task. Raises StoreUnavailableError when the broker cannot be reached."""
        try:
            self._app.send_task(TASK_NAME, args=[job_id], queue=QUEUE)
        except (kombu.exceptions.OperationalError, redis.exceptions.ConnectionError, OSError) as e:
            logger.warning("could not enqueue an explanation: %s", type(e).__name__)
            if "maxmemory" in str(e):  # kombu wraps Redis's OOM refusal in OperationalError
                raise StoreFullError("the task broker (Redis) is full; nothing was enqueued, retry later") from e
            raise StoreUnavailableError("the task broker (Redis) is unavailable; nothing was enqueued") from e

    def ping(self) -> None:
        """Raise StoreUnavailableError unless a broker connection can be opened."""
        try:
            with self._app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1)
        except (kombu.exceptions.OperationalError, redis.exceptions.ConnectionError, OSError) as e:
            raise StoreUnavailableError("the task broker (Redis) is unavailable") from e

    def close(self) -> None:
        """Release the producer pool."""
        self._app.close()
