"""The whole local stack with mutual TLS on the gRPC API, driven as an operator drives it: `cxr up` (its own
health probe presents a client certificate), real DICOM files carrying a patient's name and id sent through the
API (`cxr analyze --ca --cert --key --json --wait`, good and rejected files) and through the DICOM front door
(dcmtk `storescu`), then every log file of every service and every metrics endpoint searched for the patient's
identifiers; every listening socket on loopback; `cxr purge` removing the study from Redis; and `cxr status`
naming a dependency that is down after redis-server is killed. Free loopback ports, a temporary CXR_HOME, a tiny
random ensemble (64 px). The tests of this module run in order against one stack."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pydicom
import pytest
import redis

from cxr.core.manifest import Manifest
from cxr.models.testing import make_random_ensemble
from cxr.stack.testing import free_port_env
from cxr.stack.testing_pki import TestPKI, make_test_pki

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DICOM = REPO.parent / "shared" / "data" / "dicom"
CXR = REPO / ".venv" / "bin" / "cxr"
# The patient: identifiers that must never appear in a log line or a metric
PATIENT_NAME, PATIENT_ID, ACCESSION = "Zebedee^Canary^Quill", "PID-CANARY-73914", "ACC-CANARY-55820"
IDENTIFIERS = (PATIENT_NAME, PATIENT_NAME.replace("^", " "), "Zebedee", PATIENT_ID, ACCESSION)


@dataclass
class Stack:
    env: dict[str, str]
    cwd: Path
    home: Path
    manifest: Manifest
    pki: TestPKI
    study_uid: str

    def run(self, *args: str, timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(CXR), *args], env={**self.env, **extra_env}, cwd=self.cwd, capture_output=True,
                              text=True, timeout=timeout, check=False)  # fmt: skip

    def state(self) -> dict[str, Any]:
        return dict(json.loads((self.home / "stack.json").read_text()))

    def status(self) -> dict[str, Any]:
        done = self.run("status", "--json", timeout=60)
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))


def patient_dicom(name: str, study_uid: str, **attributes: Any) -> pydicom.Dataset:
    """A real file as a new instance of the canary patient's study."""
    ds = pydicom.dcmread(DICOM / name)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.PatientName, ds.PatientID, ds.AccessionNumber = PATIENT_NAME, PATIENT_ID, ACCESSION
    ds.PatientBirthDate = "19610407"
    for key, value in attributes.items():
        setattr(ds, key, value)
    return ds


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("secure-stack")
    manifest = make_random_ensemble(root / "model", size=64)
    pki = make_test_pki(root / "pki")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(free_port_env(), CXR_HOME=str(root / "home"), CXR_MODEL_DIR=str(root / "model"))
    env.update(CXR_OVERLAY_MAX_SIDE="256", CXR_STACK_START_TIMEOUT_S="400", CXR_STACK_STOP_GRACE_S="20",
               CXR_HEALTH_INTERVAL_S="1", CXR_HEALTH_TIMEOUT_S="30", CXR_REDIS_MAXMEMORY="256mb",
               CXR_INFERENCE_TIMEOUT_S="120")  # fmt: skip
    env.update(CXR_TLS_CERT=str(pki.server_cert), CXR_TLS_KEY=str(pki.server_key), CXR_TLS_CLIENT_CA=str(pki.ca))
    env.update(CXR_TLS_CA=str(pki.ca), CXR_TLS_CLIENT_CERT=str(pki.client_cert), CXR_TLS_CLIENT_KEY=str(pki.client_key))
    st = Stack(env, root, root / "home", manifest, pki, pydicom.uid.generate_uid())
    try:
        up = st.run("up", timeout=1200)
        assert up.returncode == 0, f"cxr up failed:\n{up.stdout}\n{up.stderr}"
        yield st
    finally:
        state = st.state() if (st.home / "stack.json").exists() else {"services": {}}
        st.run("down", timeout=180)
        for svc in state["services"].values():  # never leave a process of this test behind
            if _alive(svc["pid"], svc["create_time"]):
                os.killpg(os.getpgid(svc["pid"]), signal.SIGKILL)


def _alive(pid: int, create_time: float) -> bool:
    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - create_time) < 1 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_up_serves_mutual_tls_and_refuses_a_client_without_a_certificate(stack: Stack) -> None:
    status = stack.status()
    assert status["up"] is True, status
    assert status["services"]["ingestion"]["dependencies"] == {"redis": "up", "torchserve": "up"}
    path = str(DICOM / "siim_pneumothorax_negative.dcm")
    no_cert = stack.run("analyze", "--json", path, CXR_TLS_CLIENT_CERT="", CXR_TLS_CLIENT_KEY="")
    assert no_cert.returncode == 1 and json.loads(no_cert.stdout)["error"]["code"] == "UNAVAILABLE"
    plain = stack.run("analyze", "--json", path, CXR_TLS_CA="", CXR_TLS_CLIENT_CERT="", CXR_TLS_CLIENT_KEY="")
    assert plain.returncode == 1 and json.loads(plain.stdout)["error"]["code"] == "UNAVAILABLE"


def test_every_listening_socket_of_the_stack_is_on_loopback(stack: Stack) -> None:
    listening = []
    for svc in stack.state()["services"].values():
        group = os.getpgid(svc["pid"])
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(proc.pid) != group:
                    continue
                listening += [c.laddr for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN]
            except (ProcessLookupError, psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    ports = {int(stack.env[v]) for v in stack.env if v.startswith("CXR_") and v.endswith("_PORT")}
    assert ports <= {a.port for a in listening}, "every configured port is listened on"
    exposed = [a for a in listening if a.ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]  # Java: IPv4-mapped
    assert not exposed, exposed


def test_patient_identifiers_never_reach_a_log_or_a_metric(stack: Stack) -> None:
    out = stack.cwd / "files"
    out.mkdir()
    files = {
        "good-cr": patient_dicom("RG1_UNCR.dcm", stack.study_uid),
        "good-dx": patient_dicom("nih_no_finding_dx.dcm", stack.study_uid),
        "ct": patient_dicom("siim_pneumothorax_negative.dcm", stack.study_uid, Modality="CT"),
        "lateral": patient_dicom("siim_pneumothorax_negative.dcm", stack.study_uid, ViewPosition="LL"),
        "no-pixels": patient_dicom("cr_header_only_no_pixels.dcm", stack.study_uid),
    }
    for name, ds in files.items():
        ds.save_as(out / f"{name}.dcm")
    paths = [str(out / f"{name}.dcm") for name in files]
    done = stack.run("analyze", "--json", "--wait", "--timeout", "120", "--out", str(stack.cwd / "png"), *paths)
    rows = {Path(r["file"]).stem: r for r in map(json.loads, done.stdout.splitlines())}
    assert rows["good-cr"]["ok"] and rows["good-dx"]["ok"], done.stdout + done.stderr
    assert {rows[n]["explanation"]["status"] for n in ("good-cr", "good-dx")} == {"done"}
    assert [rows[n]["error"]["reason"] for n in ("ct", "lateral", "no-pixels")] == [
        "UNSUPPORTED_MODALITY", "LATERAL_VIEW", "NO_PIXEL_DATA",
    ]  # fmt: skip
    door = patient_dicom("nih_no_finding_dx.dcm", stack.study_uid)  # uncompressed: storescu sends it as is
    door.save_as(out / "door.dcm")
    _storescu(stack, out / "door.dcm")
    _wait_idle(stack)  # the worker explained the door's instance too: every service has had its say in the logs
    assert PATIENT_ID.encode() in _append_only_files(stack)  # control: the identifiers did go through the stack
    logs = _log_files(stack.home)
    assert {p.name for p in logs} >= {"redis.log", "ingestion.log", "worker.log", "ts_log.log", "model_log.log"}
    texts = {str(p): p.read_bytes() for p in logs}
    texts.update({url: _scrape(url) for url in _metrics_urls(stack)})
    texts["cxr analyze --json"] = done.stdout.encode() + done.stderr.encode()
    uids = (stack.study_uid, *(str(ds.SOPInstanceUID) for ds in files.values()))
    for where, text in texts.items():
        for secret in IDENTIFIERS:
            assert secret.encode() not in text, f"{secret!r} found in {where}"
        if not where.startswith("cxr analyze"):  # the API answers with the UIDs; nothing else shows them
            for uid in uids:
                assert uid.encode() not in text, f"a UID was found in {where}"


def test_purge_removes_the_patients_data_from_redis(stack: Stack) -> None:
    client = redis.Redis.from_url(_redis_url(stack), socket_timeout=10)
    try:
        assert _keys_holding(client, stack.study_uid.encode())  # the stored answers echo the study's UIDs
        done = stack.run("purge", "--study", stack.study_uid, "--json")  # Redis: the local stack's
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["jobs"] >= 3 and report["disk_rewrite"] is True, report  # 2 via the API, 1 via the door
        for needle in (stack.study_uid, PATIENT_ID, PATIENT_NAME):
            assert not _keys_holding(client, needle.encode()), needle

        def rewritten() -> bool:
            info = client.info("persistence")
            return not (info["aof_rewrite_in_progress"] or info["aof_rewrite_scheduled"])

        deadline = time.monotonic() + 60
        while not rewritten() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rewritten() and PATIENT_ID.encode() not in _append_only_files(stack)  # gone from disk too
    finally:
        client.close()


def test_status_names_the_dependency_that_is_down(stack: Stack) -> None:
    redis_pid = stack.state()["services"]["redis"]["pid"]
    os.kill(redis_pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ingestion = stack.status()["services"]["ingestion"]
        if ingestion["state"] == "unhealthy" and ingestion.get("dependencies", {}).get("redis") == "down":
            break
        time.sleep(0.5)
    status = stack.status()
    assert status["up"] is False and status["services"]["redis"]["state"] == "stopped"
    assert status["services"]["ingestion"]["state"] == "unhealthy"
    assert status["services"]["ingestion"]["dependencies"]["redis"] == "down"
    table = stack.run("status", timeout=60)
    assert "unhealthy (redis down)" in " ".join(table.stdout.split())


# -- helpers -----------------------------------------------------------------------------------------------------
def _storescu(stack: Stack, path: Path) -> None:
    binary = shutil.which("storescu")
    assert binary, "dcmtk is not installed: apt-get install -y dcmtk"
    host, port = stack.status()["services"]["dicom"]["address"].rsplit(":", 1)
    done = subprocess.run([binary, host, port, str(path)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def _wait_idle(stack: Stack) -> None:
    """Wait (bounded) until no explanation is queued or running."""
    client = redis.Redis.from_url(_redis_url(stack), socket_timeout=10)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (client.llen("explain") or client.hlen("unacked")):
            time.sleep(0.5)
        assert not (client.llen("explain") or client.hlen("unacked")), "explanations still pending after 120 s"
    finally:
        client.close()


def _redis_url(stack: Stack) -> str:
    return f"redis://127.0.0.1:{stack.env['CXR_REDIS_PORT']}/0"


def _append_only_files(stack: Stack) -> bytes:
    """Everything Redis has on disk (its append-only files) in one blob."""
    return b"".join(p.read_bytes() for p in sorted((stack.home / "redis").rglob("*.aof")) if p.is_file())


def _log_files(home: Path) -> list[Path]:
    """Every log of every service under CXR_HOME (ours, redis-server's, TorchServe's frontend, worker, access and
    metrics logs)."""
    return sorted(p for p in home.rglob("*.log") if p.is_file())


def _metrics_urls(stack: Stack) -> list[str]:
    return [s["metrics_url"] for s in stack.status()["services"].values() if s.get("metrics_url")]


def _scrape(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return bytes(reply.read())


def _holds(client: redis.Redis, key: bytes, needle: bytes) -> bool:
    kind = client.type(key)
    if kind == b"string":
        return needle in (client.get(key) or b"")  # type: ignore[operator]
    if kind == b"hash":
        return any(needle in v for v in client.hvals(key))  # type: ignore[union-attr]
    return False


def _keys_holding(client: redis.Redis, needle: bytes) -> list[bytes]:
    return [k for k in client.scan_iter("cxr:*") if _holds(client, k, needle)]
