"""The DICOM front door in the whole stack, driven as a hospital drives it: the real `cxr up` (redis-server,
TorchServe, ingestion, worker and the DICOM front door as detached processes) with a real Orthanc as the PACS on
the other end. Orthanc pushes a study to our SCP through its REST API ("send to modality"), our results (SR +
Secondary Captures) arrive back in Orthanc and are read from its REST API; a plain dcmtk `storescu` reaches the
address `cxr status --json` gives; the bad-input corpus (cxr.testing.bad_dicom, generated from the real files)
goes through both doors with good files in between; the load script runs a tiny smoke load.

Everything on free loopback ports in a temporary CXR_HOME; the served model is a tiny random ensemble (64 px).
The tests of this module run in order against one stack."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pydicom
import pytest
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config

from cxr.client import ClientError, IngestionClient
from cxr.core.manifest import Manifest
from cxr.models.testing import make_random_ensemble
from cxr.stack.testing import free_port_env
from cxr.testing.bad_dicom import OK, Case, build_corpus, reference
from cxr.testing.dicom_peers import Orthanc, start_orthanc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
DICOM = DATA / "dicom"
CXR = REPO / ".venv" / "bin" / "cxr"
SR_CLASS, SC_CLASS = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"
PROBABILITY_TOLERANCE = 2e-3  # same pixels, other encoding: the same findings up to float rounding


@dataclass
class Stack:
    env: dict[str, str]
    cwd: Path
    home: Path
    manifest: Manifest
    orthanc: Orthanc

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(CXR), *args], env=self.env, cwd=self.cwd, capture_output=True, text=True,
                              timeout=timeout, check=False)  # fmt: skip

    def status(self) -> dict[str, Any]:
        done = self.run("status", "--json", timeout=60)
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    @property
    def dicom_port(self) -> int:
        return int(self.env["CXR_DICOM_PORT"])

    @property
    def ingestion(self) -> str:
        return f"127.0.0.1:{self.env['CXR_INGESTION_PORT']}"

    def pids(self) -> dict[str, int]:
        state = json.loads((self.home / "stack.json").read_text())
        return {name: rec["pid"] for name, rec in state["services"].items()}

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in (self.home / "logs").glob("*.log"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("dicom-stack")
    manifest = make_random_ensemble(root / "model", size=64)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(free_port_env(), CXR_HOME=str(root / "home"), CXR_MODEL_DIR=str(root / "model"))
    env.update(CXR_OVERLAY_MAX_SIDE="256", CXR_STACK_START_TIMEOUT_S="400", CXR_STACK_STOP_GRACE_S="20")
    # a busy 2-core machine: one torch thread per process, and readiness probes that wait for a slow first answer
    env.update(CXR_STARTUP_WAIT_S="380", CXR_TORCH_THREADS="1", CXR_HEALTH_TIMEOUT_S="60", CXR_HEALTH_INTERVAL_S="30")
    orthanc = start_orthanc(root / "orthanc", modalities={"cxr": ("CXR", "127.0.0.1", int(env["CXR_DICOM_PORT"]))})
    env.update(CXR_DICOM_DESTINATION=f"{orthanc.ae_title}@127.0.0.1:{orthanc.dicom_port}",
               CXR_DICOM_SEND_RETRY_S="0.5", CXR_DICOM_SEND_RETRY_MAX_S="5")  # fmt: skip
    st = Stack(env=env, cwd=root, home=root / "home", manifest=manifest, orthanc=orthanc)
    try:
        up = st.run("up", timeout=500)
        assert up.returncode == 0, f"cxr up failed:\n{up.stdout}\n{up.stderr}"
        yield st
    finally:
        state = json.loads((st.home / "stack.json").read_text()) if (st.home / "stack.json").exists() else {}
        st.run("down", timeout=120)
        for rec in state.get("services", {}).values():  # never leave a process behind a failed test
            if psutil.pid_exists(rec["pid"]) and abs(psutil.Process(rec["pid"]).create_time() - rec["create_time"]) < 1:
                os.killpg(os.getpgid(rec["pid"]), signal.SIGKILL)
        orthanc.stop()


def fresh(name: str, study: str | None = None) -> pydicom.Dataset:
    """A real file with a new SOP instance (and series; ``study`` or a new study) UID."""
    ds = pydicom.dcmread(DICOM / name)
    ds.StudyInstanceUID = study or pydicom.uid.generate_uid()
    ds.SeriesInstanceUID, ds.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def part10(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# -- the front door in `cxr up` / `cxr status` -------------------------------------------------------------------
def test_status_gives_the_scp_address_and_ae_title(stack: Stack) -> None:
    dicom = stack.status()["services"]["dicom"]
    assert dicom["state"] == "ready"
    assert dicom["address"] == f"127.0.0.1:{stack.dicom_port}"
    assert dicom["ae_title"] == "CXR"
    assert dicom["metrics_url"] == f"http://127.0.0.1:{stack.env['CXR_DICOM_METRICS_PORT']}/metrics"


def test_a_plain_storescu_to_the_status_address_is_analysed(stack: Stack, tmp_path: Path) -> None:
    host, port = stack.status()["services"]["dicom"]["address"].rsplit(":", 1)
    path = tmp_path / "plain.dcm"
    fresh("nih_no_finding_dx.dcm").save_as(path)
    binary = shutil.which("storescu")
    assert binary, "dcmtk is not installed: apt-get install -y dcmtk"
    done = subprocess.run([binary, "-v", host, port, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Received Store Response (Success)" in done.stdout + done.stderr
    with IngestionClient(stack.ingestion) as client:  # the same pipeline analysed it: the API has it cached
        again = client.analyze(path)
    assert again.cached is True
    assert [f.label for f in again.findings] == list(stack.manifest.labels)


# -- Orthanc pushes a study; the results come back into Orthanc ------------------------------------------------
def test_orthanc_pushes_a_study_and_gets_the_results_back(stack: Stack) -> None:
    orthanc = stack.orthanc
    study_uid = pydicom.uid.generate_uid()
    sources = [fresh(name, study_uid) for name in ("nih_no_finding_dx.dcm", "siim_pneumothorax_negative.dcm")]
    sources[1].PatientID, sources[1].PatientName = sources[0].PatientID, sources[0].PatientName  # one study
    uploaded = [orthanc.upload(part10(ds)) for ds in sources]
    study = uploaded[0]["ParentStudy"]
    assert uploaded[1]["ParentStudy"] == study
    job = orthanc.rest("/modalities/cxr/store", {"Resources": [study], "Synchronous": True})
    assert job["InstancesCount"] == 2 and job["FailedInstancesCount"] == 0, job

    source_uids = {str(ds.SOPInstanceUID) for ds in sources}

    def results() -> list[dict[str, Any]]:  # (the SIIM source is itself a Secondary Capture: not a result)
        tags = [orthanc.instance_tags(i["ID"]) for i in orthanc.rest(f"/studies/{study}/instances")]
        return [t for t in tags if t["SOPClassUID"] in (SR_CLASS, SC_CLASS) and t["SOPInstanceUID"] not in source_uids]

    deadline = time.monotonic() + 240
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        found = results()
        if sum(t["SOPClassUID"] == SR_CLASS for t in found) == 2 and _captures_complete(found, sources):
            break
        time.sleep(1)
    reports = [t for t in found if t["SOPClassUID"] == SR_CLASS]
    assert len(reports) == 2, f"{len(found)} results in Orthanc after 240 s:\n{stack.logs()[-3000:]}"
    for sr in reports:
        assert sr["StudyInstanceUID"] == study_uid and sr["PatientID"] == sources[0].PatientID
        evidence = {
            ref["ReferencedSOPInstanceUID"]
            for item in sr["CurrentRequestedProcedureEvidenceSequence"]
            for series in item["ReferencedSeriesSequence"]
            for ref in series["ReferencedSOPSequence"]
        }
        assert len(evidence) == 1 and evidence <= source_uids  # each SR references the one image it reports on
    captures = [t for t in found if t["SOPClassUID"] == SC_CLASS]
    assert captures and all(t["StudyInstanceUID"] == study_uid for t in captures)
    referenced = {ref["ReferencedSOPInstanceUID"] for t in captures for ref in t["SourceImageSequence"]}
    assert referenced == source_uids  # every source image has its heatmap captures


def _captures_complete(found: list[dict[str, Any]], sources: list[pydicom.Dataset]) -> bool:
    referenced = {ref["ReferencedSOPInstanceUID"] for t in found if t["SOPClassUID"] == SC_CLASS
                  for ref in t.get("SourceImageSequence", [])}  # fmt: skip
    return referenced >= {str(ds.SOPInstanceUID) for ds in sources}


def test_no_patient_identifier_reaches_any_log(stack: Stack) -> None:
    source = pydicom.dcmread(DICOM / "nih_no_finding_dx.dcm", stop_before_pixels=True)
    siim = pydicom.dcmread(DICOM / "siim_pneumothorax_negative.dcm", stop_before_pixels=True)
    logs = stack.logs()
    for value in (str(source.PatientName), str(source.PatientID), str(siim.PatientName), str(siim.PatientID)):
        if len(value) >= 4:
            assert value not in logs, f"a patient identifier appears in the logs: {value[:2]}..."


# -- bad input through both doors --------------------------------------------------------------------------------
def grpc_outcome(client: IngestionClient, data: bytes) -> tuple[str, list[float]]:
    try:
        response = client.analyze(data, timeout_s=120)
    except ClientError as e:
        return e.reason, []
    return OK, [f.probability for f in response.findings]


def scp_outcome(port: int, path: Path) -> str:
    """C-STORE the file's bytes as they are (pynetdicom sends the raw dataset, never re-encoded)."""
    meta = read_file_meta_info(path)
    ae = AE(ae_title="BADINPUT")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    assoc = ae.associate("127.0.0.1", port)
    assert assoc.is_established, "the SCP refused an association"
    try:
        status = assoc.send_c_store(path)
    finally:
        if assoc.is_established:
            assoc.release()
    assert "Status" in status, "no C-STORE response (timeout or abort)"
    if status.Status == 0x0000:
        return OK
    return str(status.get("ErrorComment", "")).split(":", 1)[0] or f"0x{status.Status:04X}"


def service_rss_mb(stack: Stack) -> dict[str, float]:
    return {name: psutil.Process(pid).memory_info().rss / 2**20 for name, pid in stack.pids().items()
            if name in ("ingestion", "dicom")}  # fmt: skip


def test_bad_input_through_both_doors_gets_typed_answers_and_the_stack_keeps_serving(
    stack: Stack, tmp_path: Path
) -> None:
    png = sorted((DATA / "nih-cxr14-621" / "images_512").glob("*.png"))[0]
    corpus = build_corpus(DICOM, png)
    assert len(corpus) >= 30
    pids_before, rss_before = stack.pids(), service_rss_mb(stack)
    rows, problems = [], []
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        with IngestionClient(stack.ingestion) as client:
            names = sorted({c.same_as for c in corpus if c.same_as})
            references = {name: grpc_outcome(client, reference(DICOM, name))[1] for name in names}
            for i, case in enumerate(corpus):
                row = _run_case(case, client, stack, tmp_path, references)
                rows.append(row)
                problems += row["problems"]
                good = grpc_outcome(client, reference(DICOM, "nih_no_finding_dx.dcm"))[0]  # still serving?
                if good != OK:
                    problems.append(f"after {case.name}: a good file got {good}")
                if i % 5 == 0:
                    path = tmp_path / "good.dcm"
                    path.write_bytes(reference(DICOM, "siim_pneumothorax_negative.dcm"))
                    if (answer := scp_outcome(stack.dicom_port, path)) != OK:
                        problems.append(f"after {case.name}: a good file over DICOM got {answer}")
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
    rss_after = service_rss_mb(stack)
    _report(rows, rss_before, rss_after)
    assert not problems, "\n".join(problems)
    assert stack.pids() == pids_before  # nothing crashed or restarted
    assert all(s["state"] == "ready" for s in stack.status()["services"].values())
    for name, before in rss_before.items():  # bounded: the largest case inflates to the 256 MiB cap once
        assert rss_after[name] < before + 600, f"{name} grew from {before:.0f} to {rss_after[name]:.0f} MiB"


def _run_case(case: Case, client: IngestionClient, stack: Stack, tmp_path: Path,
              references: dict[str, list[float]]) -> dict[str, Any]:  # fmt: skip
    problems = []
    t0 = time.monotonic()
    scp = "-"
    if case.sendable:
        path = tmp_path / f"{case.name}.dcm"
        path.write_bytes(case.data)
        scp = scp_outcome(stack.dicom_port, path)
        if scp not in case.expect:
            problems.append(f"{case.name} over DICOM: {scp}, expected one of {sorted(case.expect)}")
    t1 = time.monotonic()
    grpc, probabilities = grpc_outcome(client, case.data)
    t2 = time.monotonic()
    if grpc not in case.expect:
        problems.append(f"{case.name} over gRPC: {grpc}, expected one of {sorted(case.expect)}")
    if grpc == OK and case.same_as:
        ref = references[case.same_as]
        worst = max(abs(a - b) for a, b in zip(probabilities, ref, strict=True))
        if worst > PROBABILITY_TOLERANCE:
            problems.append(f"{case.name}: findings differ from {case.same_as} by up to {worst:.4f}")
    return {"case": case.name, "bytes": len(case.data), "grpc": grpc, "dicom": scp, "grpc_s": round(t2 - t1, 3),
            "dicom_s": round(t1 - t0, 3) if case.sendable else None, "problems": problems}  # fmt: skip


def _report(rows: list[dict[str, Any]], before: dict[str, float], after: dict[str, float]) -> None:
    """Print the outcome table (pytest -s shows it) and keep it as JSON for the closing note."""
    out = REPO / "benchmarks" / "results" / "bad_input_e2e.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cases": rows, "rss_mb_before": before, "rss_mb_after": after}, indent=2))
    print(f"\n{'case':34s} {'bytes':>9s}  {'gRPC':34s} {'DICOM':34s} {'s':>6s}", file=sys.stderr)
    for r in rows:
        seconds = r["grpc_s"] + (r["dicom_s"] or 0)
        print(f"{r['case']:34s} {r['bytes']:>9d}  {r['grpc']:34s} {r['dicom']:34s} {seconds:6.2f}", file=sys.stderr)
    print(f"RSS MiB before {before} after {after}", file=sys.stderr)


# -- load (smoke) ------------------------------------------------------------------------------------------------
def test_the_load_script_runs_against_the_stack(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_load.py"), "--home", str(stack.home), "--clients", "2",
         "--dicom-clients", "1", "--duration", "30", "--max-requests", "20", "--json", str(out)],
        env=stack.env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["requests"] > 0 and result["errors"] == 0, result
    assert result["by_door"]["grpc"]["ok"] > 0 and result["by_door"]["dicom"]["ok"] > 0
    assert set(result["memory_mb"]["start"]) >= {"ingestion", "dicom", "torchserve", "worker", "redis"}
