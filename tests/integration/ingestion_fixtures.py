"""Fixtures and helpers of the ingestion service's integration tests: a private redis-server, a tiny random
ensemble served by a REAL TorchServe (token authorisation on), the real ingestion gRPC server in-process on free
loopback ports, and real DICOM files (plus edits of them made with pydicom). Imported by test_ingestion.py."""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pydicom
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from support import DATA, free_ports, redis_server_in
from support import REPO as REPO  # REPO, ensemble and wait_until: re-exported for test_ingestion.py
from support import ensemble as ensemble
from support import wait_until as wait_until

from cxr.core.manifest import Manifest
from cxr.ingestion.v1 import ingestion_pb2 as pb
from cxr.ingestion.v1 import ingestion_pb2_grpc as pb_grpc
from cxr.serving.archive import build_archive
from cxr.serving.torchserve_process import TorchServe, TorchServeSettings
from cxr.tls import ClientTLS, make_channel
from services.ingestion.server import IngestionServer
from services.ingestion.settings import IngestionSettings

DICOM = DATA / "dicom"
GOOD_DICOMS = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "siim_pneumothorax_negative.dcm", "nih_no_finding_dx.dcm")
MODEL = "cxr"
CHUNK = 256 * 1024


# -- redis-server ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ingestion_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a free loopback port, persistence off. Yields its URL."""
    with redis_server_in(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture(scope="module")
def rds(ingestion_redis: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(ingestion_redis, socket_timeout=10) as client:
        yield client


# -- ensemble and TorchServe -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torchserve(tmp_path_factory: pytest.TempPathFactory, ensemble: tuple[Path, Manifest]) -> Iterator[TorchServe]:
    """REAL TorchServe serving the ensemble archive on free loopback ports, token authorisation on."""
    root = tmp_path_factory.mktemp("ts")
    build_archive(ensemble[0], root / "store", MODEL)
    p = free_ports(5)
    settings = TorchServeSettings(
        home=root / "home", model_store=root / "store", inference_port=p[0], management_port=p[1],
        metrics_port=p[2], grpc_inference_port=p[3], grpc_management_port=p[4], java_xmx="512m",
        extra_env={"CXR_TORCH_THREADS": "1"},
    )  # fmt: skip
    ts = TorchServe(settings)
    ts.start({MODEL: f"{MODEL}.mar"})
    try:
        ts.wait_ready(MODEL, timeout=240)
        yield ts
    finally:
        ts.stop()


def ingestion_settings(ensemble_dir: Path, redis_url: str, ts: TorchServe, **overrides: Any) -> IngestionSettings:
    """Settings of an in-process ingestion server on free ports, talking to the test's Redis and TorchServe."""
    base = IngestionSettings(
        addr="127.0.0.1:0",
        metrics_port=free_ports(1)[0],
        redis_url=redis_url,
        torchserve_grpc=ts.grpc_inference_address,
        torchserve_model=MODEL,
        torchserve_token_file=ts.settings.key_file,
        model_dir=ensemble_dir,
        inference_timeout_s=30.0,
        grace_s=2.0,
        startup_wait_s=60.0,
    )
    return replace(base, **overrides)


@dataclass
class Running:
    """An in-process ingestion server and a client stub on its port."""

    server: IngestionServer
    channel: grpc.Channel
    stub: pb_grpc.IngestionServiceStub

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.server.metrics_port}/metrics", timeout=10) as r:
            return str(r.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        """One sample scraped from the real /metrics endpoint (0 when absent)."""
        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return float(s.value)
        return 0.0


@contextmanager
def running_server(
    settings: IngestionSettings, *, ready: bool = True, channel_tls: ClientTLS | None = None
) -> Iterator[Running]:
    """Start the real server; with ``ready`` wait until health is SERVING. Always stopped after. The client
    channel uses ``channel_tls`` (for a server with TLS), else plaintext."""
    server = IngestionServer(settings)
    port = server.start()
    # rendered explanations (two PNGs per label) exceed gRPC's default 4 MiB receive limit
    channel = make_channel(f"127.0.0.1:{port}", channel_tls, [("grpc.max_receive_message_length", 64 << 20)])
    try:
        if ready:
            server.wait_ready(settings.startup_wait_s)
        yield Running(server, channel, pb_grpc.IngestionServiceStub(channel))
    finally:
        channel.close()
        server.stop(1.0)


# -- requests and errors -----------------------------------------------------------------------------------------
def requests_for(data: bytes, *, chunk: int = CHUNK, **metadata: Any) -> Iterator[pb.AnalyzeRequest]:
    yield pb.AnalyzeRequest(metadata=pb.AnalyzeMetadata(client_name="pytest", **metadata))
    for i in range(0, len(data), chunk):
        yield pb.AnalyzeRequest(chunk=data[i : i + chunk])


def analyze(stub: pb_grpc.IngestionServiceStub, data: bytes, **metadata: Any) -> pb.AnalyzeResponse:
    response: pb.AnalyzeResponse = stub.Analyze(requests_for(data, **metadata), timeout=120)
    return response


@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    reason: str
    details: str


def refusal(call: Callable[[], Any]) -> Refusal:
    """Run a call that must fail; return its status code, ``cxr-reason`` trailer and details."""
    try:
        call()
    except grpc.RpcError as e:
        trailers = dict(e.trailing_metadata() or ())  # type: ignore[attr-defined]
        return Refusal(e.code(), str(trailers.get("cxr-reason", "")), str(e.details()))  # type: ignore[attr-defined]
    pytest.fail("the call succeeded but should have been refused")


def held_stream(first: list[pb.AnalyzeRequest], release: threading.Event, rest: list[pb.AnalyzeRequest]) -> Iterator:
    """A request stream that sends ``first``, then waits (at most 60 s) for ``release`` before sending ``rest``."""
    yield from first
    release.wait(60)
    yield from rest


# -- DICOM files -------------------------------------------------------------------------------------------------
def dicom_bytes(name: str) -> bytes:
    return (DICOM / name).read_bytes()


def edited_dicom(name: str, **attributes: Any) -> bytes:
    """A real file with some header attributes changed (and a new SOP Instance UID), re-encoded by pydicom."""
    ds = pydicom.dcmread(DICOM / name)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in attributes.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def rgb_dicom() -> bytes:
    """The NIH DX file re-encoded as a genuine RGB image (3 samples per pixel, pixel data to match)."""
    ds = pydicom.dcmread(DICOM / "nih_no_finding_dx.dcm")
    grey = ds.pixel_array.astype(np.uint8)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = "RGB"
    ds.PixelData = np.repeat(grey[:, :, None], 3, axis=2).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def queued_job_ids(client: redis.Redis) -> list[str]:
    """Job ids of the ``cxr.explain`` messages waiting in Celery's ``explain`` list (kombu's Redis transport)."""
    ids = []
    for raw in client.lrange("explain", 0, -1):  # type: ignore[union-attr]
        message = json.loads(raw)
        assert message["headers"]["task"] == "cxr.explain"
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        ids.append(args[0])
    return ids


def job_keys(client: redis.Redis) -> set[bytes]:
    return set(client.scan_iter("cxr:*"))
