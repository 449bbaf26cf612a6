"""The DICOM front door against real peers, without TorchServe: the Storage SCP in-process (real pynetdicom on a
free loopback port, real redis-server) reached by real dcmtk ``storescu`` and a pynetdicom SCU, and the results
sender delivering from the Redis outbox to a real dcmtk ``storescp`` that is down, comes up, and is replaced.

What needs an analysis (Orthanc pushing a study, results back in Orthanc, the bad-input corpus) is in
tests/e2e/test_dicom_network.py, against the whole stack (unit tests: tests/unit/test_dicom_front_door.py)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
import redis
from pynetdicom import AE
from support import DATA, RedisServer, free_port, wait_until

from cxr.dicom_results import dataset_bytes, source_header
from cxr.testing.dicom_peers import StoreSCP, start_storescp
from services.dicom.delivery import DeliveryLoop
from services.dicom.gateway import header_bytes
from services.dicom.metrics import DicomMetrics
from services.dicom.outbox import DEAD, OUTBOX, Outbox, delivery_key
from services.dicom.server import DicomServer
from services.dicom.settings import Destination, DicomSettings

pytestmark = pytest.mark.integration

DICOM = DATA / "dicom"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"


def fresh_copy(name: str, folder: Path) -> Path:
    """A real file with new UIDs, written to ``folder`` (so nothing is answered from a cache)."""
    ds = pydicom.dcmread(DICOM / name)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path)
    return path


def scp_settings(redis_url: str, **overrides: object) -> DicomSettings:
    """An SCP on a free loopback port whose ingestion API does not exist (nothing listens on its port)."""
    base = DicomSettings(
        addr="127.0.0.1:0", redis_url=redis_url, ingestion_addr=f"127.0.0.1:{free_port()}", metrics_port=0,
        allowed_aets=("PACS1", "STORESCU"), max_associations=2, overload_wait_s=1.0, acse_timeout_s=5,
        dimse_timeout_s=10, network_timeout_s=10, grace_s=1.0,
    )  # fmt: skip
    return replace(base, **overrides)  # type: ignore[arg-type]


@pytest.fixture()
def scp(redis_url: str) -> Iterator[DicomServer]:
    server = DicomServer(scp_settings(redis_url))
    server.start()
    try:
        yield server
    finally:
        server.stop(1.0)


def associate(port: int, calling: str, contexts: tuple[str, ...] = (VERIFICATION,)):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=calling)
    for context in contexts:
        ae.add_requested_context(context)
    ae.acse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="ANY-SCP")


def storescu(port: int, path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("storescu")
    assert binary, "dcmtk is not installed: apt-get install -y dcmtk"
    return subprocess.run([binary, "-d", *args, "127.0.0.1", str(port), str(path)], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip


# -- the Storage SCP ---------------------------------------------------------------------------------------------
def test_calling_ae_titles_off_the_allow_list_are_rejected(scp: DicomServer) -> None:
    assert scp.port is not None
    refused = associate(scp.port, "INTRUDER")
    assert refused.is_rejected
    rsp = refused.acceptor.primitive  # A-ASSOCIATE-RJ: rejected permanent, service user, calling AE not recognised
    assert (rsp.result, rsp.result_source, rsp.diagnostic) == (0x01, 0x01, 0x03)
    allowed = associate(scp.port, "PACS1")
    assert allowed.is_established
    assert allowed.send_c_echo().Status == 0x0000
    allowed.release()
    assert scp.metrics.associations.labels(outcome="rejected")._value.get() == 1


def test_associations_beyond_the_limit_are_rejected_transiently(scp: DicomServer) -> None:
    assert scp.port is not None
    held = [associate(scp.port, "PACS1") for _ in range(2)]
    assert all(a.is_established for a in held)
    extra = associate(scp.port, "PACS1")
    assert extra.is_rejected
    rsp = extra.acceptor.primitive  # rejected transient, service provider (presentation), local limit exceeded
    assert (rsp.result, rsp.result_source, rsp.diagnostic) == (0x02, 0x03, 0x02)
    for a in held:
        a.release()
    wait_until(lambda: not scp._server.active_associations, 10, "the held associations to close")  # type: ignore[union-attr]
    again = associate(scp.port, "PACS1")
    assert again.is_established
    again.release()


def test_storescu_gets_a_retry_status_while_the_api_is_down(scp: DicomServer, tmp_path: Path) -> None:
    assert scp.port is not None
    done = storescu(scp.port, fresh_copy("nih_no_finding_dx.dcm", tmp_path))  # calling AE STORESCU
    out = done.stdout + done.stderr
    assert "DIMSE Status                  : 0xa701: Refused: Out of resources" in out
    assert "ErrorComment" in out and "[UNAVAILABLE: " in out  # storescu -d prints the status detail
    assert scp.metrics.instances.labels(outcome="retry")._value.get() == 1
    assert scp.metrics.rejections.labels(reason="UNAVAILABLE")._value.get() == 1


def test_an_instance_over_the_size_cap_is_refused_for_good(redis_url: str, tmp_path: Path) -> None:
    server = DicomServer(scp_settings(redis_url, max_upload_bytes=200_000, spool_dir=tmp_path))
    port = server.start()
    try:
        ae = AE(ae_title="PACS1")
        ae.add_requested_context(CR_IMAGE_STORAGE, pydicom.uid.ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port)
        assert assoc.is_established
        status = assoc.send_c_store(pydicom.dcmread(DICOM / "RG1_UNCR.dcm"))  # 7 MB, streamed to the spool
        assoc.release()
    finally:
        server.stop(1.0)
    assert status.Status == 0xC002
    assert status.ErrorComment.startswith("TOO_LARGE: instance of 72")
    assert not list(tmp_path.iterdir())  # the spooled dataset is gone once answered


# -- the results sender ------------------------------------------------------------------------------------------
def findings_document() -> bytes:
    """A findings document as the TorchServe handler answers it (docs/ARCHITECTURE.md, "Wire format")."""
    members = ["densenet121", "resnet18"]
    findings = [
        {"label": label, "probability": p, "model_probabilities": dict.fromkeys(members, p), "votes": 2 if pos else 0,
         "n_models": 2, "threshold": 0.5, "positive": pos}
        for label, p, pos in (("Effusion", 0.81, True), ("No_Finding", 0.12, False))
    ]  # fmt: skip
    doc = {"model": {"name": "cxr-test", "version": "1.0.0", "members": members, "ensemble_rule": "ctp",
                     "intended_use": "tests"}, "labels": ["Effusion", "No_Finding"], "thresholds": [0.5, 0.5],
           "probabilities": [[0.81, 0.12], [0.81, 0.12]], "findings": findings}  # fmt: skip
    return json.dumps(doc).encode()


def queue_delivery(outbox: Outbox, name: str = "nih_no_finding_dx.dcm") -> tuple[str, pydicom.Dataset]:
    """Queue the delivery of a real file's results, as the gateway does after an analysis; (job id, source)."""
    source = source_header((DICOM / name).read_bytes())
    job_id = pydicom.uid.generate_uid(prefix=None).replace("2.25.", "")[:32].ljust(32, "0")
    assert outbox.add(job_id, dataset_bytes(source), findings_document(), time.time())
    return job_id, source


def sender_settings(redis_url: str, port: int, **overrides: object) -> DicomSettings:
    base = DicomSettings(redis_url=redis_url, destination=Destination("STORESCP", "127.0.0.1", port),
                         send_retry_s=0.2, send_retry_max_s=0.5, acse_timeout_s=5, dimse_timeout_s=10,
                         network_timeout_s=10, explanation_wait_s=1.0)  # fmt: skip
    return replace(base, **overrides)  # type: ignore[arg-type]


@pytest.fixture()
def rds(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    client.delete(OUTBOX, DEAD)
    yield client
    client.close()


def test_results_wait_out_a_destination_that_is_down_and_survive_a_restart(
    redis_url: str, rds: redis.Redis, tmp_path: Path
) -> None:
    port = free_port()  # storescp will listen here later; nothing does yet
    settings = sender_settings(redis_url, port)
    outbox = Outbox.from_url(redis_url, ttl_s=3600, max_pending=100)
    job_id, source = queue_delivery(outbox)
    assert not outbox.add(job_id, b"x", b"{}", time.time())  # one pending delivery per job
    first = DeliveryLoop(outbox, settings, DicomMetrics())
    first.start()
    wait_until(lambda: int(rds.hget(delivery_key(job_id), "attempts") or 0) >= 3, 30, "three failed attempts")
    first.stop(5)  # the front door goes down with the delivery still pending
    assert rds.zscore(OUTBOX, job_id) is not None
    assert b"could not be reached" in rds.hget(delivery_key(job_id), "last_error")  # type: ignore[operator]

    peer: StoreSCP = start_storescp(tmp_path / "received", port=port)
    second = DeliveryLoop(Outbox.from_url(redis_url, ttl_s=3600, max_pending=100), settings, DicomMetrics())
    second.start()  # a new process would do the same: everything it needs is in Redis
    try:
        files = wait_until(lambda: peer.received(), 60, "the results at storescp")
        wait_until(lambda: rds.zscore(OUTBOX, job_id) is None, 30, "the delivery to complete")
    finally:
        second.stop(5)
        peer.stop()
    assert not rds.exists(delivery_key(job_id))
    sr = pydicom.dcmread(files[0])
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR (no heatmaps: SR only)
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.PatientID == source.PatientID


def test_a_delivery_that_keeps_failing_is_dead_lettered_and_can_be_revived(
    redis_url: str, rds: redis.Redis, tmp_path: Path
) -> None:
    port = free_port()
    settings = sender_settings(redis_url, port, send_max_attempts=2)
    outbox = Outbox.from_url(redis_url, ttl_s=3600, max_pending=100)
    job_id, _ = queue_delivery(outbox)
    metrics = DicomMetrics()
    loop = DeliveryLoop(outbox, settings, metrics)
    loop.start()
    try:
        wait_until(lambda: rds.zscore(DEAD, job_id) is not None, 30, "the delivery to be dead-lettered")
    finally:
        loop.stop(5)
    assert rds.zscore(OUTBOX, job_id) is None and rds.exists(delivery_key(job_id))
    assert metrics.deliveries.labels(outcome="dead")._value.get() == 1
    assert outbox.counts() == (0, 1)
    assert outbox.retry_dead() == 1 and outbox.counts() == (1, 0)


def test_a_full_outbox_refuses_new_instances_until_the_destination_takes_them(redis_url: str, rds: redis.Redis) -> None:
    outbox = Outbox.from_url(redis_url, ttl_s=3600, max_pending=1)
    queue_delivery(outbox)
    from services.dicom.outbox import OutboxFullError

    with pytest.raises(OutboxFullError) as caught:
        outbox.check_room()
    assert caught.value.reason == "RESULTS_BACKLOG"


def test_a_delivery_keeps_the_source_header_never_its_pixels() -> None:
    data = (DICOM / "RG1_UNCR.dcm").read_bytes()
    header = header_bytes(data)
    assert len(header) < 10_000  # the delivery keeps the header, never the pixels
    again = pydicom.dcmread(io.BytesIO(header))
    assert again.SOPInstanceUID == pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
