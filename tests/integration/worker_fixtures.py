"""Fixtures and helpers for the explanation worker's integration tests: a real redis-server, a tiny random
ensemble on disk, the real worker (``python -m services.worker``) as a subprocess, and jobs written exactly as the
ingestion service writes them. Imported by tests/integration/test_worker.py; the redis-server, port and polling
helpers are support.py's."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import redis
from celery import Celery
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from support import DATA, REPO, free_port, redis_server_in, start_redis_server, wait_until
from support import ensemble as ensemble  # re-exported for test_worker.py

from cxr.core.manifest import Manifest
from cxr.core.preprocess import load_image_file, prepare_image
from cxr.core.wire import encode_input
from services.worker.job_state import Fields, display_key, findings_key, input_key, job_key, now_timestamp

NIH_IMAGES = DATA / "nih-cxr14-621" / "images_512"
TTL_S = 3600


# -- redis-server ------------------------------------------------------------------------------------------------
def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A private redis-server whose DEBUG command works from loopback (DEBUG SLEEP simulates a Redis hiccup);
    returns the process (the caller stops it) and its URL."""
    proc, server = start_redis_server(workdir, debug_command=True)
    return proc, server.url


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a free loopback port, persistence off; stopped after the module."""
    with redis_server_in(tmp_path_factory.mktemp("redis"), debug_command=True) as server:
        yield server.url


@pytest.fixture(scope="module")
def rds(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url, socket_timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def producer(redis_url: str) -> Iterator[Celery]:
    """A separate Celery producer that enqueues by task name, as ingestion does (no torch, no task code)."""
    app = Celery("cxr", broker=redis_url, set_as_current=False)
    app.conf.update(task_serializer="json", broker_connection_retry_on_startup=True)
    try:
        yield app
    finally:
        app.close()


def enqueue(producer: Celery, job_id: str, **options: Any) -> None:
    producer.send_task("cxr.explain", args=[job_id], queue="explain", **options)


# -- jobs as ingestion writes them -------------------------------------------------------------------------------
def nih_image(index: int = 0) -> Path:
    return sorted(NIH_IMAGES.glob("*.png"))[index]


def display_png(image01: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.round(image01 * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def findings_json(manifest: Manifest) -> bytes:
    """A handler-shaped answer (docs/ARCHITECTURE.md); the worker does not interpret it."""
    doc = {
        "model": {"name": manifest.name, "version": manifest.version, "members": list(manifest.model_names),
                  "ensemble_rule": manifest.ensemble_rule, "intended_use": manifest.intended_use},
        "labels": list(manifest.labels),
        "thresholds": list(manifest.thresholds),
        "probabilities": [[0.5] * len(manifest.labels) for _ in manifest.models],
        "findings": [],
    }  # fmt: skip
    return json.dumps(doc).encode()


def write_job(
    client: redis.Redis,
    manifest: Manifest,
    image_index: int = 0,
    hash_overrides: Mapping[str, str] | None = None,
    model_input: bytes | None = None,
) -> str:
    """Write ``cxr:job:{id}`` (queued), ``:input``, ``:display``, ``:findings`` with a TTL; return the job id."""
    job_id = uuid.uuid4().hex
    image01 = load_image_file(nih_image(image_index))
    blob = model_input if model_input is not None else encode_input(prepare_image(image01, manifest.preprocess))
    fields: Fields = {"status": "queued", "progress": "0", "message": "queued for explanation", "failure_reason": "",
              "attempts": "0", "created": now_timestamp(), "updated": now_timestamp(),
              "model_name": manifest.name, "model_version": manifest.version}  # fmt: skip
    fields.update(hash_overrides or {})
    pipe = client.pipeline(transaction=True)
    pipe.hset(job_key(job_id), mapping=fields)
    pipe.expire(job_key(job_id), TTL_S)
    pipe.set(input_key(job_id), blob, ex=TTL_S)
    pipe.set(display_key(job_id), display_png(image01), ex=TTL_S)
    pipe.set(findings_key(job_id), findings_json(manifest), ex=TTL_S)
    pipe.execute()
    return job_id


def job_hash(client: redis.Redis, job_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(job_key(job_id)).items()}  # type: ignore[union-attr]


def wait_status(client: redis.Redis, job_id: str, statuses: set[str], timeout_s: float = 60) -> dict[str, str]:
    def check() -> dict[str, str] | None:
        h = job_hash(client, job_id)
        return h if h.get("status") in statuses else None

    return wait_until(check, timeout_s, f"job status in {sorted(statuses)}")  # type: ignore[no-any-return]


# -- the worker process ------------------------------------------------------------------------------------------
class WorkerProcess:
    """``python -m services.worker`` with its own environment; logs go to a file shown when a test fails."""

    def __init__(self, workdir: Path, env: Mapping[str, str]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.ready_file = workdir / "ready.json"
        self.log_path = workdir / "worker.log"
        self.metrics_port = free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith("CXR_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        self.env = {**base, "CXR_WORKER_READY_FILE": str(self.ready_file),
                    "CXR_WORKER_METRICS_PORT": str(self.metrics_port), "CXR_TORCH_THREADS": "1",
                    "TMPDIR": str(workdir), **env}  # fmt: skip
        # TMPDIR: a SIGKILLed worker leaves its run folder inside the test's folder, not in /tmp
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        self.ready_file.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.worker"], cwd=REPO, env=self.env, stdout=log, stderr=log
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, timeout_s: float = 90) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            return json.loads(self.ready_file.read_text()) if self.ready_file.exists() else None

        self.ready_info: dict[str, Any] = wait_until(ready, timeout_s, "the worker's ready file", interval_s=0.1)
        return self.ready_info

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.pid).children()

    def kill_all(self) -> None:
        """SIGKILL the worker and its pool children at once (a worker lost as a whole)."""
        procs = [psutil.Process(self.pid), *self.children()]
        for p in procs:
            p.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=10)

    def stop(self, grace_s: float = 20) -> int | None:
        """SIGTERM (warm shutdown), then SIGKILL after ``grace_s``; returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        children = self.children()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for child in psutil.wait_procs(children, timeout=5)[1]:
            child.kill()
        return self.proc.returncode

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Scrape /metrics: {(sample name, sorted labels): value}."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples


def metric(samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """One sample's value (0 when absent)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def worker_env(model_dir: Path, redis_url: str, **settings: str) -> dict[str, str]:
    return {"CXR_MODEL_DIR": str(model_dir), "CXR_REDIS_URL": redis_url, **settings}


def running_worker(workdir: Path, env: Mapping[str, str]) -> Iterator[WorkerProcess]:
    """Start, wait ready, yield, always stop (used by fixtures)."""
    worker = WorkerProcess(workdir, env).start()
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()
        print(f"--- worker log ({worker.log_path}) ---\n{worker.log_tail()}")
