"""`docker compose up --scale worker=N`, shown without a Docker engine: N real worker processes started exactly as
the compose `worker` service starts them (its command, its environment) share one real Redis queue. Each job is
done once, and the jobs are spread over the workers (each worker's own /metrics counts its share).

What differs from N containers is only what a container gives each replica for free: its own network namespace
and file system. So here each process gets its own metrics port and ready file, and binds loopback; the broker,
the queue, the model and everything else are the compose values."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from celery import Celery
from worker_fixtures import REPO, WorkerProcess, enqueue, metric, wait_status, write_job
from worker_fixtures import ensemble as ensemble  # fixtures, re-exported by name
from worker_fixtures import producer as producer
from worker_fixtures import rds as rds
from worker_fixtures import redis_url as redis_url

from cxr.core.manifest import Manifest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPLICAS = 2
JOBS = 8
# per-container values that replicas on one host must not share (a container has its own ports and /tmp)
PER_CONTAINER = {"CXR_WORKER_METRICS_PORT", "CXR_WORKER_READY_FILE", "CXR_WORKER_METRICS_HOST"}
# addresses of the compose network and paths of the image, replaced by this test's
LOCATIONS = {"CXR_REDIS_URL", "CXR_MODEL_DIR"}


def compose_worker() -> dict[str, Any]:
    return dict(yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["worker"])


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory, ensemble: tuple[Path, Manifest], redis_url: str
) -> Iterator[list[WorkerProcess]]:
    service = compose_worker()
    assert service["command"] == ["python", "-m", "services.worker"]  # WorkerProcess runs exactly this
    env = {k: str(v) for k, v in service["environment"].items()}
    assert LOCATIONS | {"CXR_WORKER_METRICS_PORT"} <= set(env)  # what is replaced exists; anything else is kept
    env = {k: v for k, v in env.items() if k not in PER_CONTAINER}
    env.update(CXR_REDIS_URL=redis_url, CXR_MODEL_DIR=str(ensemble[0]), CXR_WORKER_METRICS_HOST="127.0.0.1",
               CXR_TASK_TEST_DELAY_S="0.5")  # fmt: skip  # each task lasts long enough for the others to take jobs
    workers = [WorkerProcess(tmp_path_factory.mktemp(f"worker{i}"), env).start() for i in range(REPLICAS)]
    try:
        for w in workers:
            w.wait_ready(180)
        yield workers
    finally:
        for w in workers:
            w.stop()
            print(f"--- {w.log_path} ---\n{w.log_tail(30)}")


def test_replicas_share_the_queue_and_each_job_is_done_once(
    replicas: list[WorkerProcess],
    rds: redis.Redis,
    producer: Celery,
    ensemble: tuple[Path, Manifest],
) -> None:
    names = {w.ready_info["hostname"] for w in replicas}
    assert len(names) == REPLICAS, "Celery node names must differ between replicas"
    jobs = [write_job(rds, ensemble[1], image_index=i % 4) for i in range(JOBS)]
    for job_id in jobs:
        enqueue(producer, job_id)
    for job_id in jobs:
        assert wait_status(rds, job_id, {"done", "failed"}, timeout_s=180)["status"] == "done"
    done = [metric(w.metrics(), "cxr_worker_tasks_total", outcome="done") for w in replicas]
    print(f"jobs per replica: {done}")
    assert sum(done) == JOBS, done  # every job exactly once
    assert all(n >= 1 for n in done), f"the jobs were not spread over the replicas: {done}"
    assert rds.llen("explain") == 0
