"""The ensemble archive served by a REAL TorchServe 0.12 (Java frontend + Python worker) on free loopback ports,
called over real gRPC with real NIH radiographs; plus the archive builder and process control's error paths.

TorchServe is started once for the module (~5-20 s here) and stopped by the last test and the fixture."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest

from cxr.core.errors import ManifestError
from cxr.core.manifest import read_manifest, write_manifest
from cxr.core.preprocess import PreprocessSpec, load_image_file, prepare_image
from cxr.core.wire import encode_input
from cxr.models.testing import make_random_ensemble
from cxr.serving.archive import build_archive
from cxr.serving.runner import EnsembleRunner
from cxr.serving.torchserve_process import (
    PortInUseError,
    TorchServe,
    TorchServeError,
    TorchServeSettings,
    ensure_ports_free,
)
from cxr.stack.processes import free_ports
from cxr.vendor.torchserve import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NIH_IMAGES = REPO.parent / "shared" / "data" / "nih-cxr14-621" / "images_512"
SIZE = 64
MODEL = "cxr"


def settings_for(home: Path, store: Path, **kw: object) -> TorchServeSettings:
    p = free_ports(5)
    return TorchServeSettings(
        home=home, model_store=store, inference_port=p[0], management_port=p[1], metrics_port=p[2],
        grpc_inference_port=p[3], grpc_management_port=p[4], java_xmx="512m", **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def nih_blobs(n: int) -> list[bytes]:
    spec = PreprocessSpec(size=SIZE)
    paths = sorted(NIH_IMAGES.glob("*.png"))[:n]
    assert len(paths) == n, f"expected {n} images in {NIH_IMAGES}"
    return [encode_input(prepare_image(load_image_file(p), spec)) for p in paths]


@dataclass
class Served:
    ts: TorchServe
    runner: EnsembleRunner
    ensemble: Path
    store: Path
    channel: grpc.Channel

    def predict(self, blob: bytes, token: str | None = "auto", timeout: float = 60) -> dict:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(self.channel)
        token = self.ts.inference_token() if token == "auto" else token
        metadata = [("authorization", f"Bearer {token}")] if token else []
        request = inference_pb2.PredictionsRequest(model_name=MODEL, input={"data": blob})
        reply = stub.Predictions(request, metadata=metadata, timeout=timeout)
        return json.loads(reply.prediction)

    def expected(self, blob: bytes) -> np.ndarray:
        return self.runner.predict(self.runner.decode_request(blob)[None])[0]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("ts")
    ensemble, store = root / "ensemble", root / "store"
    make_random_ensemble(ensemble, archs=("resnet18", "mobilenet_v3_large"), size=SIZE)
    build_archive(ensemble, store, MODEL)
    ts = TorchServe(settings_for(root / "home", store))
    ts.start({MODEL: f"{MODEL}.mar"})
    channel = None
    try:
        ts.wait_ready(MODEL, timeout=180)
        channel = grpc.insecure_channel(ts.grpc_inference_address)
        yield Served(ts, EnsembleRunner.load(ensemble), ensemble, store, channel)
    finally:
        if channel is not None:
            channel.close()
        ts.stop()


# -- archive ------------------------------------------------------------------------------------------
def test_archive_holds_handler_bundle_and_config(served: Served) -> None:
    mar = served.store / f"{MODEL}.mar"
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        meta = json.loads(z.read("MAR-INF/MANIFEST.json"))
    assert {"handler.py", "model-config.yaml", "manifest.json", "resnet18.pt", "mobilenet_v3_large.pt"} <= names
    assert meta["model"]["modelVersion"] == served.runner.manifest.version
    assert meta["model"]["handler"] == "handler.py" and meta["model"]["configFile"] == "model-config.yaml"


def test_archive_is_reused_until_an_input_changes(tmp_path: Path) -> None:
    ensemble = tmp_path / "ensemble"
    make_random_ensemble(ensemble, archs=("mobilenet_v3_large",), size=SIZE)  # small: three builds below
    first = build_archive(ensemble, tmp_path / "store")
    stamp = first.stat().st_mtime_ns
    assert build_archive(ensemble, tmp_path / "store").stat().st_mtime_ns == stamp  # reused
    assert build_archive(ensemble, tmp_path / "store", force=True).stat().st_mtime_ns != stamp
    stamp = first.stat().st_mtime_ns
    write_manifest(ensemble, replace(read_manifest(ensemble), version="9.9.9"))
    rebuilt = build_archive(ensemble, tmp_path / "store")
    assert rebuilt.stat().st_mtime_ns != stamp
    with zipfile.ZipFile(rebuilt) as z:
        assert json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"] == "9.9.9"


def test_archive_rejects_bad_bundles(tmp_path: Path, served: Served) -> None:
    with pytest.raises(ManifestError):
        build_archive(tmp_path, tmp_path / "store")  # no manifest
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_bytes((served.ensemble / "manifest.json").read_bytes())
    with pytest.raises(ManifestError, match="missing"):
        build_archive(broken, tmp_path / "store")  # manifest without weights
    with pytest.raises(ValueError, match="model name"):
        build_archive(served.ensemble, tmp_path / "store", model_name="../evil")


# -- the running server ---------------------------------------------------------------------------------
def test_config_sets_every_security_option_explicitly(served: Served) -> None:
    s = served.ts.settings
    props = dict(
        line.split("=", 1) for line in s.config_path.read_text().splitlines() if "=" in line and line[0] != "#"
    )
    assert props["disable_token_authorization"] == "false" and props["enable_model_api"] == "false"
    assert props["enable_envvars_config"] == "false" and props["install_py_dep_per_model"] == "false"
    assert props["metrics_mode"] == "prometheus" and props["load_models"] == f"{MODEL}={MODEL}.mar"
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:")
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["python"] == s.python and props["max_request_size"] == "8000000"
    assert s.key_file.is_file() and oct(s.key_file.stat().st_mode & 0o777) == "0o600"


def test_worker_runs_the_configured_python_and_loads_the_ensemble(served: Served) -> None:
    logs = served.ts.settings.logs_dir
    assert f"Python executable: {served.ts.settings.python}" in (logs / "ts_log.log").read_text()
    assert "loaded ensemble cxr-random-test" in (logs / "model_log.log").read_text()
    (described,) = served.ts.describe_model(MODEL)
    assert described["batchSize"] == 4 and described["maxBatchDelay"] == 2
    assert described["minWorkers"] == described["maxWorkers"] == 1


def test_grpc_prediction_equals_the_in_process_runner(served: Served) -> None:
    (blob,) = nih_blobs(1)
    doc = served.predict(blob)
    expected = served.expected(blob)
    m = served.runner.manifest
    assert doc["model"]["name"] == m.name and doc["model"]["version"] == m.version
    assert doc["model"]["members"] == list(m.model_names) and doc["labels"] == list(m.labels)
    np.testing.assert_allclose(doc["probabilities"], expected, atol=1e-5)
    assert len(doc["findings"]) == len(m.labels)
    for j, f in enumerate(doc["findings"]):
        assert f["probability"] == pytest.approx(float(expected[:, j].mean()), abs=1e-5)
        assert f["n_models"] == 2 and 0 <= f["votes"] <= 2


def test_concurrent_requests_each_get_their_own_answer_in_batches(served: Served) -> None:
    blobs = nih_blobs(8)
    log = served.ts.settings.logs_dir / "model_log.log"
    log_before = log.read_text()
    batches_before = log_before.count("Backend received inference")
    with ThreadPoolExecutor(max_workers=len(blobs)) as pool:
        docs = list(pool.map(served.predict, blobs))
    for blob, doc in zip(blobs, docs, strict=True):
        np.testing.assert_allclose(doc["probabilities"], served.expected(blob), atol=1e-5)
    log_after = log.read_text()
    batches = log_after.count("Backend received inference") - batches_before
    assert 1 <= batches < len(blobs), f"{batches} batches for {len(blobs)} requests"  # batching happened
    sizes = [int(n) for n in re.findall(r"cxr batch of (\d+)", log_after[len(log_before) :])]
    assert sum(sizes) == len(blobs) and max(sizes) <= 4 and len(sizes) == batches  # model-config's batchSize


def test_garbage_input_is_answered_with_an_error_document(served: Served) -> None:
    # gRPC: TorchServe ignores the per-request status -> OK, the body carries the error
    doc = served.predict(b"this is not a numpy array")
    assert doc["error"]["reason"] == "BAD_MODEL_INPUT" and "npy" in doc["error"]["message"]
    # REST: the per-request status set by the handler comes through as HTTP 400
    req = urllib.request.Request(f"{served.ts.inference_url}/predictions/{MODEL}", data=b"junk", method="POST")
    req.add_header("Authorization", f"Bearer {served.ts.inference_token()}")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    assert info.value.code == 400
    assert json.loads(info.value.read())["error"]["reason"] == "BAD_MODEL_INPUT"


def test_request_size_limit_is_the_configured_one(served: Served) -> None:
    # 7 MB is above TorchServe's default limit (6,553,500 B) but below ours (8 MB): it reaches the handler
    assert served.predict(b"\0" * 7_000_000)["error"]["reason"] == "BAD_MODEL_INPUT"
    # above the limit, TorchServe's gRPC server resets the stream: the client sees CANCELLED
    with pytest.raises(grpc.RpcError) as info:
        served.predict(b"\0" * 9_000_000)
    assert info.value.code() == grpc.StatusCode.CANCELLED and "RST_STREAM" in (info.value.details() or "")


@pytest.mark.parametrize("token", [None, "wrong-token"], ids=["missing", "wrong"])
def test_grpc_call_without_the_right_token_is_refused(served: Served, token: str | None) -> None:
    (blob,) = nih_blobs(1)
    with pytest.raises(grpc.RpcError) as info:
        served.predict(blob, token=token)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "Token Authorization failed" in (info.value.details() or "")


def test_management_api_requires_its_token(served: Served) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{served.ts.management_url}/models/{MODEL}", timeout=10)
    assert info.value.code == 400 and b"Token Authorization failed" in info.value.read()
    assert served.ts.inference_token() != served.ts.management_token()


def test_model_registration_api_is_disabled(served: Served) -> None:
    req = urllib.request.Request(f"{served.ts.management_url}/models?url=other.mar", method="POST")
    req.add_header("Authorization", f"Bearer {served.ts.management_token()}")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 405


def test_metrics_endpoint_serves_prometheus_text(served: Served) -> None:
    served.predict(nih_blobs(1)[0])
    with urllib.request.urlopen(served.ts.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    assert "# TYPE ts_inference_requests_total counter" in text
    assert f'model_name="{MODEL}"' in text


# -- process control error paths ---------------------------------------------------------------------------
def test_ports_in_use_are_detected_before_starting(tmp_path: Path, served: Served) -> None:
    with pytest.raises(PortInUseError, match=str(served.ts.settings.grpc_inference_port)):
        ensure_ports_free("127.0.0.1", [served.ts.settings.grpc_inference_port])
    with pytest.raises(PortInUseError, match="distinct"):
        ensure_ports_free("127.0.0.1", [free_ports(1)[0]] * 2)
    clash = replace(settings_for(tmp_path / "home", served.store), metrics_port=served.ts.settings.metrics_port)
    ts = TorchServe(clash)
    with pytest.raises(PortInUseError):
        ts.start({MODEL: f"{MODEL}.mar"})
    assert ts.pid is None and not clash.config_path.exists()


def test_start_refuses_a_second_start_of_a_running_instance(served: Served) -> None:
    with pytest.raises(TorchServeError, match="already runs"):
        TorchServe(served.ts.settings).start({MODEL: f"{MODEL}.mar"})


def test_start_rejects_a_missing_archive(tmp_path: Path, served: Served) -> None:
    with pytest.raises(TorchServeError, match=r"nope\.mar not found"):
        TorchServe(settings_for(tmp_path / "home", served.store)).start({MODEL: "nope.mar"})


def test_start_rejects_a_python_that_cannot_run(tmp_path: Path, served: Served) -> None:
    ts = TorchServe(settings_for(tmp_path / "home", served.store, python=str(tmp_path / "no-python")))
    with pytest.raises(TorchServeError, match="cannot run"):
        ts.start({MODEL: f"{MODEL}.mar"})
    assert ts.pid is None


def test_start_rejects_bad_model_names(tmp_path: Path, served: Served) -> None:
    with pytest.raises(ValueError, match="bad model entry"):
        TorchServe(settings_for(tmp_path / "home", served.store)).start({"a,b": f"{MODEL}.mar"})


def test_failed_start_is_reported_with_the_log_tail(tmp_path: Path, served: Served) -> None:
    ts = TorchServe(settings_for(tmp_path / "home", served.store, extra_env={"JAVA_HOME": str(tmp_path / "no-jdk")}))
    ts.start({MODEL: f"{MODEL}.mar"})
    try:
        with pytest.raises(TorchServeError, match="java not found"):
            ts.wait_ready(MODEL, timeout=60)
    finally:
        ts.stop()


def test_wait_ready_is_bounded_when_nothing_answers(tmp_path: Path, served: Served) -> None:
    with pytest.raises(TorchServeError, match="not READY after 1 s"):
        TorchServe(settings_for(tmp_path / "home", served.store, token_auth=False)).wait_ready(MODEL, timeout=1)


def test_stop_leaves_no_java_process(served: Served) -> None:
    # kept last in the module: it stops the shared server (the fixture's stop is then a no-op)
    pid = served.ts.pid
    assert pid is not None
    workers = [p.pid for p in psutil.Process(pid).children(recursive=True)]
    served.ts.stop()
    assert served.ts.pid is None and not psutil.pid_exists(pid)
    assert not any(psutil.pid_exists(w) for w in workers)
    assert not served.ts.settings.key_file.exists()
    served.ts.stop()  # idempotent
