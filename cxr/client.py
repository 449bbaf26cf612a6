"""A small Python client of the ingestion API (``cxr.ingestion.v1.IngestionService``).

    with IngestionClient("127.0.0.1:50151") as client:
        result = client.analyze("chest.dcm")                 # AnalyzeResponse (findings, model, job_id)
        final = client.wait_explanation(result.job_id, 120)  # ExplanationProgress (DONE / FAILED / ...)
        explanation = client.get_explanation(result.job_id, render=True)

Every failure of a call is raised as :class:`ClientError` with the gRPC status name (``code``), the server's
machine-readable reason (trailing metadata ``cxr-reason``, e.g. "NO_PIXEL_DATA"; the status name when the
server sent none, e.g. when it cannot be reached) and the message. Research software: NOT FOR CLINICAL USE.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import grpc

from cxr.ingestion.v1 import ingestion_pb2 as pb
from cxr.ingestion.v1 import ingestion_pb2_grpc as pb_grpc
from cxr.tls import ClientTLS, make_channel

CHUNK_SIZE = 1024 * 1024  # the API accepts chunks up to 1 MiB
REASON_KEY = "cxr-reason"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # rendered explanations (two PNGs per label) exceed gRPC's 4 MiB default
TERMINAL = frozenset({pb.JOB_STATUS_DONE, pb.JOB_STATUS_FAILED, pb.JOB_STATUS_SKIPPED})


class ClientError(Exception):
    """A call failed. ``code``: gRPC status name ("INVALID_ARGUMENT"); ``reason``: e.g. "NOT_DICOM"."""

    def __init__(self, code: str, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> ClientError:
        """Build from a failed call: status code, ``cxr-reason`` trailing metadata, details."""
        code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
        trailers = error.trailing_metadata() if isinstance(error, grpc.Call) else None
        reason = next((str(v) for k, v in (trailers or ()) if k == REASON_KEY), "") or code.name
        details = error.details() if isinstance(error, grpc.Call) else str(error)
        return cls(code.name, reason, details or code.name)


def job_status_name(status: int) -> str:
    """JOB_STATUS_DONE -> "done"."""
    return pb.JobStatus.Name(status).removeprefix("JOB_STATUS_").lower()  # type: ignore[arg-type]


class IngestionClient:
    """A channel to one ingestion service. ``timeout_s`` is the default deadline of each call; ``tls`` the
    certificates of a TLS / mutual-TLS server (``cxr.tls.ClientTLS.from_values()`` reads ``CXR_TLS_*``), None for
    plaintext. A server that refuses the client's certificate (or its absence) fails calls with UNAVAILABLE."""

    def __init__(self, address: str, *, timeout_s: float = 300.0, tls: ClientTLS | None = None) -> None:
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        self.address = address
        self.timeout_s = timeout_s
        self._channel = make_channel(address, tls, options)
        self._stub = pb_grpc.IngestionServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> IngestionClient:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def analyze(
        self,
        source: str | Path | bytes,
        *,
        chunk_size: int = CHUNK_SIZE,
        skip_cache: bool = False,
        skip_explanation: bool = False,
        client_name: str = "cxr-client",
        timeout_s: float | None = None,
        explanation_method: str = "",
    ) -> pb.AnalyzeResponse:
        """Stream one DICOM file (a path or its bytes) in ``chunk_size`` pieces, metadata first.

        Returns the AnalyzeResponse. Raises ClientError: for the server's rejections (e.g. INVALID_ARGUMENT /
        NOT_DICOM), for an unreachable server (UNAVAILABLE), and for a file that cannot be read
        (INVALID_ARGUMENT / FILE_NOT_READABLE), and ValueError for a chunk size outside 1..1 MiB.
        ``explanation_method``: "" (Grad-CAM) or a captum method for comparison (see the proto)."""
        if not 0 < chunk_size <= CHUNK_SIZE:
            raise ValueError(f"chunk_size must be in 1..{CHUNK_SIZE}, got {chunk_size}")
        meta = pb.AnalyzeMetadata(
            client_name=client_name, skip_cache=skip_cache, skip_explanation=skip_explanation,
            explanation_method=explanation_method,
        )  # fmt: skip
        if isinstance(source, bytes):
            meta.expected_size = len(source)
            return self._analyze(_byte_requests(meta, source, chunk_size), timeout_s)
        with _open_dicom(Path(source)) as f:
            meta.expected_size = os.fstat(f.fileno()).st_size
            return self._analyze(_file_requests(meta, f, chunk_size), timeout_s)

    def _analyze(self, requests: Iterator[pb.AnalyzeRequest], timeout_s: float | None) -> pb.AnalyzeResponse:
        try:
            return self._stub.Analyze(requests, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as e:
            raise ClientError.from_rpc(e) from None

    def get_explanation(
        self, job_id: str, *, render: bool = False, labels: tuple[str, ...] = (), positive_only: bool = False,
        timeout_s: float | None = None, dicom: bool = False,
    ) -> pb.Explanation:  # fmt: skip
        """The explanation of ``job_id`` as it is now (with overlay PNGs when ``render``, the DICOM results when
        ``dicom``). Raises ClientError (NOT_FOUND / JOB_NOT_FOUND for an unknown or expired job)."""
        request = pb.GetExplanationRequest(
            job_id=job_id, render=render, labels=labels, positive_only=positive_only, dicom=dicom
        )
        try:
            return self._stub.GetExplanation(request, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as e:
            raise ClientError.from_rpc(e) from None

    def watch(self, job_id: str, *, timeout_s: float | None = None) -> Iterator[pb.ExplanationProgress]:
        """Progress updates of ``job_id`` until the server ends the stream (DONE / FAILED) or the deadline.
        Raises ClientError (DEADLINE_EXCEEDED when ``timeout_s`` passes first)."""
        stream = self._stub.WatchExplanation(
            pb.WatchExplanationRequest(job_id=job_id), timeout=timeout_s or self.timeout_s
        )
        try:
            yield from stream
        except grpc.RpcError as e:
            raise ClientError.from_rpc(e) from None
        finally:
            stream.cancel()

    def wait_explanation(self, job_id: str, timeout_s: float) -> pb.ExplanationProgress:
        """Watch ``job_id`` until DONE, FAILED or SKIPPED, at most ``timeout_s`` seconds.

        Returns the last progress seen (not terminal if the time ran out: check ``status``). Raises
        ClientError for errors other than the deadline (e.g. JOB_NOT_FOUND, UNAVAILABLE)."""
        deadline = time.monotonic() + timeout_s
        last = pb.ExplanationProgress(job_id=job_id, status=pb.JOB_STATUS_UNSPECIFIED)
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                for progress in self.watch(job_id, timeout_s=remaining):
                    last = progress
                    if progress.status in TERMINAL:
                        return progress
            except ClientError as e:
                if e.code != grpc.StatusCode.DEADLINE_EXCEEDED.name:
                    raise
                break
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))  # stream ended early: watch again
        return last


def _open_dicom(path: Path) -> BinaryIO:
    """Open a file to upload; raises ClientError (INVALID_ARGUMENT / FILE_NOT_READABLE) when it cannot be read."""
    try:
        f = open(path, "rb")  # closed by the caller's with block
    except OSError as e:
        raise ClientError("INVALID_ARGUMENT", "FILE_NOT_READABLE", f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise ClientError("INVALID_ARGUMENT", "FILE_NOT_READABLE", f"{path} is not a regular file")
    return f


def _byte_requests(meta: pb.AnalyzeMetadata, data: bytes, chunk_size: int) -> Iterator[pb.AnalyzeRequest]:
    yield pb.AnalyzeRequest(metadata=meta)
    for start in range(0, len(data), chunk_size):
        yield pb.AnalyzeRequest(chunk=data[start : start + chunk_size])


def _file_requests(meta: pb.AnalyzeMetadata, f: BinaryIO, chunk_size: int) -> Iterator[pb.AnalyzeRequest]:
    yield pb.AnalyzeRequest(metadata=meta)
    while chunk := f.read(chunk_size):
        yield pb.AnalyzeRequest(chunk=chunk)
