"""Unit tests of the local stack's pieces that need no service: settings from the environment, the state
file, process control on real child processes, the port check, `cxr status` of a stopped stack, and the
analyze command's result shaping."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from cxr.cli.analyze_cmd import _out_dir, empty_result, finding_fields, safe_name
from cxr.cli.main import main
from cxr.client import ClientError, IngestionClient
from cxr.core.labels import NIH_CXR14
from cxr.core.manifest import Manifest, ModelEntry, write_manifest
from cxr.core.preprocess import PreprocessSpec
from cxr.ingestion.v1 import ingestion_pb2 as pb
from cxr.stack import (
    BadSettingError,
    ModelDirError,
    PortInUseError,
    ServiceStartError,
    StackError,
    StackSettings,
    model_summary,
)
from cxr.stack.processes import ProcessRef, free_port, log_tail, port_is_free, spawn, stop_process
from cxr.stack.state import ServiceRecord, StackState, read_state, write_state
from cxr.stack.status import stack_status
from cxr.stack.supervisor import _wait_ready, check_ports, up
from cxr.stack.testing import free_port_env

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def _manifest_dir(folder: Path) -> Path:
    manifest = Manifest(
        name="cxr-unit", version="9.9.9", labels=NIH_CXR14[:3], thresholds=(0.5, 0.4, 0.3),
        models=(ModelEntry(name="densenet121", arch="densenet121", weights="densenet121.pt"),),
        preprocess=PreprocessSpec(size=64), description="manifest only, for unit tests",
    )  # fmt: skip
    write_manifest(folder, manifest)
    return folder


# -- settings ----------------------------------------------------------------------------------------
def test_defaults_are_the_architecture_ports(tmp_path: Path) -> None:
    s = StackSettings.from_env({}, cwd=tmp_path)
    assert s.ports() == {
        "CXR_REDIS_PORT": 6390, "CXR_TS_INFERENCE_PORT": 8480, "CXR_TS_MANAGEMENT_PORT": 8481,
        "CXR_TS_METRICS_PORT": 8482, "CXR_TS_GRPC_PORT": 7470, "CXR_TS_GRPC_MANAGEMENT_PORT": 7471,
        "CXR_INGESTION_PORT": 50151, "CXR_INGESTION_METRICS_PORT": 9151, "CXR_WORKER_METRICS_PORT": 9152,
        "CXR_DICOM_PORT": 11112, "CXR_DICOM_METRICS_PORT": 9153,
    }  # fmt: skip
    assert s.home == tmp_path / ".cxr"
    assert s.redis_url == "redis://127.0.0.1:6390/0"
    assert s.token_file == tmp_path / ".cxr" / "torchserve" / "key_file.json"
    assert s.metrics_urls()["worker"] == "http://127.0.0.1:9152/metrics"


def test_demo_model_in_cwd_is_preferred(tmp_path: Path) -> None:
    (tmp_path / "model_store" / "cxr-nih14-imagenet").mkdir(parents=True)
    assert StackSettings.from_env({}, cwd=tmp_path).model_dir == tmp_path / "model_store" / "cxr-nih14-imagenet"


def test_env_overrides_ports_and_resolves_relative_paths(tmp_path: Path) -> None:
    env = {"CXR_HOME": "run/home", "CXR_MODEL_DIR": "/abs/model", "CXR_REDIS_PORT": "16390",
           "CXR_INGESTION_PORT": " 6000 ", "CXR_STACK_START_TIMEOUT_S": "12.5"}  # fmt: skip
    s = StackSettings.from_env(env, cwd=tmp_path)
    assert s.home == tmp_path / "run" / "home"
    assert s.model_dir == Path("/abs/model")
    assert (s.redis_port, s.ingestion_port, s.start_timeout_s) == (16390, 6000, 12.5)
    assert s.ingestion_address == "127.0.0.1:6000"
    assert s.service_ports("redis") == {"CXR_REDIS_PORT": 16390}
    assert set(s.service_ports("torchserve")) == {
        "CXR_TS_INFERENCE_PORT", "CXR_TS_MANAGEMENT_PORT", "CXR_TS_METRICS_PORT", "CXR_TS_GRPC_PORT",
        "CXR_TS_GRPC_MANAGEMENT_PORT",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"CXR_REDIS_PORT": "redis"}, "CXR_REDIS_PORT='redis' is not a port"),
        ({"CXR_TS_GRPC_PORT": "70000"}, "outside 1..65535"),
        ({"CXR_WORKER_METRICS_PORT": "0"}, "outside 1..65535"),
        ({"CXR_STACK_STOP_GRACE_S": "-1"}, "must be > 0"),
        ({"CXR_STACK_START_TIMEOUT_S": "soon"}, "not a number"),
        ({"CXR_INGESTION_PORT": "9152"}, "both CXR_INGESTION_PORT and CXR_WORKER_METRICS_PORT"),
        ({"CXR_TS_WORKERS": "two"}, "CXR_TS_WORKERS='two' is not a whole number"),
        ({"CXR_TS_WORKERS": "0"}, "CXR_TS_WORKERS=0 is outside 1..64"),
        ({"CXR_TORCH_THREADS": "all"}, "CXR_TORCH_THREADS='all' is not a whole number"),
    ],
)
def test_bad_settings_are_named(tmp_path: Path, env: dict[str, str], needle: str) -> None:
    with pytest.raises(BadSettingError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        StackSettings.from_env(env, cwd=tmp_path)


def test_torchserve_workers_share_the_cpus_unless_threads_are_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cxr.stack.torchserve_ctl import torchserve

    env = {"CXR_HOME": str(tmp_path), "CXR_TS_WORKERS": "3"}
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    s = StackSettings.from_env(env, cwd=tmp_path)
    assert (s.ts_workers, s.ts_threads_per_worker) == (3, 2)
    assert StackSettings.from_env({}, cwd=tmp_path).ts_workers == 2
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert s.ts_threads_per_worker == 1  # never 0
    s = StackSettings.from_env({**env, "CXR_TORCH_THREADS": "5"}, cwd=tmp_path)
    assert s.ts_threads_per_worker == 5
    ts = torchserve(s).settings
    assert ts.default_workers == 3 and ts.extra_env == {"CXR_TORCH_THREADS": "5"}


def test_model_summary_says_what_the_model_is(tmp_path: Path) -> None:
    info = model_summary(_manifest_dir(tmp_path))
    assert (info["name"], info["version"], info["input_size"]) == ("cxr-unit", "9.9.9", 64)
    assert info["members"] == [{"name": "densenet121", "arch": "densenet121"}]
    assert info["description"] == "manifest only, for unit tests"
    assert info["notice"] == "NOT FOR CLINICAL USE"
    assert "NOT FOR CLINICAL USE" in info["intended_use"]


def test_model_summary_rejects_a_folder_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="no manifest.json"):
        model_summary(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="not JSON"):
        model_summary(tmp_path)


# -- state file --------------------------------------------------------------------------------------
def test_state_round_trip_and_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "stack.json"
    rec = ServiceRecord(pid=1, create_time=2.0, address="a", metrics_url=None, log="l", ports={"X": 1}, ready_at=3.0)
    write_state(path, StackState(home="h", model_dir="m", model={"name": "n"}, services={"redis": rec}))
    back = read_state(path)
    assert back is not None and back.services["redis"] == rec and back.model == {"name": "n"}
    path.write_text('{"services": 3}')
    assert read_state(path) is None
    assert read_state(tmp_path / "absent.json") is None


# -- processes ---------------------------------------------------------------------------------------
def test_stop_process_escalates_to_sigkill_for_a_process_ignoring_sigterm(tmp_path: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    log = tmp_path / "logs" / "stubborn.log"
    proc, ref = spawn([sys.executable, "-c", code], log_file=log, env=os.environ, cwd=tmp_path)
    deadline = time.monotonic() + 10
    while "up" not in log_tail(log) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.getpgid(ref.pid) == ref.pid  # own session: a process group leader
    assert ref.alive()
    t0 = time.monotonic()
    assert stop_process(ref, grace_s=0.5) is True
    assert time.monotonic() - t0 < 5
    proc.wait(timeout=5)
    assert not ref.alive()


def test_stop_process_is_graceful_for_a_cooperative_process(tmp_path: Path) -> None:
    proc, ref = spawn([sys.executable, "-c", "import time; time.sleep(60)"], log_file=tmp_path / "s.log",
                      env=os.environ, cwd=tmp_path)  # fmt: skip
    t0 = time.monotonic()
    assert stop_process(ref, grace_s=10) is False
    assert time.monotonic() - t0 < 5 and not ref.alive()
    assert proc.poll() is not None
    assert stop_process(ref, grace_s=1) is False  # already gone: fine


def test_a_recycled_pid_is_not_ours() -> None:
    me = ProcessRef.of(os.getpid())
    assert me.alive()
    assert not ProcessRef(me.pid, me.create_time - 100).alive()


def test_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert log_tail(log, 3) == "line 97\nline 98\nline 99"
    assert log_tail(tmp_path / "missing.log") == ""


def test_port_check_names_port_variable_and_holder(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert not port_is_free(port)
        s = StackSettings.from_env({"CXR_REDIS_PORT": str(port)}, cwd=tmp_path)
        with pytest.raises(PortInUseError) as caught:
            check_ports(s, ["redis"])
        assert f"127.0.0.1:{port} (CXR_REDIS_PORT, for redis) is in use" in str(caught.value)
        assert f"pid {os.getpid()}" in str(caught.value)
    assert port_is_free(port)


def test_up_refuses_a_second_model_while_the_stack_is_up(tmp_path: Path) -> None:
    s = StackSettings.from_env({"CXR_HOME": str(tmp_path / "home"), "CXR_MODEL_DIR": str(_manifest_dir(tmp_path))})
    me = ProcessRef.of(os.getpid())  # a live process recorded as the running redis
    rec = ServiceRecord(pid=me.pid, create_time=me.create_time, address="a", metrics_url=None, log="l", ports={})
    write_state(s.state_file, StackState(home=str(s.home), model_dir="/other/model", model={}, services={"redis": rec}))
    with pytest.raises(StackError, match="is up serving /other/model; run `cxr down` first"):
        up(s)


def test_wait_ready_reports_an_exit_and_a_timeout_with_the_log(tmp_path: Path) -> None:
    settings = StackSettings.from_env({"CXR_HOME": str(tmp_path), "CXR_STACK_START_TIMEOUT_S": "0.5"})
    log = tmp_path / "svc.log"
    code = "import sys; print('bad config: CXR_X', flush=True); sys.exit(3)"
    proc, _ = spawn([sys.executable, "-c", code], log_file=log, env=os.environ, cwd=tmp_path)
    proc.wait(timeout=10)
    with pytest.raises(ServiceStartError, match="svc exited with status 3") as caught:
        _wait_ready("svc", lambda: False, proc, settings, log)
    assert caught.value.service == "svc" and "bad config: CXR_X" in caught.value.log_tail
    proc, ref = spawn([sys.executable, "-c", "import time; time.sleep(30)"], log_file=log, env=os.environ, cwd=tmp_path)
    try:
        with pytest.raises(ServiceStartError, match="svc was not ready after 0 s"):
            _wait_ready("svc", lambda: False, proc, settings, log)
    finally:
        stop_process(ref, grace_s=5)


def test_up_without_redis_server_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server on it
    monkeypatch.setenv("CXR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CXR_MODEL_DIR", str(_manifest_dir(tmp_path / "model")))
    for var, port in free_port_env().items():
        monkeypatch.setenv(var, port)
    assert main(["up"]) == 1
    assert "redis-server is not installed (Debian/Ubuntu: apt-get install -y redis-server)" in " ".join(
        capsys.readouterr().err.split()
    )
    assert not (tmp_path / "home" / "stack.json").exists()


def test_analyze_json_when_the_service_is_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    dicom = REPO.parent / "shared" / "data" / "dicom" / "siim_pneumothorax_negative.dcm"
    assert main(["analyze", "--json", "--wait", "--address", address, str(dicom)]) == 1
    (line,) = capsys.readouterr().out.splitlines()
    row = json.loads(line)
    assert row["ok"] is False and row["file"] == str(dicom)
    assert row["error"]["code"] == "UNAVAILABLE" and row["error"]["reason"] == "UNAVAILABLE"
    assert row["findings"] == [] and row["explanation"] is None


def test_analyze_with_a_bad_port_setting_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CXR_INGESTION_ADDR", raising=False)
    monkeypatch.setenv("CXR_INGESTION_PORT", "fifty")
    assert main(["analyze", "--json", "any.dcm"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "CXR_INGESTION_PORT='fifty' is not a port number" in captured.err


# -- status of a stack that is not running -----------------------------------------------------------
def test_status_json_of_a_stopped_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CXR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CXR_MODEL_DIR", str(_manifest_dir(tmp_path)))
    assert main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert set(status["services"]) == {"redis", "torchserve", "ingestion", "worker", "dicom"}
    assert {s["state"] for s in status["services"].values()} == {"stopped"}
    assert status["up"] is False and status["model"]["name"] == "cxr-unit"
    assert stack_status(StackSettings.from_env())["services"]["ingestion"]["pid"] is None


def test_down_of_a_stopped_stack_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CXR_HOME", str(tmp_path / "home"))
    assert main(["down"]) == 0
    assert "nothing was running" in capsys.readouterr().out


def test_up_without_a_model_fails_before_starting_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CXR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CXR_MODEL_DIR", str(tmp_path / "no-such-model"))
    assert main(["up"]) == 1
    assert "MODEL_DIR_INVALID" in capsys.readouterr().err
    assert not (tmp_path / "home" / "stack.json").exists()


# -- analyze: client-side errors and result shaping --------------------------------------------------
def test_unreadable_file_is_a_typed_client_error(tmp_path: Path) -> None:
    with IngestionClient("127.0.0.1:1") as client:
        for bad in (tmp_path / "missing.dcm", tmp_path):
            with pytest.raises(ClientError) as caught:
                client.analyze(bad)
            assert (caught.value.code, caught.value.reason) == ("INVALID_ARGUMENT", "FILE_NOT_READABLE")
        with pytest.raises(ValueError, match="chunk_size"):
            client.analyze(b"DICM", chunk_size=2 * 1024 * 1024)


def test_finding_fields_and_file_names() -> None:
    f = pb.Finding(label="Effusion", probability=0.75, model_probabilities={"b": 0.5, "a": 1.0}, votes=1,
                   n_models=2, threshold=0.6, positive=True)  # fmt: skip
    d = finding_fields(f, ["a", "b"])
    assert d == {"label": "Effusion", "probability": 0.75, "models": {"a": 1.0, "b": 0.5}, "votes": 1,
                 "n_models": 2, "threshold": 0.6, "positive": True}  # fmt: skip
    assert list(d["models"]) == ["a", "b"]
    assert safe_name("pleural effusion/left") == "pleural_effusion_left"
    used: set[str] = set()
    assert [_out_dir(Path("o"), Path(p), used).name for p in ("x/a.dcm", "y/a.dcm", "b.dcm")] == ["a", "a-2", "b"]
    assert set(empty_result(Path("f.dcm"))) >= {"file", "ok", "error", "model", "findings", "explanation"}
