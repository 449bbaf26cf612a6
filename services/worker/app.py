"""The Celery app ``cxr`` of the explanation worker: broker configuration, the ``cxr.explain`` task and the
process signals (model loading per pool child, readiness, metrics bookkeeping).

Importing this module imports torch and captum (through ``tasks``): ``python -m services.worker`` does so in the
worker's parent, before the prefork pool forks, so that new children start in milliseconds instead of spending
the pool's start-up allowance on imports (docs: /work/shared/STACK-NOTES.md, "Celery").
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready
from prometheus_client.multiprocess import mark_process_dead

from services.worker import tasks
from services.worker.settings import APP_NAME, QUEUE, TASK_NAME, WorkerSettings
from services.worker.startup import Readiness

log = logging.getLogger(__name__)


def celery_config(s: WorkerSettings) -> dict[str, Any]:
    """Celery settings of the worker (no result backend: job state lives in the Redis job hash)."""
    return {
        "broker_url": s.redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": s.visibility_timeout_s,
            "unacked_restore_interval": s.unacked_restore_interval_s,
            "unacked_restore_throttle": 1,  # sweep every unacked_restore_interval, not every 10th time
            "socket_timeout": max(30.0, s.redis_socket_timeout_s),
            "socket_connect_timeout": s.redis_socket_timeout_s,
        },
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": QUEUE,
        "task_routes": {TASK_NAME: {"queue": QUEUE}},
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_soft_time_limit": s.soft_time_limit_s,
        "task_time_limit": s.time_limit_s,
        "worker_prefetch_multiplier": 1,
        "worker_proc_alive_timeout": s.proc_alive_timeout_s,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_send_task_events": False,
    }


def create_app(s: WorkerSettings, readiness: Readiness | None = None) -> Celery:
    """Build the app with ``cxr.explain`` registered; connect the worker signals of this process."""
    tasks.configure(s)
    app = Celery(APP_NAME, set_as_current=True)
    app.conf.update(celery_config(s))
    app.task(**tasks.task_options(s))(tasks.explain)
    _connect_signals(s, readiness)
    return app


def _connect_signals(s: WorkerSettings, readiness: Readiness | None) -> None:
    def on_child_start(**_: Any) -> None:
        error = tasks.init_child()
        if readiness is not None:
            readiness.child_loaded(error)

    def on_child_stop(pid: int | None = None, **_: Any) -> None:
        path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if path:
            mark_process_dead(pid or os.getpid(), path)

    def on_ready(**_: Any) -> None:
        if readiness is not None:
            readiness.start_waiting()

    # dispatch_uid: connected once per process (a second create_app does not add a second set of handlers).
    worker_process_init.connect(on_child_start, weak=False, dispatch_uid="cxr-worker-child-start")
    worker_process_shutdown.connect(on_child_stop, weak=False, dispatch_uid="cxr-worker-child-stop")
    worker_ready.connect(on_ready, weak=False, dispatch_uid="cxr-worker-ready")
