"""The whole local stack driven as a user drives it: the real `cxr up` (redis-server, TorchServe, ingestion,
explanation worker as detached processes), `cxr status --json`, `cxr analyze --json --wait` on the real DICOM
files of ../shared/data/dicom plus random bytes, the cache, a service that fails to start, and `cxr down`
leaving no process behind. Everything on free loopback ports in a temporary CXR_HOME, served model = a tiny
random ensemble (64 px). The tests of this module run in order against one stack."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pydicom
import pytest
import redis
from PIL import Image

from cxr.core.jobs import heatmaps_key, input_key
from cxr.core.manifest import Manifest
from cxr.core.wire import decode_input
from cxr.explain.heatmap_store import dequantize, unpack_heatmaps
from cxr.explain.testing import TOLERANCE, captum_gradcam_maps
from cxr.models.bundle import load_ensemble
from cxr.models.testing import make_random_ensemble
from cxr.stack.processes import group_pids, port_is_free
from cxr.stack.testing import free_port_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
DICOM = DATA / "dicom"
CXR = REPO / ".venv" / "bin" / "cxr"
GOOD = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "siim_pneumothorax_negative.dcm", "nih_no_finding_dx.dcm")
SERVICES = ("redis", "torchserve", "ingestion", "worker", "dicom")


@dataclass
class Stack:
    env: dict[str, str]
    cwd: Path
    home: Path
    manifest: Manifest

    def run(self, *args: str, timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess[str]:
        env = {**self.env, **extra_env}
        return subprocess.run([str(CXR), *args], env=env, cwd=self.cwd, capture_output=True, text=True,
                              timeout=timeout, check=False)  # fmt: skip

    def state(self) -> dict[str, Any]:
        return dict(json.loads((self.home / "stack.json").read_text()))

    def status(self) -> dict[str, Any]:
        done = self.run("status", "--json", timeout=60)
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))


def stack_env(home: Path, model_dir: Path) -> dict[str, str]:
    """The caller's environment without any CXR_* setting, plus free ports, this home and model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(free_port_env(), CXR_HOME=str(home), CXR_MODEL_DIR=str(model_dir))
    env.update(CXR_OVERLAY_MAX_SIDE="256", CXR_STACK_START_TIMEOUT_S="150", CXR_STACK_STOP_GRACE_S="20")
    return env


def _recorded_processes(state: dict[str, Any]) -> list[tuple[int, float, int]]:
    return [(s["pid"], s["create_time"], s["pgid"] or s["pid"]) for s in state["services"].values()]


def _same_process_alive(pid: int, create_time: float) -> bool:
    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - create_time) < 1 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("stack")
    manifest = make_random_ensemble(root / "model", size=64)
    st = Stack(env=stack_env(root / "home", root / "model"), cwd=root, home=root / "home", manifest=manifest)
    try:
        up = st.run("up", timeout=400)
        assert up.returncode == 0, f"cxr up failed:\n{up.stdout}\n{up.stderr}"
        yield st
    finally:
        state = st.state() if (st.home / "stack.json").exists() else {"services": {}}
        st.run("down", timeout=120)
        for pid, create_time, _ in _recorded_processes(state):  # never leave a process behind a failed test
            if _same_process_alive(pid, create_time):
                os.killpg(os.getpgid(pid), signal.SIGKILL)


def test_up_reports_the_model_and_every_service_ready(stack: Stack) -> None:
    status = stack.status()
    assert status["up"] is True
    assert set(status["services"]) == set(SERVICES)
    for name, svc in status["services"].items():
        assert svc["state"] == "ready", (name, svc)
        assert psutil.pid_exists(svc["pid"]), name
    assert status["model"]["name"] == stack.manifest.name
    assert status["model"]["version"] == stack.manifest.version
    assert status["model"]["description"] == stack.manifest.description
    assert status["model"]["notice"] == "NOT FOR CLINICAL USE"
    assert status["services"]["ingestion"]["address"] == f"127.0.0.1:{stack.env['CXR_INGESTION_PORT']}"
    assert (
        status["services"]["worker"]["metrics_url"]
        == f"http://127.0.0.1:{stack.env['CXR_WORKER_METRICS_PORT']}/metrics"
    )
    state = stack.state()
    assert {s: state["services"][s]["log"] for s in SERVICES}["redis"] == str(stack.home / "logs" / "redis.log")
    assert all(Path(s["log"]).is_file() for s in state["services"].values())


def test_up_again_is_a_no_op(stack: Stack) -> None:
    before = stack.state()["services"]
    again = stack.run("up", timeout=120)
    assert again.returncode == 0, again.stderr
    assert "already up" in again.stdout
    assert "NOT FOR CLINICAL USE" in again.stdout and stack.manifest.name in again.stdout
    assert {k: v["pid"] for k, v in stack.state()["services"].items()} == {k: v["pid"] for k, v in before.items()}


def test_up_on_busy_ports_names_the_port_and_its_holder(stack: Stack, tmp_path: Path) -> None:
    other = stack.run("up", timeout=120, CXR_HOME=str(tmp_path / "other-home"))
    assert other.returncode == 1
    port = stack.env["CXR_REDIS_PORT"]
    redis_pid = stack.state()["services"]["redis"]["pid"]
    assert "PORT_IN_USE" in other.stderr
    flat = " ".join(other.stderr.split())  # rich wraps long lines
    assert f"127.0.0.1:{port} (CXR_REDIS_PORT, for redis) is in use by redis-server (pid {redis_pid})" in flat
    assert not (tmp_path / "other-home" / "stack.json").exists()


def _check_good(row: dict[str, Any], stack: Stack, out: Path) -> None:
    m = stack.manifest
    assert row["ok"] is True and row["error"] is None, row["error"]
    assert row["model"]["name"] == m.name and row["model"]["version"] == m.version
    assert row["model"]["members"] == list(m.model_names)
    assert row["identity"]["sop_instance_uid"] and row["identity"]["modality"] in ("CR", "DX")
    assert re.fullmatch(r"[0-9a-f]{32}", row["job_id"])
    assert row["cached"] is False
    assert [f["label"] for f in row["findings"]] == list(m.labels)
    for f, threshold in zip(row["findings"], m.thresholds, strict=True):
        probs = [f["models"][name] for name in m.model_names]
        assert 0.0 <= f["probability"] <= 1.0
        assert f["probability"] == pytest.approx(sum(probs) / len(probs), abs=1e-4)  # CTP: mean probability
        assert f["threshold"] == pytest.approx(threshold)
        assert f["votes"] == sum(p >= threshold for p in probs) and f["n_models"] == len(probs)
        assert f["positive"] == (f["probability"] >= f["threshold"])
    ex = row["explanation"]
    assert ex["status"] == "done", ex
    n_positive = sum(f["positive"] for f in row["findings"])
    assert len(ex["heatmaps"]) == 2 * len(m.labels) + n_positive + 1  # overlay + disagreement per label, the
    assert sum(p.endswith(".panel.png") for p in ex["heatmaps"]) == n_positive  # paper's panel per positive one,
    assert Path(ex["heatmaps"][-1]).name == "summary.png"  # and the summary page
    stem = Path(row["file"]).stem
    for path in map(Path, ex["heatmaps"]):
        assert path.parent == out / stem and path.is_file()
        with Image.open(path) as img:
            assert img.format == "PNG" and min(img.size) > 0
    assert set(ex["agreement"]) == set(m.labels)


def _check_rejected(row: dict[str, Any], reason: str) -> None:
    assert row["ok"] is False
    assert row["error"]["code"] == "INVALID_ARGUMENT" and row["error"]["reason"] == reason
    assert row["error"]["message"].startswith(reason)
    assert row["findings"] == [] and row["model"] is None and row["explanation"] is None


def test_analyze_json_wait_contract_on_real_dicoms(stack: Stack) -> None:
    junk = stack.cwd / "random_bytes.dcm"
    junk.write_bytes(os.urandom(4096))
    files = [str(DICOM / name) for name in sorted(os.listdir(DICOM))] + [str(junk)]
    out = stack.cwd / "out"
    done = stack.run("analyze", "--json", "--wait", "--timeout", "120", "--out", str(out), *files, timeout=600)
    assert done.returncode == 1, done.stderr  # two files are rejected
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    rows = {Path(r["file"]).name: r for r in map(json.loads, lines)}  # every stdout line is JSON
    assert len(lines) == len(files) == len(rows)
    for name in GOOD:
        _check_good(rows[name], stack, out)
    _check_rejected(rows["cr_header_only_no_pixels.dcm"], "NO_PIXEL_DATA")
    _check_rejected(rows["random_bytes.dcm"], "NOT_DICOM")
    assert rows["RG1_UNCR.dcm"]["identity"]["view_position"] == "PA"


def test_dicom_results_pass_dciodvfy_reference_the_source_and_carry_captum_equal_maps(stack: Stack) -> None:
    """`cxr analyze --wait --dicom`: the SR and Secondary Captures of a real CR file pass dciodvfy, the SR reads
    with dsrdump and references the source image's UIDs; the job's stored per-model maps equal captum's
    LayerGradCam of the served weights on the stored input (an independent computation)."""
    out = stack.cwd / "dicom-out"
    source = pydicom.dcmread(DICOM / "RG1_UNCR.dcm", stop_before_pixels=True)
    done = stack.run("analyze", "--json", "--wait", "--dicom", "--no-cache", "--timeout", "120", "--out", str(out),
                     str(DICOM / "RG1_UNCR.dcm"), timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)
    listing = row["explanation"]["dicom"]
    n_positive = sum(f["positive"] for f in row["findings"])
    assert [d["kind"] for d in listing] == ["SR"] + ["SC"] * (n_positive + 1)
    for item in listing:
        path = Path(item["path"])
        assert path.parent == out / "RG1_UNCR" and path.suffix == ".dcm"
        check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False)
        assert [x for x in (check.stdout + check.stderr).splitlines() if x.startswith("Error")] == [], path.name
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.SOPInstanceUID == item["sop_instance_uid"]
    sr = pydicom.dcmread(listing[0]["path"])
    referenced = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert referenced.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    tree = subprocess.run(["dsrdump", listing[0]["path"]], capture_output=True, text=True, timeout=60, check=True)
    assert all(f'"Tracking Identifier")="{f["label"]}"' in tree.stdout for f in row["findings"])
    assert "NOT FOR CLINICAL USE" in tree.stdout
    with redis.Redis(port=int(stack.env["CXR_REDIS_PORT"]), socket_timeout=10) as rds:
        heatmaps = unpack_heatmaps(rds.get(heatmaps_key(row["job_id"])))  # type: ignore[arg-type]
        x = decode_input(rds.get(input_key(row["job_id"])), stack.manifest.preprocess)  # type: ignore[arg-type]
    reference = captum_gradcam_maps(load_ensemble(stack.cwd / "model")[1], x, heatmaps.grid)
    assert np.abs(dequantize(heatmaps.per_model) - reference).max() <= TOLERANCE
    assert (reference.std(axis=(2, 3)) > 0.05).any()  # real maps, not constants


def test_the_same_file_again_is_cached(stack: Stack) -> None:
    path = str(DICOM / "siim_pneumothorax_negative.dcm")
    done = stack.run("analyze", "--json", path, path, str(stack.cwd / "missing.dcm"), timeout=120)
    first, second, missing = (json.loads(line) for line in done.stdout.splitlines())
    assert first["cached"] is True and second["cached"] is True
    assert first["job_id"] == second["job_id"] and first["findings"] == second["findings"]
    assert first["explanation"] is None  # no --wait
    message = f"cannot read {stack.cwd / 'missing.dcm'}: No such file or directory"
    assert missing["error"] == {"code": "INVALID_ARGUMENT", "reason": "FILE_NOT_READABLE", "message": message}
    fresh = json.loads(stack.run("analyze", "--json", "--no-cache", path, timeout=120).stdout)
    assert fresh["ok"] is True and fresh["cached"] is False and fresh["job_id"] != first["job_id"]


def test_human_output_has_the_table_and_the_notice(stack: Stack) -> None:
    done = stack.run("analyze", str(DICOM / "nih_no_finding_dx.dcm"), str(DICOM / "cr_header_only_no_pixels.dcm"))
    assert done.returncode == 1
    text = done.stdout
    assert "NOT FOR CLINICAL USE" in text and f"model {stack.manifest.name} {stack.manifest.version}" in text
    assert all(label in text for label in stack.manifest.labels)
    assert re.search(r"\d of 2", text) and "resnet18" in text
    assert "INVALID_ARGUMENT NO_PIXEL_DATA" in " ".join(text.split())


def test_metrics_endpoints_answer(stack: Stack) -> None:
    for name, svc in stack.status()["services"].items():
        if svc["metrics_url"] is None:
            continue
        with urllib.request.urlopen(svc["metrics_url"], timeout=10) as reply:
            assert reply.status == 200, name
            body = reply.read().decode()
        if name != "torchserve":
            assert "# TYPE" in body, name


@contextmanager
def paused(pgid: int) -> Iterator[None]:
    """SIGSTOP a whole process group (a service that hangs), SIGCONT it afterwards."""
    os.killpg(pgid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(pgid, signal.SIGCONT)


def test_a_hung_service_is_unhealthy_and_a_slow_explanation_times_out(stack: Stack) -> None:
    services = stack.state()["services"]
    with paused(services["ingestion"]["pid"]):
        assert stack.status()["services"]["ingestion"]["state"] == "unhealthy"
    assert stack.status()["services"]["ingestion"]["state"] == "ready"
    path = str(DICOM / "nih_no_finding_dx.dcm")
    with paused(services["worker"]["pid"]):  # the job stays queued
        done = stack.run(
            "analyze", "--json", "--wait", "--no-cache", "--timeout", "3", "--out", str(stack.cwd / "slow"), path
        )
    row = json.loads(done.stdout)
    assert done.returncode == 1 and row["ok"] is True
    assert row["explanation"] == {"status": "timeout", "heatmaps": [], "failure_reason": "not finished after 3 s",
                                  "agreement": {}, "dicom": []}  # fmt: skip


def test_a_service_that_fails_to_start_is_reported_with_its_log(stack: Stack) -> None:
    ingestion = stack.state()["services"]["ingestion"]
    os.kill(ingestion["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _same_process_alive(ingestion["pid"], ingestion["create_time"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stack.status()["services"]["ingestion"]["state"] == "stopped"
    broken = stack.run("up", timeout=200, CXR_MAX_CONCURRENT="many")  # the ingestion service refuses this
    assert broken.returncode == 1
    assert "ingestion exited with status 2" in " ".join(broken.stderr.split())
    assert "last lines of the ingestion log" in broken.stderr and "CXR_MAX_CONCURRENT" in broken.stderr
    status = stack.status()
    assert status["services"]["ingestion"]["state"] == "stopped"
    assert [status["services"][s]["state"] for s in ("redis", "torchserve", "worker")] == ["ready"] * 3
    fixed = stack.run("up", timeout=200)  # restarts only what is missing
    assert fixed.returncode == 0, fixed.stderr
    assert "starting ingestion" in fixed.stdout and "starting torchserve" not in fixed.stdout
    assert stack.status()["up"] is True


def test_down_leaves_no_process_and_is_idempotent(stack: Stack) -> None:
    state = stack.state()
    done = stack.run("down", timeout=200)
    assert done.returncode == 0, done.stderr
    assert "stopped: dicom, worker, ingestion, torchserve, redis" in done.stdout
    for pid, create_time, pgid in _recorded_processes(state):
        assert not _same_process_alive(pid, create_time), pid
        assert group_pids(pgid) == [], pgid
    assert not (stack.home / "stack.json").exists()
    assert all(port_is_free(int(stack.env[var])) for var in stack.env if var.endswith("_PORT"))
    assert {s["state"] for s in stack.status()["services"].values()} == {"stopped"}
    again = stack.run("down", timeout=60)
    assert again.returncode == 0 and "nothing was running" in again.stdout


def test_up_stops_what_it_started_when_torchserve_cannot_start(tmp_path: Path) -> None:
    model = tmp_path / "model"
    manifest = make_random_ensemble(model, archs=("resnet18",), size=64)
    (model / manifest.models[0].weights).unlink()  # a bundle without its weights cannot be archived
    st = Stack(env=stack_env(tmp_path / "home", model), cwd=tmp_path, home=tmp_path / "home", manifest=manifest)
    done = st.run("up", timeout=200)
    assert done.returncode == 1
    flat = " ".join(done.stderr.split())
    assert "SERVICE_START_FAILED: TorchServe did not start" in flat and "resnet18.pt" in flat
    assert "stopping redis" in done.stdout
    assert not (tmp_path / "home" / "stack.json").exists()
    assert port_is_free(int(st.env["CXR_REDIS_PORT"]))
