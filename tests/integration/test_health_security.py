"""Health that tells the truth, bounded uploads, a Redis at its memory limit, TLS and mutual TLS, purging a study,
stored data that expires: the real ingestion gRPC server in-process, a REAL TorchServe (token auth on) serving a
tiny random ensemble, real redis-servers (one with the production settings of ``cxr.stack.redis_config``), the
real ``cxr`` command, certificates made by openssl. TorchServe starts once for the module."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pydicom
import pytest
import redis
from fault_fixtures import NOT_SERVING, SERVING, DurableRedis, health_status, wait_health
from ingestion_fixtures import (
    REPO,
    Running,
    dicom_bytes,
    edited_dicom,
    ensemble,
    ingestion_redis,
    ingestion_settings,
    job_keys,
    queued_job_ids,
    rds,
    refusal,
    requests_for,
    running_server,
    torchserve,
    wait_until,
)
from ingestion_fixtures import analyze as analyze_file

from cxr.core.errors import NotFoundError
from cxr.core.jobs import JOB_BLOBS, blob_key, job_key, study_key
from cxr.core.manifest import Manifest
from cxr.ingestion.v1 import ingestion_pb2 as pb
from cxr.ingestion.v1 import ingestion_pb2_grpc as pb_grpc
from cxr.serving.torchserve_process import TorchServe
from cxr.stack.health import grpc_serving
from cxr.stack.testing_pki import TestPKI, make_test_pki
from cxr.tls import ClientTLS, make_channel
from services.worker.job_state import JobStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

__all__ = ["ensemble", "ingestion_redis", "rds", "torchserve"]  # fixtures used by name

CXR = REPO / ".venv" / "bin" / "cxr"
INTERVAL_S, PROBE_TIMEOUT_S = 0.5, 2.0
# NOT_SERVING is due within one period plus one bounded check; the slack absorbs a loaded 2-core CI machine
HEALTH_BOUND_S = INTERVAL_S + PROBE_TIMEOUT_S + 2.0 + 3.0
FAST = {"health_interval_s": INTERVAL_S, "health_timeout_s": PROBE_TIMEOUT_S}


def settings_for(ensemble_dir: Path, redis_url: str, ts: TorchServe, **overrides: Any) -> Any:
    return ingestion_settings(ensemble_dir, redis_url, ts, **{**FAST, **overrides})


def dependency(running: Running, name: str) -> int | None:
    return health_status(running.channel, f"dependency/{name}")


# -- health follows the dependencies ----------------------------------------------------------------------------
def test_health_turns_not_serving_while_torchserve_hangs_and_serving_once_it_answers(
    ensemble: tuple[Path, Manifest], ingestion_redis: str, torchserve: TorchServe
) -> None:
    settings = settings_for(ensemble[0], ingestion_redis, torchserve, inference_timeout_s=3.0, inference_retries=0)
    java = torchserve.pid
    assert java is not None
    with running_server(settings) as svc:
        assert health_status(svc.channel) == SERVING and dependency(svc, "torchserve") == SERVING
        os.kill(java, signal.SIGSTOP)  # TorchServe stops answering (a hung JVM), without exiting
        try:
            took_down = wait_health(svc.channel, NOT_SERVING, HEALTH_BOUND_S)
            assert dependency(svc, "torchserve") == NOT_SERVING and dependency(svc, "redis") == SERVING
            assert svc.metric("cxr_ingestion_dependency_up", dependency="torchserve") == 0
            started = time.monotonic()
            r = refusal(lambda: analyze_file(svc.stub, dicom_bytes("nih_no_finding_dx.dcm"), skip_cache=True))
            assert (r.code, r.reason) == (grpc.StatusCode.UNAVAILABLE, "INFERENCE_UNAVAILABLE")
            assert time.monotonic() - started < settings.inference_timeout_s + 3  # refused, never a hang
        finally:
            os.kill(java, signal.SIGCONT)
        took_up = wait_health(svc.channel, SERVING, HEALTH_BOUND_S + settings.inference_timeout_s)
        assert svc.metric("cxr_ingestion_dependency_up", dependency="torchserve") == 1
        assert len(analyze_file(svc.stub, dicom_bytes("nih_no_finding_dx.dcm"), skip_cache=True).findings) > 0
    print(f"torchserve hung: NOT_SERVING after {took_down:.2f} s; answering again: SERVING after {took_up:.2f} s")


def test_a_full_redis_refuses_new_work_with_store_full_and_never_evicts_queued_work(
    ensemble: tuple[Path, Manifest], torchserve: TorchServe, tmp_path: Path
) -> None:
    with limited_redis(tmp_path, "8mb") as (server, client):
        with running_server(settings_for(ensemble[0], server.url, torchserve)) as svc:
            queued = analyze_file(svc.stub, edited_dicom("siim_pneumothorax_negative.dcm"))
            assert queued_job_ids(client) == [queued.job_id]
            filled = fill_until_oom(client)
            assert filled > 0
            r = refusal(lambda: analyze_file(svc.stub, edited_dicom("nih_no_finding_dx.dcm")))
            assert (r.code, r.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "STORE_FULL")
            wait_health(svc.channel, NOT_SERVING, HEALTH_BOUND_S)
            assert dependency(svc, "redis") == NOT_SERVING
            # nothing was evicted: the queued job, its message and its inputs are all still there
            assert queued_job_ids(client) == [queued.job_id]
            assert client.hget(job_key(queued.job_id), "status") == b"queued"
            assert all(client.exists(blob_key(queued.job_id, n)) for n in ("input", "dicom", "findings"))
            client.delete(*[f"filler:{i}" for i in range(filled)])  # memory freed (as TTLs do)
            wait_health(svc.channel, SERVING, HEALTH_BOUND_S)
            assert analyze_file(svc.stub, edited_dicom("nih_no_finding_dx.dcm")).job_id


def test_uploads_stop_short_of_the_limit_so_that_queued_explanations_can_finish(
    ensemble: tuple[Path, Manifest], torchserve: TorchServe, tmp_path: Path
) -> None:
    with limited_redis(tmp_path, "32mb") as (server, client):
        with running_server(settings_for(ensemble[0], server.url, torchserve)) as svc:
            upload = edited_dicom("nih_no_finding_dx.dcm")
            limit = int(client.info("memory")["maxmemory"])

            def used() -> int:
                return int(client.info("memory")["used_memory"])

            i = 0
            while used() + len(upload) <= limit * 0.96:
                client.set(f"filler:{i}", b"x" * 64 * 1024)
                i += 1
            assert used() + len(upload) < limit  # Redis itself would still take this upload
            r = refusal(lambda: analyze_file(svc.stub, upload))
            assert (r.code, r.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "STORE_FULL")
            assert "nearly full" in r.details and not queued_job_ids(client)
            client.set("a-worker-write", b"x" * 256 * 1024)  # the room left is the workers': their writes pass
            assert analyze_file(svc.stub, upload, skip_explanation=True).findings  # a small job still fits: answered


@contextmanager
def limited_redis(tmp_path: Path, maxmemory: str) -> Iterator[tuple[DurableRedis, redis.Redis]]:
    """A durable redis-server of its own with a small memory limit, and a client of it; both stopped after."""
    server = DurableRedis(tmp_path / "redis", maxmemory=maxmemory)
    server.start()
    client = server.client()
    try:
        yield server, client
    finally:
        client.close()
        server.stop()


def fill_until_oom(client: redis.Redis, value_bytes: int = 64 * 1024) -> int:
    """Write keys without a TTL until Redis refuses (maxmemory, noeviction); return how many were written."""
    for i in range(10_000):
        try:
            client.set(f"filler:{i}", b"x" * value_bytes)
        except redis.exceptions.OutOfMemoryError:
            return i
    pytest.fail("Redis never reached its memory limit")


# -- an upload that goes silent ----------------------------------------------------------------------------------
def silent_after(first: list[pb.AnalyzeRequest], release: threading.Event) -> Iterator[pb.AnalyzeRequest]:
    """Sends ``first``, then nothing until ``release`` (at most 60 s), keeping the stream open."""
    yield from first
    release.wait(60)


@pytest.mark.parametrize("sent", [0, 2], ids=["nothing-sent", "silent-after-a-chunk"])
def test_a_silent_upload_is_cut_after_the_idle_limit(
    ensemble: tuple[Path, Manifest], ingestion_redis: str, torchserve: TorchServe, rds: redis.Redis, sent: int
) -> None:
    settings = settings_for(ensemble[0], ingestion_redis, torchserve, upload_idle_s=1.0, max_concurrent=1)
    data = edited_dicom("siim_pneumothorax_negative.dcm")
    keys = job_keys(rds)
    release = threading.Event()
    with running_server(settings) as svc:
        started = time.monotonic()
        try:
            r = refusal(lambda: svc.stub.Analyze(silent_after(list(requests_for(data))[:sent], release), timeout=60))
        finally:
            release.set()
        took = time.monotonic() - started
        assert (r.code, r.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "UPLOAD_IDLE_TIMEOUT")
        assert 1.0 <= took < 10, took
        assert job_keys(rds) == keys  # nothing stored
        wait_until(lambda: not _upload_readers(), 10, "the upload reader threads to end")
        assert svc.metric("cxr_ingestion_in_flight") == 0
        assert analyze_file(svc.stub, data).job_id  # the only concurrency slot was given back
        assert svc.metric("cxr_ingestion_rejections_total", reason="UPLOAD_IDLE_TIMEOUT") == 1


def _upload_readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "upload-reader"]


# -- TLS and mutual TLS ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def tls_stub(port: int, tls: ClientTLS | None) -> tuple[grpc.Channel, pb_grpc.IngestionServiceStub]:
    channel = make_channel(f"127.0.0.1:{port}", tls)
    return channel, pb_grpc.IngestionServiceStub(channel)


def test_a_tls_server_serves_tls_clients_and_refuses_plaintext(
    ensemble: tuple[Path, Manifest], ingestion_redis: str, torchserve: TorchServe, pki: TestPKI
) -> None:
    # default health period and probe bound: a busy CI machine must not make the model look down here
    settings = ingestion_settings(
        ensemble[0], ingestion_redis, torchserve, tls_cert=pki.server_cert, tls_key=pki.server_key
    )
    server_tls = ClientTLS(ca=pki.ca)
    with running_server(settings, channel_tls=server_tls) as svc:
        port = svc.server.port
        assert port is not None
        assert len(analyze_file(svc.stub, dicom_bytes("RG1_UNCR.dcm"), skip_cache=True).findings) > 0
        assert grpc_serving(f"127.0.0.1:{port}", timeout_s=15, tls=server_tls)  # (a TLS handshake on a busy CI box)
        assert not grpc_serving(f"127.0.0.1:{port}", timeout_s=15)  # plaintext health check: refused
        for tls in (None, ClientTLS(ca=pki.rogue_ca)):  # plaintext; TLS that does not trust the server
            channel, stub = tls_stub(port, tls)
            with channel:
                r = refusal(lambda s=stub: analyze_file(s, dicom_bytes("RG1_UNCR.dcm")))  # type: ignore[misc]
            assert r.code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_clients_without_the_right_certificate(
    ensemble: tuple[Path, Manifest],
    ingestion_redis: str,
    torchserve: TorchServe,
    pki: TestPKI,
    rds: redis.Redis,
    tmp_path: Path,
) -> None:
    settings = ingestion_settings(
        ensemble[0], ingestion_redis, torchserve, tls_cert=pki.server_cert, tls_key=pki.server_key,
        tls_client_ca=pki.ca,
    )  # fmt: skip
    good = ClientTLS(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    data = edited_dicom("nih_no_finding_dx.dcm")
    with running_server(settings, channel_tls=good) as svc:
        port = svc.server.port
        assert port is not None
        keys = job_keys(rds)
        for tls in (ClientTLS(ca=pki.ca), ClientTLS(ca=pki.ca, cert=pki.rogue_cert, key=pki.rogue_key)):
            channel, stub = tls_stub(port, tls)
            with channel:
                r = refusal(lambda s=stub: analyze_file(s, data))  # type: ignore[misc]
            assert r.code == grpc.StatusCode.UNAVAILABLE  # the handshake fails: no request reached the service
        assert job_keys(rds) == keys
        assert len(analyze_file(svc.stub, data).findings) == len(ensemble[1].labels)
        upload = tmp_path / "image.dcm"
        upload.write_bytes(data)
        cli = [str(CXR), "analyze", "--json", "--address", f"127.0.0.1:{port}", str(upload)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
        with_cert = _run(cli + ["--ca", str(pki.ca), "--cert", str(pki.client_cert), "--key", str(pki.client_key)], env)
        assert with_cert.returncode == 0, with_cert.stderr
        assert json.loads(with_cert.stdout)["ok"] is True
        by_env = _run(cli, {**env, "CXR_TLS_CA": str(pki.ca), "CXR_TLS_CLIENT_CERT": str(pki.client_cert),
                            "CXR_TLS_CLIENT_KEY": str(pki.client_key)})  # fmt: skip
        assert by_env.returncode == 0 and json.loads(by_env.stdout)["cached"] is True, by_env.stderr
        without = _run(cli + ["--ca", str(pki.ca)], env)
        assert without.returncode == 1 and json.loads(without.stdout)["error"]["code"] == "UNAVAILABLE"
        half = _run(cli + ["--ca", str(pki.ca), "--cert", str(pki.client_cert)], env)
        assert half.returncode == 2 and "together" in half.stderr


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)


# -- stored data expires; a study can be purged ------------------------------------------------------------------
def study_dicom(name: str, study_uid: str) -> bytes:
    return edited_dicom(name, StudyInstanceUID=study_uid)


def test_every_stored_key_expires_and_a_study_is_purged_on_request(
    ensemble: tuple[Path, Manifest], ingestion_redis: str, torchserve: TorchServe, rds: redis.Redis
) -> None:
    study, other = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    settings = settings_for(ensemble[0], ingestion_redis, torchserve)
    with running_server(settings) as svc:
        purged = [analyze_file(svc.stub, study_dicom(n, study)) for n in ("RG1_UNCR.dcm", "nih_no_finding_dx.dcm")]
        kept = analyze_file(svc.stub, study_dicom("RG1_UNCR.dcm", other))
        for key in rds.scan_iter("cxr:*"):
            assert 0 < rds.ttl(key) <= settings.result_ttl_s, key  # nothing is kept forever
        assert rds.exists(study_key(study)) and rds.exists(job_key(purged[0].job_id))
        command = [str(CXR), "purge", "--study", study, "--redis-url", ingestion_redis, "--json"]
        done = _run(command, dict(os.environ))
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["jobs"] == 2 and report["keys_deleted"] >= 2 * 4 + 3  # hash + 3 blobs per job, 2 results, index
        assert study not in done.stdout  # echoed hashed only
        for response in purged:
            assert not list(rds.scan_iter(f"{job_key(response.job_id)}*"))
            request = pb.GetExplanationRequest(job_id=response.job_id)
            assert refusal(lambda q=request: svc.stub.GetExplanation(q, timeout=10)).code == grpc.StatusCode.NOT_FOUND  # type: ignore[misc]
        assert not rds.exists(study_key(study))
        assert rds.exists(job_key(kept.job_id)) and rds.exists(study_key(other))  # the other study is untouched
        assert json.loads(_run(command, dict(os.environ)).stdout)["jobs"] == 0


def test_a_worker_never_writes_into_a_purged_job(ingestion_redis: str, rds: redis.Redis) -> None:
    store = JobStore(redis.Redis.from_url(ingestion_redis), ttl_s=60)
    job_id = os.urandom(16).hex()
    rds.hset(job_key(job_id), mapping={"status": "running"})
    rds.expire(job_key(job_id), 60)
    rds.delete(job_key(job_id))  # purged while the worker computed
    with pytest.raises(NotFoundError):
        store.finish(job_id, b"heatmaps", b"display")
    with pytest.raises(NotFoundError):
        store.set_progress(job_id, 0.5, "computing")
    assert not any(rds.exists(blob_key(job_id, n)) for n in JOB_BLOBS)
    assert not rds.exists(job_key(job_id))
