"""The explanation worker for real: redis-server, ``python -m services.worker`` (prefork pool), jobs written as
ingestion writes them (model input, findings and the uploaded DICOM file, a real one from ../shared/data/dicom),
tasks enqueued by name from a separate Celery producer.

The module's worker runs with CXR_TASK_TEST_DELAY_S=2 (test only): every task sleeps 2 s while its job is
``running``, which gives the tests a deterministic window to kill a child or stall Redis mid-task.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import redis
from celery import Celery
from PIL import Image
from worker_fixtures import (
    REPO,
    WorkerProcess,
    enqueue,
    ensemble,
    job_hash,
    metric,
    producer,
    rds,
    redis_url,
    running_worker,
    start_redis,
    wait_status,
    wait_until,
    worker_env,
)
from worker_fixtures import write_job as write_job_hash_and_blobs

from cxr.core.dicom_decode import decode_radiograph
from cxr.core.jobs import dicom_key, display_key, heatmaps_key, input_key, job_key, source_key
from cxr.core.manifest import Manifest, read_manifest, write_manifest
from cxr.core.preprocess import prepare_image
from cxr.core.wire import decode_input, encode_input
from cxr.explain.heatmap_store import dequantize, unpack_heatmaps
from cxr.explain.testing import TOLERANCE, captum_gradcam_maps
from cxr.models.bundle import load_ensemble
from services.worker.startup import Readiness

pytestmark = pytest.mark.integration
__all__ = ["ensemble", "producer", "rds", "redis_url"]  # fixtures used by name

DELAY_S = 2.0
OVERLAY_MAX_SIDE = 256
DICOM = REPO.parent / "shared" / "data" / "dicom"
JOB_DICOM = "nih_no_finding_dx.dcm"  # real DX, 1024 x 1024, 1 MB
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def write_job(
    client: redis.Redis,
    manifest: Manifest,
    hash_overrides: Mapping[str, str] | None = None,
    model_input: bytes | None = None,
    dicom: bytes | None = None,
) -> str:
    """A queued job as the ingestion service writes it from JOB_DICOM: hash, ``:findings``, ``:input`` (unless
    given, the model input ingestion makes from the file) and ``:dicom`` (the file, unless ``dicom`` replaces it),
    all with the hash's TTL; no ``:display`` (the worker makes it). Returns the job id."""
    original = (DICOM / JOB_DICOM).read_bytes()
    if model_input is None:
        decoded = decode_radiograph(original, min_side=manifest.preprocess.size)
        model_input = encode_input(prepare_image(decoded.pixels, manifest.preprocess))
    data = original if dicom is None else dicom
    job_id = write_job_hash_and_blobs(client, manifest, hash_overrides=hash_overrides, model_input=model_input)
    ttl_ms = int(client.pttl(job_key(job_id)))  # type: ignore[arg-type]
    pipe = client.pipeline(transaction=True)
    pipe.delete(display_key(job_id))
    pipe.set(dicom_key(job_id), data, px=ttl_ms)
    pipe.execute()
    return job_id


def png_size(blob: bytes | None) -> tuple[int, int]:
    assert blob is not None
    with Image.open(io.BytesIO(blob)) as image:
        assert (image.format, image.mode) == ("PNG", "L")
        return image.size


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory, ensemble: tuple[Path, Manifest], redis_url: str
) -> Iterator[WorkerProcess]:
    env = worker_env(
        ensemble[0], redis_url,
        CXR_TASK_TEST_DELAY_S=str(DELAY_S), CXR_TASK_SOFT_TIME_LIMIT_S="20", CXR_TASK_TIME_LIMIT_S="30",
        CXR_VISIBILITY_TIMEOUT_S="60", CXR_TASK_RETRY_BACKOFF_S="0.5", CXR_REDIS_SOCKET_TIMEOUT_S="1",
        CXR_OVERLAY_MAX_SIDE=str(OVERLAY_MAX_SIDE),
    )  # fmt: skip
    yield from running_worker(tmp_path_factory.mktemp("worker"), env)


def _failures(samples: Samples, reason: str) -> float:
    return metric(samples, "cxr_worker_job_failures_total", reason=reason)


def _tasks(samples: Samples, outcome: str) -> float:
    return metric(samples, "cxr_worker_tasks_total", outcome=outcome)


# -- the normal path ---------------------------------------------------------------------------------------------
def test_job_from_a_real_radiograph_ends_done_with_heatmaps(
    worker: WorkerProcess, rds: redis.Redis, producer: Celery, ensemble: tuple[Path, Manifest]
) -> None:
    manifest = ensemble[1]
    job_id = write_job(rds, manifest)
    assert rds.exists(dicom_key(job_id)) and not rds.exists(display_key(job_id))
    enqueue(producer, job_id)

    running = wait_status(rds, job_id, {"running", "done"}, timeout_s=30)
    assert running["attempts"] == "1"
    done = wait_status(rds, job_id, {"done", "failed"}, timeout_s=60)

    assert done["status"] == "done", done
    assert (done["progress"], done["attempts"], done["failure_reason"]) == ("1.000", "1", "")
    assert float(done["updated"]) >= float(done["created"])
    heatmaps = unpack_heatmaps(rds.get(heatmaps_key(job_id)))  # type: ignore[arg-type]
    n_labels = len(manifest.labels)
    assert heatmaps.labels == manifest.labels and heatmaps.models == manifest.model_names
    assert heatmaps.grid == 64 and heatmaps.per_model.shape == (2, n_labels, 64, 64)
    assert heatmaps.fused.shape == heatmaps.std.shape == (n_labels, 64, 64)
    assert np.all((heatmaps.spatial_agreement >= 0) & (heatmaps.spatial_agreement <= 1))
    heatmaps_ttl, job_ttl = rds.pttl(heatmaps_key(job_id)), rds.pttl(job_key(job_id))
    assert 0 < heatmaps_ttl and abs(heatmaps_ttl - job_ttl) < 5000  # type: ignore[operator]
    # the display image was made from the DICOM file, at CXR_OVERLAY_MAX_SIDE, and the file is gone
    assert not rds.exists(dicom_key(job_id))
    assert png_size(rds.get(display_key(job_id))) == (OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE)  # type: ignore[arg-type]
    assert abs(rds.pttl(display_key(job_id)) - job_ttl) < 5000  # type: ignore[operator]


def test_stored_maps_equal_captum_layer_gradcam_and_the_source_header_is_kept(
    worker: WorkerProcess, rds: redis.Redis, producer: Celery, ensemble: tuple[Path, Manifest]
) -> None:
    """The stored per-model maps are Grad-CAM: an independent computation (captum's LayerGradCam on the same input
    and weights, torch's interpolation) agrees to TOLERANCE (uint8 storage); the fused map lies between the models'
    maps (the default rule, probability-weighted); ``:source`` holds the header without pixels, for DICOM results."""
    job_id = write_job(rds, ensemble[1])
    enqueue(producer, job_id)
    assert wait_status(rds, job_id, {"done", "failed"}, timeout_s=60)["status"] == "done"
    heatmaps = unpack_heatmaps(rds.get(heatmaps_key(job_id)))  # type: ignore[arg-type]
    x = decode_input(rds.get(input_key(job_id)), ensemble[1].preprocess)  # type: ignore[arg-type]
    reference = captum_gradcam_maps(load_ensemble(ensemble[0])[1], x, heatmaps.grid)
    stored = dequantize(heatmaps.per_model)
    assert np.abs(stored - reference).max() <= TOLERANCE
    assert (reference.std(axis=(2, 3)) > 0.05).sum() >= len(ensemble[1].labels)  # real maps, not constants
    fused = dequantize(heatmaps.fused)  # the default rule (probability-weighted): a per-label convex combination
    assert (fused >= stored.min(axis=0) - TOLERANCE).all() and (fused <= stored.max(axis=0) + TOLERANCE).all()
    assert "weighted by each model's calibrated probability" in heatmaps.method
    header = pydicom.dcmread(io.BytesIO(rds.get(source_key(job_id))))  # type: ignore[arg-type]
    original = pydicom.dcmread(DICOM / JOB_DICOM, stop_before_pixels=True)
    assert header.SOPInstanceUID == original.SOPInstanceUID and "PixelData" not in header
    assert abs(rds.pttl(source_key(job_id)) - rds.pttl(job_key(job_id))) < 5000  # type: ignore[operator]


def test_a_file_whose_header_cannot_make_dicom_results_is_still_explained(
    worker: WorkerProcess, rds: redis.Redis, producer: Celery, ensemble: tuple[Path, Manifest]
) -> None:
    ds = pydicom.dcmread(DICOM / JOB_DICOM)
    del ds.SeriesInstanceUID  # a result could not reference its series: no ``:source``, but the job is done
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    job_id = write_job(rds, ensemble[1], dicom=buf.getvalue())
    enqueue(producer, job_id)
    assert wait_status(rds, job_id, {"done", "failed"}, timeout_s=60)["status"] == "done"
    assert rds.exists(heatmaps_key(job_id)) and not rds.exists(source_key(job_id))


def test_a_job_queued_by_the_previous_release_keeps_its_display(
    worker: WorkerProcess, rds: redis.Redis, producer: Celery, ensemble: tuple[Path, Manifest]
) -> None:
    job_id = write_job_hash_and_blobs(rds, ensemble[1])  # ``:display`` written by ingestion, no ``:dicom``
    display = rds.get(display_key(job_id))
    enqueue(producer, job_id)
    done = wait_status(rds, job_id, {"done", "failed"})
    assert done["status"] == "done", done
    assert rds.get(display_key(job_id)) == display and rds.exists(heatmaps_key(job_id))


def test_redelivered_message_for_a_done_job_is_a_noop(
    worker: WorkerProcess, rds: redis.Redis, producer: Celery, ensemble: tuple[Path, Manifest]
) -> None:
    job_id = write_job(rds, ensemble[1])
    enqueue(producer, job_id)
    before = wait_status(rds, job_id, {"done", "failed"})
    assert before["status"] == "done"
    noops = _tasks(worker.metrics(), "noop")

    enqueue(producer, job_id)
    wait_until(lambda: _tasks(worker.metrics(), "noop") == noops + 1, 30, "the duplicate to be handled")
    assert job_hash(rds, job_id) == before


# -- permanent failures: failed at once, with a reason, no retries -------------------------------------------------
@pytest.mark.parametrize(
    ("model_input", "reason"),
    [
        (None, "JOB_INPUT_MISSING"),
        (b"\x93NUMPY garbage, not an array", "BAD_MODEL_INPUT"),
        (encode_input(np.zeros((1, 32, 32), np.float32)), "BAD_MODEL_INPUT"),
    ],
    ids=["input-missing", "input-garbage", "input-wrong-size"],
)
def test_bad_or_missing_input_fails_without_retries(
    worker: WorkerProcess,
    rds: redis.Redis,
    producer: Celery,
    ensemble: tuple[Path, Manifest],
    model_input: bytes | None,
    reason: str,
) -> None:
    job_id = write_job(rds, ensemble[1], model_input=model_input)
    if model_input is None:
        rds.delete(input_key(job_id))
    retries = _tasks(worker.metrics(), "retry")
    enqueue(producer, job_id)

    failed = wait_status(rds, job_id, {"done", "failed"})

    assert failed["status"] == "failed"
    assert failed["failure_reason"].startswith(f"{reason}: ")
    assert failed["attempts"] == "1"
    assert not rds.exists(heatmaps_key(job_id))
    samples = worker.metrics()
    assert _tasks(samples, "retry") == retries and _failures(samples, reason) >= 1


@pytest.mark.parametrize(
    ("dicom", "reason"),
    [
        (None, "JOB_DICOM_MISSING"),
        (b"garbage, not a DICOM file" * 20, "NOT_DICOM"),
        ((DICOM / "cr_header_only_no_pixels.dcm").read_bytes(), "NO_PIXEL_DATA"),
    ],
    ids=["dicom-missing", "dicom-garbage", "dicom-without-pixels"],
)
def test_a_missing_or_undecodable_dicom_fails_the_job_with_its_reason(
    worker: WorkerProcess,
    rds: redis.Redis,
    producer: Celery,
    ensemble: tuple[Path, Manifest],
    dicom: bytes | None,
    reason: str,
) -> None:
    job_id = write_job(rds, ensemble[1], dicom=dicom)
    if dicom is None:
        rds.delete(dicom_key(job_id))
    retries = _tasks(worker.metrics(), "retry")
    enqueue(producer, job_id)

    failed = wait_status(rds, job_id, {"done", "failed"})

    assert failed["status"] == "failed" and failed["attempts"] == "1"
    assert failed["failure_reason"].startswith(f"{reason}: ")
    assert not rds.exists(heatmaps_key(job_id)) and not rds.exists(display_key(job_id))
    samples = worker.metrics()
    assert _tasks(samples, "retry") == retries and _failures(samples, reason) >= 1


def test_job_analysed_by_another_model_version_fails(
    worker: WorkerProcess, rds: redis.Redis, producer: Celery, ensemble: tuple[Path, Manifest]
) -> None:
    job_id = write_job(rds, ensemble[1], hash_overrides={"model_version": "9.9.9-other"})
    enqueue(producer, job_id)
    failed = wait_status(rds, job_id, {"done", "failed"})
    assert failed["status"] == "failed" and failed["failure_reason"].startswith("MODEL_VERSION_MISMATCH: ")


def test_job_delivered_too_often_fails(
    worker: WorkerProcess, rds: redis.Redis, producer: Celery, ensemble: tuple[Path, Manifest]
) -> None:
    job_id = write_job(rds, ensemble[1], hash_overrides={"attempts": "6"})  # 6 = CXR_TASK_MAX_ATTEMPTS default
    enqueue(producer, job_id)
    failed = wait_status(rds, job_id, {"done", "failed"})
    assert failed["status"] == "failed" and failed["failure_reason"].startswith("TOO_MANY_ATTEMPTS: ")
    assert failed["attempts"] == "7"


def test_unknown_or_malformed_job_ids_write_nothing(worker: WorkerProcess, rds: redis.Redis, producer: Celery) -> None:
    before = worker.metrics()
    unknown = uuid.uuid4().hex
    enqueue(producer, unknown)
    enqueue(producer, "../../not-a-job-id")

    def both_handled() -> bool:
        now = worker.metrics()
        return (
            _failures(now, "JOB_NOT_FOUND") == _failures(before, "JOB_NOT_FOUND") + 1
            and _failures(now, "BAD_JOB_ID") == _failures(before, "BAD_JOB_ID") + 1
        )

    wait_until(both_handled, 30, "both messages to be dropped")
    assert not rds.exists(job_key(unknown)) and not rds.keys("cxr:job:../*")


# -- time limits -------------------------------------------------------------------------------------------------
def test_soft_time_limit_fails_the_job(
    worker: WorkerProcess, rds: redis.Redis, producer: Celery, ensemble: tuple[Path, Manifest]
) -> None:
    job_id = write_job(rds, ensemble[1])
    enqueue(producer, job_id, soft_time_limit=0.2)  # per-message limit, shorter than the test delay
    failed = wait_status(rds, job_id, {"done", "failed"})
    assert failed["status"] == "failed" and failed["failure_reason"].startswith("TIME_LIMIT_EXCEEDED: ")


def test_hard_time_limit_fails_the_job(
    rds: redis.Redis, redis_url: str, ensemble: tuple[Path, Manifest], tmp_path: Path
) -> None:
    """A child stuck where the soft limit cannot interrupt it is killed by the pool; Celery (5.7, Request.on_timeout)
    then calls the task's ``on_failure`` with TimeLimitExceeded in the worker's parent. Called here the same way, in
    this process, against the real Redis (the soft limit always wins the race in a real worker)."""
    from celery.exceptions import TimeLimitExceeded

    from services.worker import tasks
    from services.worker.settings import load_settings

    tasks.configure(load_settings([], {"CXR_MODEL_DIR": str(ensemble[0]), "CXR_REDIS_URL": redis_url}))
    job_id = write_job(rds, ensemble[1], hash_overrides={"status": "running", "attempts": "1"})

    tasks.ExplainTask().on_failure(TimeLimitExceeded(180), uuid.uuid4().hex, [job_id], {}, None)

    failed = job_hash(rds, job_id)
    assert failed["status"] == "failed" and "hard time limit of 180 s" in failed["failure_reason"]
    assert failed["failure_reason"].startswith("TIME_LIMIT_EXCEEDED: ")


# -- transient errors: retried with backoff, bounded ---------------------------------------------------------------
def _stall_redis_while_running(rds: redis.Redis, job_id: str, seconds: int) -> None:
    """Once the job runs (the worker sleeps DELAY_S before reading the input), block Redis for ``seconds``:
    the worker's input read times out (socket timeout 1 s, 2 client retries) -> a transient error."""
    wait_status(rds, job_id, {"running"}, timeout_s=30)
    rds.execute_command("DEBUG", "SLEEP", seconds)


def test_redis_hiccup_is_retried_and_the_job_ends_done(
    worker: WorkerProcess, rds: redis.Redis, producer: Celery, ensemble: tuple[Path, Manifest]
) -> None:
    retries = _tasks(worker.metrics(), "retry")
    job_id = write_job(rds, ensemble[1])
    enqueue(producer, job_id)
    _stall_redis_while_running(rds, job_id, 7)

    done = wait_status(rds, job_id, {"done", "failed"})

    assert done["status"] == "done", done
    assert done["attempts"] == "2"
    assert _tasks(worker.metrics(), "retry") == retries + 1


def test_last_retry_failing_ends_the_job_failed(
    worker: WorkerProcess, rds: redis.Redis, producer: Celery, ensemble: tuple[Path, Manifest]
) -> None:
    job_id = write_job(rds, ensemble[1])
    enqueue(producer, job_id, retries=3)  # the message of a third retry, exactly as task.retry() sends it
    _stall_redis_while_running(rds, job_id, 7)

    failed = wait_status(rds, job_id, {"done", "failed"})

    assert failed["status"] == "failed"
    assert failed["failure_reason"].startswith("RETRIES_EXHAUSTED: ")


# -- lost workers ------------------------------------------------------------------------------------------------
def test_pool_child_killed_mid_task_job_is_redelivered_and_done(
    worker: WorkerProcess, rds: redis.Redis, producer: Celery, ensemble: tuple[Path, Manifest]
) -> None:
    job_id = write_job(rds, ensemble[1])
    enqueue(producer, job_id)
    running = wait_status(rds, job_id, {"running"}, timeout_s=30)
    assert running["attempts"] == "1"
    (child,) = worker.children()
    child.kill()

    done = wait_status(rds, job_id, {"done", "failed"})

    assert done["status"] == "done", done
    assert done["attempts"] == "2"
    assert child.pid not in [c.pid for c in worker.children()]
    assert metric(worker.metrics(), "cxr_worker_tasks_in_flight") == 0  # the dead child's gauge is forgotten


def test_worker_killed_as_a_whole_job_is_redelivered_after_the_visibility_timeout(
    tmp_path: Path, ensemble: tuple[Path, Manifest]
) -> None:
    limits = {"CXR_TASK_SOFT_TIME_LIMIT_S": "5", "CXR_TASK_TIME_LIMIT_S": "6", "CXR_TASK_RETRY_BACKOFF_S": "0.5",
              "CXR_VISIBILITY_TIMEOUT_S": "9", "CXR_UNACKED_RESTORE_INTERVAL_S": "1"}  # fmt: skip
    with _private_redis(tmp_path) as (url, client):
        first = WorkerProcess(tmp_path / "first", worker_env(ensemble[0], url, CXR_TASK_TEST_DELAY_S="3", **limits))
        first.start().wait_ready()
        app = Celery("cxr", broker=url, set_as_current=False)
        job_id = write_job(client, ensemble[1])
        enqueue(app, job_id)
        running = wait_status(client, job_id, {"running"}, timeout_s=30)
        first.kill_all()
        assert job_hash(client, job_id)["status"] == "running"

        for _ in running_worker(tmp_path / "second", worker_env(ensemble[0], url, **limits)):
            done = wait_status(client, job_id, {"done", "failed"}, timeout_s=60)
        app.close()

    assert done["status"] == "done", done
    assert done["attempts"] == "2"
    assert float(done["updated"]) - float(running["updated"]) >= 7  # not before the 9 s visibility timeout


@contextmanager
def _private_redis(tmp_path: Path) -> Iterator[tuple[str, redis.Redis]]:
    """A redis-server of this test alone, so that the module's worker cannot take its messages."""
    proc, url = start_redis(tmp_path)
    client = redis.Redis.from_url(url, socket_timeout=30)
    try:
        yield url, client
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


# -- start-up: fail fast, readiness ------------------------------------------------------------------------------
def _broken_copy(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    manifest = read_manifest(dst)
    if how == "no-manifest":
        (dst / "manifest.json").unlink()
    elif how == "corrupt-weights":
        (dst / manifest.models[0].weights).write_bytes(b"not the weights")
    elif how == "swapped-archs":  # files and checksums fine, but the weights do not fit the architectures
        a, b = manifest.models
        write_manifest(dst, replace(manifest, models=(replace(a, arch=b.arch), replace(b, arch=a.arch))))
    return dst


@pytest.mark.parametrize(
    ("how", "message"),
    [("no-model-dir", "CXR_MODEL_DIR"), ("no-manifest", "manifest.json"), ("corrupt-weights", "sha256")],
)
def test_bad_configuration_stops_the_worker_before_it_starts(
    tmp_path: Path, ensemble: tuple[Path, Manifest], redis_url: str, how: str, message: str
) -> None:
    model_dir = tmp_path / "missing" if how == "no-model-dir" else _broken_copy(ensemble[0], tmp_path / "m", how)
    worker = WorkerProcess(tmp_path / "w", worker_env(model_dir, redis_url))
    done = subprocess.run(
        [sys.executable, "-m", "services.worker"], cwd=REPO, env=worker.env, capture_output=True, timeout=60
    )
    assert done.returncode == 2
    assert message in done.stderr.decode()


def test_worker_whose_children_cannot_load_the_ensemble_exits_not_ready(
    tmp_path: Path, ensemble: tuple[Path, Manifest]
) -> None:
    model_dir = _broken_copy(ensemble[0], tmp_path / "m", "swapped-archs")
    with _private_redis(tmp_path) as (url, _client):
        worker = WorkerProcess(tmp_path / "w", worker_env(model_dir, url)).start()
        try:
            assert worker.proc is not None
            code = worker.proc.wait(90)
        finally:
            worker.stop()
    assert code == 3, worker.log_tail()
    assert not worker.ready_file.exists()
    assert "could not load the ensemble" in worker.log_path.read_text()


def test_metrics_show_counters_from_the_pool_children(
    worker: WorkerProcess, rds: redis.Redis, producer: Celery, ensemble: tuple[Path, Manifest]
) -> None:
    before = worker.metrics()
    job_id = write_job(rds, ensemble[1])
    enqueue(producer, job_id)
    assert wait_status(rds, job_id, {"done", "failed"})["status"] == "done"

    after = worker.metrics()
    manifest = ensemble[1]
    assert _tasks(after, "done") == _tasks(before, "done") + 1  # tasks run in children, served by the parent
    duration = "cxr_worker_task_duration_seconds_count"
    assert metric(after, duration, outcome="done") == metric(before, duration, outcome="done") + 1
    wait_count = "cxr_worker_queue_wait_seconds_count"
    assert metric(after, wait_count) == metric(before, wait_count) + 1
    assert metric(after, "cxr_worker_model_info", model=manifest.name, version=manifest.version) == 1
    assert metric(after, "cxr_worker_tasks_in_flight") == 0
    assert not any(job_id in str(labels) for _name, labels in after)


def test_ready_worker_answers_celery_ping_and_names_its_model(
    worker: WorkerProcess, producer: Celery, ensemble: tuple[Path, Manifest]
) -> None:
    info = worker.ready_info
    assert info["model"] == {"name": ensemble[1].name, "version": ensemble[1].version}
    assert info["pid"] == worker.pid and "NOT FOR CLINICAL USE" in info["note"]
    replies = producer.control.ping(destination=[info["hostname"]], timeout=5)
    assert replies == [{info["hostname"]: {"ok": "pong"}}]


def test_readiness_writes_the_ready_file_once_children_loaded(tmp_path: Path) -> None:
    fatal: list[bool] = []
    ready = Readiness(tmp_path / "run", tmp_path / "ready.json", 2, 10, {"model": "m"}, lambda: fatal.append(True))
    for pid, ok in ((11, True), (12, True)):
        (ready.children_dir / str(pid)).write_text(json.dumps({"ok": ok, "error": ""}))
    ready.start_waiting().join(5)
    assert json.loads((tmp_path / "ready.json").read_text())["model"] == "m" and not fatal


@pytest.mark.parametrize("marker", [{"ok": False, "error": "bad weights"}, None], ids=["child-error", "timeout"])
def test_readiness_stops_the_worker_when_children_fail_or_never_report(tmp_path: Path, marker: dict | None) -> None:
    fatal: list[bool] = []
    ready = Readiness(tmp_path / "run", tmp_path / "ready.json", 1, 0.3, {}, lambda: fatal.append(True))
    if marker is not None:
        (ready.children_dir / "11").write_text(json.dumps(marker))
    ready.start_waiting().join(5)
    assert fatal == [True] and ready.fatal is not None and not (tmp_path / "ready.json").exists()
