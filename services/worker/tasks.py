"""The ``cxr.explain`` task: thin transport around ``run_job`` (read the job from Redis, explain, store).

Message: ``args=[job_id]`` and nothing else; the pixels travel through Redis. A job: read the model input, make
the display image from the uploaded DICOM file (``:dicom``, decoded by the same core as Analyze, at the resolution
``CXR_OVERLAY_MAX_SIDE`` needs; in a thread, while torch computes the heatmaps), then store heatmaps and display,
delete ``:dicom`` and mark the job done in one transaction. Outcomes:

* done: heatmaps and display image stored, ``:dicom`` deleted, hash ``done`` at progress 1.0;
* noop: the job is already done / failed / skipped (a redelivered or duplicate message): nothing is written;
* failed: a permanent error (job, input or DICOM file missing or expired, bad input, a DICOM file that does not
  decode at display resolution (its decoder's reason: CORRUPT_PIXEL_DATA, ...), model mismatch or bad bundle,
  time limit, too many deliveries, a bug); the hash gets ``failed`` and ``failure_reason`` ``"REASON: message"``;
* retry: a transient Redis error; the hash goes back to ``queued`` and the task is retried with exponential
  backoff, at most ``max_retries`` times, then failed (RETRIES_EXHAUSTED).

Process model: ``configure`` runs in the worker's parent before the pool forks; ``init_child`` runs in every
pool child (``worker_process_init``) and loads the ensemble once; tasks then use that child's copy.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis
import torch
from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded, TimeLimitExceeded
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from cxr.core.errors import (
    CxrError,
    DependencyUnavailableError,
    InvalidInputError,
    ManifestError,
    NotFoundError,
    UnsupportedError,
)
from cxr.core.manifest import Manifest
from cxr.core.wire import decode_input
from cxr.cpu_allocator import keep_freed_memory
from cxr.dicom_results.findings import header_bytes
from cxr.explain.compute import compute_heatmaps
from cxr.explain.display import display_from_dicom
from cxr.explain.heatmap_store import pack_heatmaps
from cxr.models.bundle import EnsembleNet, load_ensemble
from services.worker import metrics
from services.worker.job_state import TERMINAL, JobStore, check_job_id, parse_timestamp
from services.worker.settings import WorkerSettings

log = logging.getLogger(__name__)

TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,  # Redis at its memory limit (noeviction): TTLs free memory, retry later
    DependencyUnavailableError,
)
PROGRESS_INTERVAL_S = 0.25
BROKER_WAIT_S = 60.0  # how long a task waits for a lost broker to publish its retry (below the soft time limit)
BROKER_POLL_S = 1.0


@dataclass
class _ProcessState:
    settings: WorkerSettings | None = None
    store: JobStore | None = None
    store_pid: int = 0
    manifest: Manifest | None = None
    ensemble: EnsembleNet | None = None
    load_error: CxrError | None = None


_state = _ProcessState()


def configure(settings: WorkerSettings) -> None:
    """Record the settings in this process (the worker's parent, before forking; children inherit them)."""
    _state.settings = settings


def settings() -> WorkerSettings:
    if _state.settings is None:
        raise RuntimeError("services.worker.tasks.configure() was not called")
    return _state.settings


def job_store() -> JobStore:
    """This process's JobStore; a forked child never reuses its parent's Redis connections."""
    if _state.store is None or _state.store_pid != os.getpid():
        s = settings()
        client = redis.Redis.from_url(
            s.redis_url,
            socket_timeout=s.redis_socket_timeout_s,
            socket_connect_timeout=s.redis_socket_timeout_s,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.1), 2),
        )
        _state.store, _state.store_pid = JobStore(client, s.result_ttl_s), os.getpid()
    return _state.store


def init_child() -> CxrError | None:
    """In a new pool child: keep freed memory (no page faults per job), set torch threads, load the ensemble
    once. Returns the load error, if any."""
    s = settings()
    keep_freed_memory()
    torch.set_num_threads(s.threads_per_child())
    try:
        _state.manifest, _state.ensemble = load_ensemble(s.model_dir)
    except Exception as exc:  # any failure to build the models is a bad bundle, reported to the parent
        log.exception("cannot load the ensemble from %s", s.model_dir)
        first_line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        _state.load_error = ManifestError(f"cannot load the ensemble: {type(exc).__name__}: {first_line}")
        return _state.load_error
    metrics.MODEL_INFO.labels(model=_state.manifest.name, version=_state.manifest.version).set(1)
    log.info("child %d loaded %s %s", os.getpid(), _state.manifest.name, _state.manifest.version)
    return None


def loaded_ensemble() -> tuple[Manifest, EnsembleNet]:
    """This child's ensemble. Raises ManifestError if it could not be loaded."""
    if _state.load_error is not None:
        raise _state.load_error
    if _state.manifest is None or _state.ensemble is None:
        raise ManifestError("the ensemble is not loaded in this process")
    return _state.manifest, _state.ensemble


class ProgressReporter:
    """``compute_heatmaps``' progress callback: writes the job's progress, at most every 0.25 s."""

    def __init__(self, store: JobStore, job_id: str, start: float = 0.05, end: float = 0.95) -> None:
        self._store, self._job_id = store, job_id
        self._start, self._span = start, end - start
        self._last = 0.0

    def __call__(self, fraction: float) -> None:
        now = time.monotonic()
        if now - self._last < PROGRESS_INTERVAL_S and fraction < 1.0:
            return
        self._last = now
        progress = self._start + self._span * min(max(fraction, 0.0), 1.0)
        self._store.set_progress(self._job_id, progress, "computing explanations")


def _check_model(job: dict[str, str], manifest: Manifest) -> None:
    want = (job.get("model_name") or manifest.name, job.get("model_version") or manifest.version)
    if want != (manifest.name, manifest.version):
        raise UnsupportedError(
            f"findings came from model {want[0]} {want[1]}, this worker explains {manifest.name} {manifest.version}",
            reason="MODEL_VERSION_MISMATCH",
        )


def _observe_queue_wait(job: dict[str, str]) -> None:
    created = parse_timestamp(job.get("created"))
    if created is not None:
        metrics.QUEUE_WAIT.observe(max(0.0, time.time() - created))


def run_job(store: JobStore, job_id: str, s: WorkerSettings) -> str:
    """Explain one job end to end; returns "done" or "noop".

    Raises CxrError for permanent failures, a TRANSIENT_ERRORS member for transient ones, SoftTimeLimitExceeded
    when Celery's soft time limit fires.
    """
    job = store.read(job_id)
    if job.get("status") in TERMINAL:
        log.info("job %s is already %s: nothing to do", job_id, job["status"])
        return "noop"
    attempts = store.begin_attempt(job_id, "computing explanations")
    if attempts == 1:
        _observe_queue_wait(job)
    if attempts > s.max_attempts:
        raise CxrError(f"delivered {attempts} times without finishing", reason="TOO_MANY_ATTEMPTS")
    manifest, ensemble = loaded_ensemble()
    _check_model(job, manifest)
    if s.task_test_delay_s > 0:
        time.sleep(s.task_test_delay_s)  # TEST ONLY (CXR_TASK_TEST_DELAY_S): a window to kill a running task
    x = decode_input(store.read_input(job_id), manifest.preprocess)
    # The display decode (numpy / openjpeg / Pillow, mostly outside the GIL) runs in a thread while torch computes
    # the heatmaps, so the job takes about as long as the longer of the two, not their sum. Its errors (the
    # decoder's reason) surface at ``result()``, exactly as when it ran first.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="display") as pool:
        display_job = pool.submit(display_and_source, store, job_id, s.overlay_max_side)
        heatmaps = compute_heatmaps(
            ensemble, manifest, x, grid=s.heatmap_grid, progress=ProgressReporter(store, job_id),
            fusion_rule=s.fusion_rule, method=job.get("explanation_method", ""),
        )  # fmt: skip
        display, source = display_job.result()
    store.finish(job_id, pack_heatmaps(heatmaps), display, source)
    return "done"


def display_and_source(store: JobStore, job_id: str, max_side: int) -> tuple[bytes, bytes | None]:
    """The job's display PNG (long side <= ``max_side``, made from its ``:dicom`` file, read from Redis once) and
    that file's header without pixel data, for the DICOM results (None when the header cannot be referenced:
    logged, not fatal). A job queued by an ingestion of the previous release has a ``:display`` and no ``:dicom``:
    it keeps its display, and has no header.

    Raises NotFoundError (JOB_DICOM_MISSING) when the job has neither, and the decoder's CxrError (NOT_DICOM,
    TRUNCATED_DICOM, CORRUPT_PIXEL_DATA, ...) when the file does not decode at display resolution.
    """
    try:
        data = store.read_dicom(job_id)
    except NotFoundError:
        legacy = store.read_display(job_id)
        if legacy is None:
            raise
        return legacy, None
    display = display_from_dicom(data, max_side)
    try:
        return display, header_bytes(data)
    except InvalidInputError as e:
        log.warning("job %s: no DICOM results possible: %s", job_id, e.reason)
        return display, None


def _fail(job_id: str, error: CxrError, started: float) -> str:
    """Mark the job failed (if it still exists), then count it. Redis errors propagate (the caller retries)."""
    log.warning("job %s failed: %s", job_id, error)
    try:
        job_store().fail(job_id, error)
    except NotFoundError:
        log.warning("job %s is unknown or expired: no state to update", job_id)
    metrics.record_outcome("failed", time.monotonic() - started, error.reason)
    return "failed"


def _retry_or_fail(task: Task, job_id: str, exc: Exception, started: float) -> str:
    """Schedule a retry with exponential backoff (raises celery's Retry), or fail after the last one."""
    s, retries = settings(), int(task.request.retries or 0)
    if retries >= s.max_retries:
        error = DependencyUnavailableError(
            f"gave up after {retries} retries; last error {type(exc).__name__}", reason="RETRIES_EXHAUSTED"
        )
        return _fail(job_id, error, started)
    countdown = s.retry_backoff_s * 2**retries
    log.warning(
        "job %s: transient %s, retry %d/%d in %gs", job_id, type(exc).__name__, retries + 1, s.max_retries, countdown
    )
    try:
        job_store().requeue(job_id, f"retry {retries + 1}/{s.max_retries} in {countdown:g} s after a transient error")
    except (redis.RedisError, CxrError) as write_error:  # the retry matters more than this status line
        log.warning("job %s: could not mark it queued for retry: %s", job_id, type(write_error).__name__)
    metrics.record_outcome("retry", time.monotonic() - started)
    raise _publish_retry(task, job_id, exc, countdown, s.max_retries)


def _publish_retry(task: Task, job_id: str, exc: Exception, countdown: float, max_retries: int) -> Exception:
    """``task.retry`` (raises celery's Retry once the retry message is published). When the broker itself is
    down (Redis killed), Celery cannot publish and rejects the message without requeueing it, which would leave
    the job unfinished for ever: wait for the broker instead (at most ``BROKER_WAIT_S``) and publish then."""
    deadline = time.monotonic() + BROKER_WAIT_S
    while True:
        try:
            task.retry(exc=exc, countdown=countdown, max_retries=max_retries)
        except Reject as rejected:
            if time.monotonic() >= deadline:
                log.error(
                    "job %s: the broker did not come back within %g s; retry not published", job_id, BROKER_WAIT_S
                )
                return rejected
            log.warning("job %s: broker unavailable, waiting to publish the retry", job_id)
            time.sleep(BROKER_POLL_S)


def _outcome(job_id: str, started: float) -> str:
    """Run the job; permanent errors end it as failed. Transient errors (also while recording a failure) propagate."""
    try:
        outcome = run_job(job_store(), job_id, settings())
    except TRANSIENT_ERRORS:
        raise
    except SoftTimeLimitExceeded:
        return _fail(job_id, CxrError("the explanation took too long", reason="TIME_LIMIT_EXCEEDED"), started)
    except CxrError as exc:
        return _fail(job_id, exc, started)
    except Exception:  # a bug must still end the job as failed, with the traceback in the log
        log.exception("job %s: unexpected error", job_id)
        return _fail(job_id, CxrError("internal error while explaining"), started)
    metrics.record_outcome(outcome, time.monotonic() - started)
    return outcome


def _explain(task: Task, job_id: str, started: float) -> str:
    try:
        return _outcome(job_id, started)
    except TRANSIENT_ERRORS as exc:
        return _retry_or_fail(task, job_id, exc, started)


def explain(task: Task, job_id: str) -> str:
    """Body of the ``cxr.explain`` task (bound): ``job_id`` in, outcome name out (no result backend)."""
    started = time.monotonic()
    try:
        check_job_id(job_id)
    except CxrError as exc:
        log.warning("rejected a task: %s", exc)
        metrics.record_outcome("failed", 0.0, exc.reason)
        return "failed"
    metrics.IN_FLIGHT.inc()
    try:
        return _explain(task, job_id, started)
    finally:
        metrics.IN_FLIGHT.dec()


def fail_after_hard_time_limit(job_id: str) -> None:
    """In the worker's parent, after the pool killed a child at the hard time limit: mark the job failed."""
    error = CxrError(f"killed at the hard time limit of {settings().time_limit_s:g} s", reason="TIME_LIMIT_EXCEEDED")
    try:
        check_job_id(job_id)
        _fail(job_id, error, time.monotonic() - settings().time_limit_s)
    except (redis.RedisError, CxrError) as exc:
        log.error("job %s: could not record the hard time limit: %s", job_id, exc)


class ExplainTask(Task):
    """Task class of ``cxr.explain``: turns a hard time limit (child killed) into a failed job."""

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        if isinstance(exc, TimeLimitExceeded) and args:
            fail_after_hard_time_limit(str(args[0]))


def task_options(s: WorkerSettings) -> dict[str, Any]:
    """Options of the ``cxr.explain`` task (see docs/ARCHITECTURE.md "Celery")."""
    return {
        "name": "cxr.explain",
        "bind": True,
        "base": ExplainTask,
        "acks_late": True,
        "reject_on_worker_lost": True,
        "acks_on_timeout": True,
        "max_retries": s.max_retries,
        "soft_time_limit": s.soft_time_limit_s,
        "time_limit": s.time_limit_s,
        "ignore_result": True,
        "typing": True,
    }
