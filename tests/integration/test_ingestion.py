"""The ingestion service end to end over real gRPC: real DICOM files in, a REAL TorchServe (token auth on)
serving a tiny random ensemble, a real redis-server for results, jobs and the Celery queue.

TorchServe starts once for the module; extra ingestion servers (other settings) start in-process as needed."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pydicom
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from ingestion_fixtures import (
    GOOD_DICOMS,
    REPO,
    Running,
    dicom_bytes,
    edited_dicom,
    ensemble,
    free_ports,
    held_stream,
    ingestion_redis,
    ingestion_settings,
    job_keys,
    queued_job_ids,
    rds,
    refusal,
    requests_for,
    rgb_dicom,
    running_server,
    torchserve,
    wait_until,
)
from ingestion_fixtures import analyze as analyze_file
from PIL import Image

from cxr.core.errors import DependencyUnavailableError
from cxr.core.jobs import dicom_key, display_key, result_key, source_key
from cxr.core.manifest import Manifest, write_manifest
from cxr.core.wire import decode_input
from cxr.dicom_results.findings import header_bytes
from cxr.explain.compute import compute_heatmaps
from cxr.explain.display import display_from_dicom
from cxr.explain.heatmap_store import pack_heatmaps, unpack_heatmaps
from cxr.ingestion.v1 import ingestion_pb2 as pb
from cxr.ingestion.v1 import ingestion_pb2_grpc as pb_grpc
from cxr.models.bundle import load_ensemble
from cxr.serving.torchserve_process import TorchServe
from cxr.vendor.torchserve import inference_pb2, inference_pb2_grpc
from services.ingestion.task_queue import ExplanationQueue
from services.worker.job_state import JobStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

__all__ = ["ensemble", "ingestion_redis", "rds", "torchserve"]  # fixtures used by name

INVALID, PRECONDITION = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture(scope="module")
def svc(ensemble: tuple[Path, Manifest], ingestion_redis: str, torchserve: TorchServe) -> Iterator[Running]:
    """The ingestion server with default policies (lateral views rejected)."""
    with running_server(ingestion_settings(ensemble[0], ingestion_redis, torchserve)) as running:
        yield running


def direct_prediction(ts: TorchServe, blob: bytes) -> dict:
    """Ask TorchServe itself (bypassing ingestion) for the answer to a stored model input."""
    with grpc.insecure_channel(ts.grpc_inference_address) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        request = inference_pb2.PredictionsRequest(model_name="cxr", input={"data": blob})
        reply = stub.Predictions(request, metadata=[("authorization", f"Bearer {ts.inference_token()}")], timeout=60)
    return dict(json.loads(reply.prediction))


# -- the four good files -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", GOOD_DICOMS)
def test_real_dicoms_get_every_finding_with_identity_echoed(
    name: str, svc: Running, rds: redis.Redis, ensemble: tuple[Path, Manifest], torchserve: TorchServe
) -> None:
    manifest = ensemble[1]
    header = pydicom.dcmread(REPO.parent / "shared" / "data" / "dicom" / name, stop_before_pixels=True)
    data = dicom_bytes(name)
    r = analyze_file(svc.stub, data, skip_cache=True)
    assert (r.identity.study_instance_uid, r.identity.series_instance_uid, r.identity.sop_instance_uid) == (
        header.StudyInstanceUID,
        header.SeriesInstanceUID,
        header.SOPInstanceUID,
    )
    assert r.identity.modality == header.Modality and r.identity.view_position == header.get("ViewPosition", "")
    assert (r.model.name, r.model.version, list(r.model.members)) == (
        manifest.name,
        manifest.version,
        list(manifest.model_names),
    )
    assert r.model.ensemble_rule == "ctp" and "NOT FOR CLINICAL USE" in r.model.intended_use
    assert [f.label for f in r.findings] == list(manifest.labels)
    assert r.notice == "NOT FOR CLINICAL USE" and not r.cached and len(r.job_id) == 32
    assert set(r.timings_ms) == {"receive", "decode", "preprocess", "inference", "store", "total"}
    # the findings are TorchServe's answer to exactly the input that was stored for the explanation worker
    blob = rds.get(f"cxr:job:{r.job_id}:input")
    assert isinstance(blob, bytes) and decode_input(blob, manifest.preprocess).shape == (1, 64, 64)
    direct = direct_prediction(torchserve, blob)
    for finding, expected in zip(r.findings, direct["findings"], strict=True):
        assert finding.probability == pytest.approx(expected["probability"], abs=1e-6)
        assert finding.votes == expected["votes"] and finding.n_models == 2 and finding.positive == expected["positive"]
        assert dict(finding.model_probabilities) == pytest.approx(expected["model_probabilities"], abs=1e-6)
        assert finding.threshold == pytest.approx(0.5)
    # job state, blobs with TTL (the uploaded file for the worker's display image, no display yet), the message
    assert rds.hget(f"cxr:job:{r.job_id}", "status") == b"queued"
    for key in (f"cxr:job:{r.job_id}", *(f"cxr:job:{r.job_id}:{b}" for b in ("input", "dicom", "findings"))):
        assert 0 < rds.ttl(key) <= 86400
    assert rds.get(dicom_key(r.job_id)) == data and not rds.exists(display_key(r.job_id))
    assert r.job_id in queued_job_ids(rds)


# -- refusals of real bad input ----------------------------------------------------------------------------------
def test_a_header_without_pixels_is_refused_as_no_pixel_data(svc: Running) -> None:
    r = refusal(lambda: analyze_file(svc.stub, dicom_bytes("cr_header_only_no_pixels.dcm")))
    assert (r.code, r.reason) == (INVALID, "NO_PIXEL_DATA")
    assert r.details.startswith("NO_PIXEL_DATA: ")


def test_random_bytes_are_not_dicom(svc: Running) -> None:
    noise = np.random.default_rng(0).bytes(5000)
    assert (refusal(lambda: analyze_file(svc.stub, noise)).reason) == "NOT_DICOM"


def test_a_truncated_real_file_is_refused(svc: Running) -> None:
    data = dicom_bytes("siim_pneumothorax_negative.dcm")
    r = refusal(lambda: analyze_file(svc.stub, data[: len(data) * 6 // 10], skip_cache=True))
    assert (r.code, r.reason) == (INVALID, "TRUNCATED_DICOM")
    r = refusal(lambda: analyze_file(svc.stub, data, expected_size=len(data) + 100))
    assert (r.code, r.reason) == (INVALID, "TRUNCATED_DICOM")


def test_an_empty_upload_is_refused(svc: Running) -> None:
    r = refusal(lambda: analyze_file(svc.stub, b""))
    assert (r.code, r.reason) == (INVALID, "EMPTY_UPLOAD")


def test_a_ct_modality_is_refused(svc: Running) -> None:
    r = refusal(lambda: analyze_file(svc.stub, edited_dicom("nih_no_finding_dx.dcm", Modality="CT")))
    assert (r.code, r.reason) == (PRECONDITION, "UNSUPPORTED_MODALITY")


def test_an_rgb_image_is_refused(svc: Running) -> None:
    r = refusal(lambda: analyze_file(svc.stub, rgb_dicom()))
    assert (r.code, r.reason) == (PRECONDITION, "UNSUPPORTED_PHOTOMETRIC_INTERPRETATION")


def test_a_lateral_view_is_refused_under_the_reject_policy(svc: Running) -> None:
    lateral = edited_dicom("siim_pneumothorax_negative.dcm", ViewPosition="LL")
    r = refusal(lambda: analyze_file(svc.stub, lateral))
    assert (r.code, r.reason) == (PRECONDITION, "LATERAL_VIEW")


def test_a_lateral_view_is_analysed_with_a_warning_under_the_warn_policy(
    svc: Running, ensemble: tuple[Path, Manifest], ingestion_redis: str, torchserve: TorchServe
) -> None:
    lateral = edited_dicom("siim_pneumothorax_negative.dcm", ViewPosition="LL")
    settings = ingestion_settings(ensemble[0], ingestion_redis, torchserve, lateral_policy="warn")
    with running_server(settings) as warn:
        r = analyze_file(warn.stub, lateral)
    assert len(r.findings) == len(ensemble[1].labels)
    assert any(w.startswith("LATERAL_VIEW: ") for w in r.warnings)
    assert r.identity.view_position == "LL"
    # the stored result must not let the lateral view past a service that rejects them
    refused = refusal(lambda: analyze_file(svc.stub, lateral))
    assert (refused.code, refused.reason) == (PRECONDITION, "LATERAL_VIEW")


def test_the_size_cap_is_enforced_while_the_upload_streams(
    ensemble: tuple[Path, Manifest], ingestion_redis: str, torchserve: TorchServe
) -> None:
    data = dicom_bytes("nih_no_finding_dx.dcm")  # ~1 MB
    settings = ingestion_settings(ensemble[0], ingestion_redis, torchserve, max_upload_bytes=300_000)
    release = threading.Event()
    first = list(requests_for(data[:400_000], chunk=100_000))  # crosses the cap
    rest = list(requests_for(data[400_000:], chunk=100_000))[1:]
    with running_server(settings, ready=False) as small:
        try:
            started = time.monotonic()
            r = refusal(lambda: small.stub.Analyze(held_stream(first, release, rest), timeout=30))
            assert time.monotonic() - started < 20  # answered while the client still held the rest back
        finally:
            release.set()
        assert (r.code, r.reason) == (INVALID, "TOO_LARGE")
        r = refusal(lambda: analyze_file(small.stub, data[:1000], expected_size=len(data)))
        assert (r.code, r.reason) == (INVALID, "TOO_LARGE")  # announced too large: refused before any byte


# -- cache -------------------------------------------------------------------------------------------------------
def test_the_same_sop_instance_is_answered_from_the_cache(svc: Running, rds: redis.Redis) -> None:
    data = dicom_bytes("nih_no_finding_dx.dcm")
    first = analyze_file(svc.stub, data, skip_cache=True)
    second = analyze_file(svc.stub, data)
    assert not first.cached and second.cached
    assert second.job_id == first.job_id and list(second.findings) == list(first.findings)
    assert second.identity == first.identity and list(second.warnings) == list(first.warnings)
    assert "inference" not in second.timings_ms and "cache" in second.timings_ms
    key = result_key(first.model.version, first.identity.sop_instance_uid)
    assert rds.exists(key) and 0 < rds.ttl(key) <= 86400
    third = analyze_file(svc.stub, data, skip_cache=True)
    assert not third.cached and third.job_id != first.job_id
    assert [f.probability for f in third.findings] == [f.probability for f in first.findings]


def test_skip_explanation_stores_a_skipped_job_and_enqueues_nothing(svc: Running, rds: redis.Redis) -> None:
    r = analyze_file(svc.stub, dicom_bytes("siim_pneumothorax_negative.dcm"), skip_cache=True, skip_explanation=True)
    assert rds.hget(f"cxr:job:{r.job_id}", "status") == b"skipped"
    assert rds.exists(f"cxr:job:{r.job_id}:input") and not rds.exists(dicom_key(r.job_id))  # no worker will need it
    assert r.job_id not in queued_job_ids(rds)
    progress = list(svc.stub.WatchExplanation(pb.WatchExplanationRequest(job_id=r.job_id), timeout=10))
    assert [p.status for p in progress] == [pb.JOB_STATUS_SKIPPED]
    # asking again with an explanation wanted: the stored result has none coming, so it is analysed anew
    again = analyze_file(svc.stub, dicom_bytes("siim_pneumothorax_negative.dcm"))
    assert not again.cached and again.job_id != r.job_id and again.job_id in queued_job_ids(rds)
    cached = analyze_file(svc.stub, dicom_bytes("siim_pneumothorax_negative.dcm"))
    assert cached.cached and cached.job_id == again.job_id


# -- overload and dependency failures ----------------------------------------------------------------------------
def test_a_call_beyond_max_concurrent_is_refused_at_once(
    ensemble: tuple[Path, Manifest], ingestion_redis: str, torchserve: TorchServe
) -> None:
    data = dicom_bytes("siim_pneumothorax_negative.dcm")
    settings = ingestion_settings(ensemble[0], ingestion_redis, torchserve, max_concurrent=1)
    release = threading.Event()
    all_requests = list(requests_for(data, skip_cache=True))
    with running_server(settings) as one:
        held = one.stub.Analyze.future(held_stream(all_requests[:1], release, all_requests[1:]), timeout=60)
        try:
            in_flight = one.server.metrics.registry.get_sample_value
            wait_until(lambda: in_flight("cxr_ingestion_in_flight") == 1, 20, "the held call to be in flight")
            started = time.monotonic()
            r = refusal(lambda: analyze_file(one.stub, data, skip_cache=True))
            assert time.monotonic() - started < 5
        finally:
            release.set()
        assert (r.code, r.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED")
        assert r.details.startswith("OVERLOADED: ")
        assert len(held.result(timeout=60).findings) == len(ensemble[1].labels)  # the held call still succeeds
        assert one.metric("cxr_ingestion_rejections_total", reason="OVERLOADED") == 1


def test_unreachable_torchserve_is_unavailable_and_nothing_is_stored(
    ensemble: tuple[Path, Manifest], ingestion_redis: str, torchserve: TorchServe, rds: redis.Redis
) -> None:
    (closed,) = free_ports(1)
    settings = ingestion_settings(
        ensemble[0], ingestion_redis, torchserve, torchserve_grpc=f"127.0.0.1:{closed}", inference_retries=2
    )
    keys, queued = job_keys(rds), queued_job_ids(rds)
    data = edited_dicom("siim_pneumothorax_negative.dcm")  # a new SOP instance: no cached result
    with running_server(settings, ready=False) as down:
        r = refusal(lambda: analyze_file(down.stub, data))
        assert down.metric("cxr_ingestion_inference_retries_total") == 2
    assert (r.code, r.reason) == (grpc.StatusCode.UNAVAILABLE, "INFERENCE_UNAVAILABLE")
    assert job_keys(rds) == keys and queued_job_ids(rds) == queued


def test_a_missing_inference_token_is_unavailable_and_nothing_is_stored(
    ensemble: tuple[Path, Manifest], ingestion_redis: str, torchserve: TorchServe, rds: redis.Redis
) -> None:
    settings = ingestion_settings(ensemble[0], ingestion_redis, torchserve, torchserve_token_file=None)
    keys = job_keys(rds)
    with running_server(settings, ready=False) as no_token:
        r = refusal(lambda: analyze_file(no_token.stub, dicom_bytes("nih_no_finding_dx.dcm"), skip_cache=True))
    assert (r.code, r.reason) == (grpc.StatusCode.UNAVAILABLE, "INFERENCE_UNAVAILABLE")
    assert job_keys(rds) == keys


def test_a_rotated_inference_key_is_read_again(
    ensemble: tuple[Path, Manifest], ingestion_redis: str, torchserve: TorchServe, rds: redis.Redis, tmp_path: Path
) -> None:
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "stale-key"}}))
    settings = ingestion_settings(ensemble[0], ingestion_redis, torchserve, torchserve_token_file=key_file)
    keys = job_keys(rds)
    with running_server(settings, ready=False) as rotated:
        data = dicom_bytes("nih_no_finding_dx.dcm")
        r = refusal(lambda: analyze_file(rotated.stub, data, skip_cache=True))
        assert (r.code, r.reason) == (grpc.StatusCode.UNAVAILABLE, "INFERENCE_UNAVAILABLE")
        assert job_keys(rds) == keys
        key_file.write_text(torchserve.settings.key_file.read_text())  # the operator puts the new key in place
        assert len(analyze_file(rotated.stub, data, skip_cache=True).findings) == len(ensemble[1].labels)


def test_a_failed_enqueue_leaves_nothing_behind(
    ensemble: tuple[Path, Manifest], ingestion_redis: str, torchserve: TorchServe, rds: redis.Redis
) -> None:
    (closed,) = free_ports(1)
    settings = ingestion_settings(ensemble[0], ingestion_redis, torchserve)
    keys = job_keys(rds)
    with running_server(settings, ready=False) as running:
        # the broker (normally the same Redis) is gone while the store still answers
        running.server.pipeline._queue = ExplanationQueue(f"redis://127.0.0.1:{closed}/0")
        r = refusal(lambda: analyze_file(running.stub, edited_dicom("siim_pneumothorax_negative.dcm")))
    assert (r.code, r.reason) == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
    assert job_keys(rds) == keys


def test_another_served_ensemble_is_refused(
    ensemble: tuple[Path, Manifest], ingestion_redis: str, torchserve: TorchServe, rds: redis.Redis, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    shutil.copytree(ensemble[0], other)
    write_manifest(other, replace(ensemble[1], version="9.9.9"))
    settings = ingestion_settings(other, ingestion_redis, torchserve, startup_wait_s=2.0)
    keys = job_keys(rds)
    with running_server(settings, ready=False) as wrong:
        with pytest.raises(DependencyUnavailableError, match="MODEL_MISMATCH"):
            wrong.server.wait_ready(2.0)
        r = refusal(lambda: analyze_file(wrong.stub, dicom_bytes("nih_no_finding_dx.dcm"), skip_cache=True))
    assert (r.code, r.reason) == (grpc.StatusCode.INTERNAL, "INTERNAL")
    assert "9.9.9" not in r.details and r.details.startswith("INTERNAL: ")
    assert job_keys(rds) == keys


def test_redis_down_is_store_unavailable(
    ensemble: tuple[Path, Manifest], ingestion_redis: str, torchserve: TorchServe
) -> None:
    (closed,) = free_ports(1)
    settings = ingestion_settings(ensemble[0], f"redis://127.0.0.1:{closed}/0", torchserve)
    data = dicom_bytes("siim_pneumothorax_negative.dcm")
    with running_server(settings, ready=False) as no_redis:
        for skip_cache in (False, True):  # fails at the cache lookup, or after inference at the store
            r = refusal(lambda s=skip_cache: analyze_file(no_redis.stub, data, skip_cache=s))  # type: ignore[misc]
            assert (r.code, r.reason) == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
        request = pb.GetExplanationRequest(job_id="0" * 32)
        r = refusal(lambda: no_redis.stub.GetExplanation(request, timeout=10))
        assert (r.code, r.reason) == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")


def test_readiness_waits_are_bounded(
    ensemble: tuple[Path, Manifest], ingestion_redis: str, torchserve: TorchServe
) -> None:
    (closed,) = free_ports(1)
    settings = ingestion_settings(
        ensemble[0], ingestion_redis, torchserve, torchserve_grpc=f"127.0.0.1:{closed}", inference_retries=0
    )
    with running_server(settings, ready=False) as down:
        health = health_pb2_grpc.HealthStub(down.channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            == health_pb2.HealthCheckResponse.NOT_SERVING
        )
        started = time.monotonic()
        with pytest.raises(DependencyUnavailableError, match="not ready after 2 s.*INFERENCE_UNAVAILABLE"):
            down.server.wait_ready(2.0)
        assert time.monotonic() - started < 10


# -- explanations ------------------------------------------------------------------------------------------------
def test_unknown_jobs_are_not_found(svc: Running) -> None:
    for job_id in ("0" * 32, "not-a-job-id", ""):
        r = refusal(lambda j=job_id: svc.stub.GetExplanation(pb.GetExplanationRequest(job_id=j), timeout=10))  # type: ignore[misc]
        assert (r.code, r.reason) == (grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND")
    watch = pb.WatchExplanationRequest(job_id="0" * 32)
    r = refusal(lambda: list(svc.stub.WatchExplanation(watch, timeout=10)))
    assert (r.code, r.reason) == (grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND")


def _finish_job(rds: redis.Redis, ensemble: tuple[Path, Manifest], job_id: str) -> bytes:
    """Do what the worker does for ``job_id`` with the worker's own pieces: real Grad-CAM heatmaps of the stored
    input, the display image from the stored DICOM file, both stored with status done (``:dicom`` deleted)."""
    manifest, net = load_ensemble(ensemble[0])
    x = decode_input(rds.get(f"cxr:job:{job_id}:input"), manifest.preprocess)  # type: ignore[arg-type]
    blob = pack_heatmaps(compute_heatmaps(net, manifest, x, grid=16))
    display = display_from_dicom(rds.get(dicom_key(job_id)), 1024)  # type: ignore[arg-type]
    JobStore(rds, 3600).finish(job_id, blob, display)
    return blob


def test_explanations_of_a_done_job_render_pngs(
    svc: Running, rds: redis.Redis, ensemble: tuple[Path, Manifest]
) -> None:
    r = analyze_file(svc.stub, dicom_bytes("RG1_UNCR.dcm"), skip_cache=True)
    queued = svc.stub.GetExplanation(pb.GetExplanationRequest(job_id=r.job_id, render=True), timeout=30)
    assert queued.status == pb.JOB_STATUS_QUEUED and len(queued.labels) == len(r.findings)
    assert not any(label.overlay_png for label in queued.labels)
    heatmaps = unpack_heatmaps(_finish_job(rds, ensemble, r.job_id))
    assert not rds.exists(dicom_key(r.job_id))
    done = svc.stub.GetExplanation(pb.GetExplanationRequest(job_id=r.job_id, render=True), timeout=60)
    assert done.status == pb.JOB_STATUS_DONE and done.notice == "NOT FOR CLINICAL USE"
    assert done.method == heatmaps.method and done.model.version == ensemble[1].version
    assert [label.label for label in done.labels] == list(ensemble[1].labels)
    display_size = Image.open(io.BytesIO(rds.get(display_key(r.job_id)))).size  # type: ignore[arg-type]
    assert display_size == (921, 978)  # RG1 (1841 x 1955) read at half resolution: long side <= the worker's 1024
    for j, (label, finding) in enumerate(zip(done.labels, r.findings, strict=True)):
        assert (label.probability, label.votes, label.positive) == (
            finding.probability,
            finding.votes,
            finding.positive,
        )
        assert label.spatial_agreement == pytest.approx(float(heatmaps.spatial_agreement[j]))
        assert label.mean_disagreement == pytest.approx(float(heatmaps.mean_disagreement[j]))
        for png in (label.overlay_png, label.disagreement_png):
            with Image.open(io.BytesIO(png)) as image:
                assert image.format == "PNG" and image.size[0] >= display_size[0]
    plain = svc.stub.GetExplanation(pb.GetExplanationRequest(job_id=r.job_id, labels=["Effusion"]), timeout=30)
    assert [label.label for label in plain.labels] == ["Effusion"] and not plain.labels[0].overlay_png
    assert plain.labels[0].spatial_agreement == pytest.approx(float(heatmaps.spatial_agreement[4]))
    positive = svc.stub.GetExplanation(pb.GetExplanationRequest(job_id=r.job_id, positive_only=True), timeout=30)
    assert [label.label for label in positive.labels] == [f.label for f in r.findings if f.positive]
    bad = pb.GetExplanationRequest(job_id=r.job_id, labels=["Dragon"])
    assert refusal(lambda: svc.stub.GetExplanation(bad, timeout=10)).reason == "UNKNOWN_LABEL"


def test_dicom_results_come_over_grpc_and_a_job_without_a_source_header_is_refused(
    svc: Running, rds: redis.Redis, ensemble: tuple[Path, Manifest]
) -> None:
    data = dicom_bytes("RG1_UNCR.dcm")
    r = analyze_file(svc.stub, data, skip_cache=True)
    _finish_job(rds, ensemble, r.job_id)  # done without ``:source``, as a job of the previous worker release
    # a 256 px display (a worker with CXR_OVERLAY_MAX_SIDE=256) keeps the rendering short on a 2-core CI machine
    rds.set(display_key(r.job_id), display_from_dicom(data, 256), keepttl=True)
    ask = pb.GetExplanationRequest(job_id=r.job_id, dicom=True, render=True)
    refused = refusal(lambda: svc.stub.GetExplanation(ask, timeout=60))
    assert (refused.code, refused.reason) == (PRECONDITION, "NO_DICOM_SOURCE")
    rds.set(source_key(r.job_id), header_bytes(data), ex=3600)  # what the worker stores
    done = svc.stub.GetExplanation(ask, timeout=120)
    positives = [f.label for f in r.findings if f.positive]
    assert [o.kind for o in done.dicom_objects] == ["SR"] + ["SC"] * (len(positives) + 1)
    assert [o.description for o in done.dicom_objects] == ["findings", *positives, "summary"]
    objects = [pydicom.dcmread(io.BytesIO(o.data)) for o in done.dicom_objects]
    for obj, ds in zip(done.dicom_objects, objects, strict=True):
        assert ds.SOPInstanceUID == obj.sop_instance_uid and ds.SOPClassUID == obj.sop_class_uid
        assert ds.StudyInstanceUID == r.identity.study_instance_uid
    evidence = objects[0].CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == r.identity.sop_instance_uid
    with Image.open(io.BytesIO(done.summary_png)) as page:
        assert page.format == "PNG" and page.size[0] > 0
    for label in done.labels:
        assert label.explained and bool(label.panel_png) == label.positive  # the paper's panel: positives only
        if label.positive:
            with Image.open(io.BytesIO(label.panel_png)) as panel, Image.open(io.BytesIO(label.overlay_png)) as left:
                assert panel.size[0] > 2 * left.size[0] and panel.size[1] == left.size[1]


def test_an_unknown_explanation_method_is_refused_and_a_known_one_reaches_the_job(
    svc: Running, rds: redis.Redis
) -> None:
    data = dicom_bytes("nih_no_finding_dx.dcm")
    r = refusal(lambda: analyze_file(svc.stub, data, explanation_method="lime"))
    assert (r.code, r.reason) == (INVALID, "UNKNOWN_EXPLANATION_METHOD") and "integrated_gradients" in r.details
    queued = analyze_file(svc.stub, data, explanation_method="occlusion")  # a comparison run: never from the cache
    assert not queued.cached
    assert rds.hget(f"cxr:job:{queued.job_id}", "explanation_method") == b"occlusion"


def test_watch_streams_every_change_until_done(svc: Running, rds: redis.Redis, ensemble: tuple[Path, Manifest]) -> None:
    r = analyze_file(svc.stub, dicom_bytes("nih_no_finding_dx.dcm"), skip_cache=True)
    stream = svc.stub.WatchExplanation(pb.WatchExplanationRequest(job_id=r.job_id), timeout=60)
    first = next(stream)
    assert (first.job_id, first.status, first.progress) == (r.job_id, pb.JOB_STATUS_QUEUED, 0.0)
    rds.hset(f"cxr:job:{r.job_id}", mapping={"status": "running", "progress": "0.5", "message": "model 1 of 2"})
    second = next(stream)
    assert (second.status, second.progress, second.message) == (pb.JOB_STATUS_RUNNING, 0.5, "model 1 of 2")
    _finish_job(rds, ensemble, r.job_id)
    third = next(stream)
    assert (third.status, third.progress) == (pb.JOB_STATUS_DONE, 1.0)
    with pytest.raises(StopIteration):
        next(stream)


# -- health, reflection, metrics ---------------------------------------------------------------------------------
def test_health_reports_serving_and_reflection_lists_the_service(svc: Running) -> None:
    health = health_pb2_grpc.HealthStub(svc.channel)
    for service in ("", "cxr.ingestion.v1.IngestionService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(svc.channel)
    (answer,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for s in answer.list_services_response.service}
    assert {"cxr.ingestion.v1.IngestionService", "grpc.health.v1.Health"} <= names


def test_metrics_endpoint_counts_requests_rejections_and_stages(svc: Running) -> None:
    before_ok = svc.metric("cxr_ingestion_requests_total", rpc="Analyze", outcome="ok")
    before_bad = svc.metric("cxr_ingestion_rejections_total", reason="NOT_DICOM")
    before_total = svc.metric("cxr_ingestion_stage_seconds_count", stage="inference")
    analyze_file(svc.stub, dicom_bytes("siim_pneumothorax_negative.dcm"), skip_cache=True)
    refusal(lambda: analyze_file(svc.stub, b"definitely not DICOM" * 20))
    assert svc.metric("cxr_ingestion_requests_total", rpc="Analyze", outcome="ok") == before_ok + 1
    assert svc.metric("cxr_ingestion_rejections_total", reason="NOT_DICOM") == before_bad + 1
    assert svc.metric("cxr_ingestion_requests_total", rpc="Analyze", outcome="invalid_argument") >= 1
    assert svc.metric("cxr_ingestion_stage_seconds_count", stage="inference") == before_total + 1
    assert svc.metric("cxr_ingestion_in_flight") == 0
    text = svc.metrics_text()
    assert 'cxr_ingestion_model_info{name="cxr-random-test",version="0.0.0-random"} 1.0' in text
    assert "1.2.840" not in text and "1.3.6.1" not in text  # no UID ever becomes a label


# -- the process: python -m services.ingestion -------------------------------------------------------------------
def test_the_service_process_serves_and_stops_gracefully_on_sigterm(
    ensemble: tuple[Path, Manifest], ingestion_redis: str, torchserve: TorchServe, tmp_path: Path
) -> None:
    port, metrics_port = free_ports(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(
        CXR_INGESTION_ADDR=f"127.0.0.1:{port}",
        CXR_INGESTION_METRICS_PORT=str(metrics_port),
        CXR_REDIS_URL=ingestion_redis,
        CXR_TORCHSERVE_GRPC=torchserve.grpc_inference_address,
        CXR_TORCHSERVE_TOKEN_FILE=str(torchserve.settings.key_file),
        CXR_MODEL_DIR=str(ensemble[0]),
        CXR_GRACE_S="3",
    )
    log = tmp_path / "ingestion.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.ingestion"], cwd=REPO, env=env, stdout=out, stderr=out)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        wait_until(lambda: _serving(health), 90, "the service process to report SERVING", interval_s=0.3)
        r = analyze_file(pb_grpc.IngestionServiceStub(channel), dicom_bytes("RG1_J2KR.dcm"), skip_cache=True)
        assert len(r.findings) == len(ensemble[1].labels)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    assert "ingestion stopped" in text
    assert r.identity.sop_instance_uid not in text and r.identity.study_instance_uid not in text  # no UIDs logged


def _serving(health: health_pb2_grpc.HealthStub) -> bool:
    try:
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def test_the_uploaded_dicom_waits_in_redis_only_for_its_own_shorter_ttl(
    ensemble: tuple[Path, Manifest], ingestion_redis: str, torchserve: TorchServe, rds: redis.Redis
) -> None:
    settings = ingestion_settings(ensemble[0], ingestion_redis, torchserve, dicom_ttl_s=120)
    data = edited_dicom("siim_pneumothorax_negative.dcm")  # a new SOP instance: no cached result
    with running_server(settings) as one:
        r = analyze_file(one.stub, data)
    assert rds.get(dicom_key(r.job_id)) == data
    assert 0 < rds.ttl(dicom_key(r.job_id)) <= 120 < rds.ttl(f"cxr:job:{r.job_id}")
