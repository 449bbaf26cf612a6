"""The ingestion service's pieces that need no running service: category -> status mapping, the interceptor's
behaviour on a minimal servicer context, every refusal of the upload and answer readers, and the explanation
reader's job-state parsing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cxr.core import errors as core
from cxr.core.manifest import Manifest, ModelEntry
from cxr.ingestion.v1 import ingestion_pb2 as pb
from services.ingestion.errors import INTERNAL_DETAILS, REASON_KEY, STATUS_BY_CATEGORY, ErrorInterceptor, status_for
from services.ingestion.explanation_view import JobNotFoundError, progress_message, select_labels
from services.ingestion.inference_client import (
    InferenceFailedError,
    InferenceUnavailableError,
    parse_prediction,
    read_inference_token,
)
from services.ingestion.pipeline import ConcurrencyLimit, ModelMismatchError, check_prediction, receive_upload
from services.ingestion.result_store import StoreUnavailableError

pytestmark = pytest.mark.unit

SERVICE = "/cxr.ingestion.v1.IngestionService/"


# -- category -> status ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("error", "code"),
    [
        (core.NotDicomError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (core.TruncatedDicomError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (core.NoPixelDataError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (core.TooLargeError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (core.UnsupportedModalityError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (core.UnsupportedPhotometricError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (core.LateralViewError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (core.OverloadedError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (InferenceUnavailableError("x"), grpc.StatusCode.UNAVAILABLE),
        (StoreUnavailableError("x"), grpc.StatusCode.UNAVAILABLE),
        (JobNotFoundError("x"), grpc.StatusCode.NOT_FOUND),
    ],
)
def test_expected_errors_keep_their_reason_and_message(error: core.CxrError, code: grpc.StatusCode) -> None:
    got_code, reason, details = status_for(error)
    assert got_code is code
    assert reason == error.reason
    assert details == f"{error.reason}: x"


@pytest.mark.parametrize(
    "error",
    [
        ValueError("secret detail 1.2.840.113619"),
        core.ManifestError("secret detail"),
        InferenceFailedError("secret detail"),
        ModelMismatchError("secret detail"),
    ],
)
def test_internal_and_unknown_errors_send_nothing_but_a_generic_text(error: Exception) -> None:
    code, reason, details = status_for(error)
    assert (code, reason, details) == (grpc.StatusCode.INTERNAL, "INTERNAL", INTERNAL_DETAILS)
    assert "secret" not in details


def test_every_category_has_a_status() -> None:
    assert set(STATUS_BY_CATEGORY) == set(core.Category)


# -- the interceptor on a minimal servicer context ---------------------------------------------------------------
class _Aborted(Exception):
    pass


class RecordingContext:
    """The part of grpc.ServicerContext the interceptor uses; abort raises like gRPC's does."""

    def __init__(self, active: bool = True) -> None:
        self.active = active
        self.trailing: tuple[tuple[str, str], ...] = ()
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def is_active(self) -> bool:
        return self.active

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.trailing = metadata

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise _Aborted()


class CallDetails(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def _intercept(handler: grpc.RpcMethodHandler, method: str) -> tuple[Any, list[tuple[str, Any, Any]]]:
    outcomes: list[tuple[str, Any, Any]] = []
    interceptor = ErrorInterceptor(lambda rpc, code, reason: outcomes.append((rpc, code, reason)))
    return interceptor.intercept_service(lambda details: handler, CallDetails(method)), outcomes


def test_interceptor_maps_a_domain_error_to_status_metadata_and_details() -> None:
    def behavior(request: Any, context: Any) -> Any:
        raise core.NoPixelDataError("the file has no Pixel Data")

    wrapped, outcomes = _intercept(grpc.unary_unary_rpc_method_handler(behavior), SERVICE + "GetExplanation")
    ctx = RecordingContext()
    with pytest.raises(_Aborted):
        wrapped.unary_unary(None, ctx)
    assert ctx.code is grpc.StatusCode.INVALID_ARGUMENT
    assert ctx.details == "NO_PIXEL_DATA: the file has no Pixel Data"
    assert ctx.trailing == ((REASON_KEY, "NO_PIXEL_DATA"),)
    assert outcomes == [("GetExplanation", grpc.StatusCode.INVALID_ARGUMENT, "NO_PIXEL_DATA")]


def test_interceptor_turns_a_bug_into_internal_and_logs_the_traceback(caplog: pytest.LogCaptureFixture) -> None:
    def behavior(request: Iterator[Any], context: Any) -> Any:
        return {"present": 1}["missing"]  # a real bug: KeyError

    wrapped, outcomes = _intercept(grpc.stream_unary_rpc_method_handler(behavior), SERVICE + "Analyze")
    ctx = RecordingContext()
    with pytest.raises(_Aborted):
        wrapped.stream_unary(iter(()), ctx)
    assert (ctx.code, ctx.details) == (grpc.StatusCode.INTERNAL, INTERNAL_DETAILS)
    assert ctx.trailing == ((REASON_KEY, "INTERNAL"),)
    assert outcomes == [("Analyze", grpc.StatusCode.INTERNAL, "INTERNAL")]
    assert any(r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)


def test_interceptor_maps_errors_raised_midway_through_a_stream() -> None:
    def behavior(request: Any, context: Any) -> Iterator[int]:
        yield 1
        raise JobNotFoundError("unknown or expired job id")

    wrapped, outcomes = _intercept(grpc.unary_stream_rpc_method_handler(behavior), SERVICE + "WatchExplanation")
    ctx = RecordingContext()
    stream = wrapped.unary_stream(None, ctx)
    assert next(stream) == 1
    with pytest.raises(_Aborted):
        next(stream)
    assert ctx.code is grpc.StatusCode.NOT_FOUND
    assert outcomes == [("WatchExplanation", grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND")]


def test_interceptor_counts_successes() -> None:
    wrapped, outcomes = _intercept(grpc.unary_unary_rpc_method_handler(lambda r, c: "ok"), SERVICE + "GetExplanation")
    assert wrapped.unary_unary(None, RecordingContext()) == "ok"
    assert outcomes == [("GetExplanation", grpc.StatusCode.OK, None)]


def test_a_cancelled_call_is_not_answered_and_not_called_internal() -> None:
    def behavior(request: Any, context: Any) -> Any:
        raise grpc.RpcError()  # what gRPC's request iterator raises once the client has cancelled

    wrapped, outcomes = _intercept(grpc.stream_unary_rpc_method_handler(behavior), SERVICE + "Analyze")
    ctx = RecordingContext(active=False)
    with pytest.raises(grpc.RpcError):
        wrapped.stream_unary(iter(()), ctx)
    assert ctx.code is None
    assert outcomes == [("Analyze", grpc.StatusCode.CANCELLED, None)]


def test_other_services_pass_through_untouched() -> None:
    handler = grpc.unary_unary_rpc_method_handler(lambda r, c: "ok")
    wrapped, _ = _intercept(handler, "/grpc.health.v1.Health/Check")
    assert wrapped is handler


# -- upload reception --------------------------------------------------------------------------------------------
def _meta(**kw: Any) -> pb.AnalyzeRequest:
    return pb.AnalyzeRequest(metadata=pb.AnalyzeMetadata(**kw))


def _chunk(data: bytes) -> pb.AnalyzeRequest:
    return pb.AnalyzeRequest(chunk=data)


def test_upload_is_joined_in_order() -> None:
    upload = receive_upload([_meta(client_name="AE1", expected_size=6), _chunk(b"abc"), _chunk(b"def")], 10)
    assert upload.data == b"abcdef"
    assert upload.metadata.client_name == "AE1"


@pytest.mark.parametrize(
    ("requests", "error", "reason"),
    [
        ([], core.InvalidInputError, "EMPTY_UPLOAD"),
        ([_meta(skip_cache=True)], core.InvalidInputError, "EMPTY_UPLOAD"),
        ([_chunk(b"")], core.InvalidInputError, "EMPTY_UPLOAD"),
        ([_chunk(b"ab"), _meta()], core.InvalidInputError, "METADATA_MISMATCH"),
        ([_meta(expected_size=-1), _chunk(b"ab")], core.InvalidInputError, "METADATA_MISMATCH"),
        ([_meta(expected_size=11)], core.TooLargeError, "TOO_LARGE"),
        ([_chunk(b"123456"), _chunk(b"78901")], core.TooLargeError, "TOO_LARGE"),
        ([_meta(expected_size=9), _chunk(b"1234")], core.TruncatedDicomError, "TRUNCATED_DICOM"),
        ([_meta(expected_size=3), _chunk(b"1234")], core.TruncatedDicomError, "TRUNCATED_DICOM"),
    ],
)
def test_bad_uploads_are_refused(requests: list[pb.AnalyzeRequest], error: type, reason: str) -> None:
    with pytest.raises(core.CxrError) as info:
        receive_upload(requests, 10)
    assert type(info.value) is error and info.value.reason == reason


def test_the_size_cap_stops_reading_as_soon_as_it_is_crossed() -> None:
    consumed: list[int] = []

    def stream() -> Iterator[pb.AnalyzeRequest]:
        for i in range(100):
            consumed.append(i)
            yield _chunk(b"x" * 4)

    with pytest.raises(core.TooLargeError):
        receive_upload(stream(), 10)
    assert len(consumed) == 3  # 12 bytes > 10: the third chunk is the last one read


def test_a_full_concurrency_limit_refuses_at_once() -> None:
    limit = ConcurrencyLimit(1, "calls")
    with limit.hold():
        with pytest.raises(core.OverloadedError) as info:
            with limit.hold():
                pass
        assert info.value.reason == "OVERLOADED"
    with limit.hold():  # released again
        pass


# -- TorchServe answers ------------------------------------------------------------------------------------------
MANIFEST = Manifest(
    name="m",
    version="1",
    labels=("A", "B"),
    thresholds=(0.5, 0.5),
    models=(ModelEntry(name="net", arch="resnet18", weights="net.pt"),),
)


def _answer(**override: Any) -> bytes:
    finding = {"probability": 0.2, "model_probabilities": {"net": 0.2}, "votes": 0, "n_models": 1}
    doc: dict[str, Any] = {
        "model": {"name": "m", "version": "1", "members": ["net"], "ensemble_rule": "ctp", "intended_use": "r"},
        "labels": ["A", "B"],
        "findings": [{"label": lab, **finding, "threshold": 0.5, "positive": False} for lab in ("A", "B")],
    }
    doc.update(override)
    return json.dumps(doc).encode()


def test_a_good_answer_becomes_model_info_and_findings() -> None:
    model, findings = check_prediction(parse_prediction(_answer()), MANIFEST)
    assert (model.name, model.version, list(model.members)) == ("m", "1", ["net"])
    assert [f.label for f in findings] == ["A", "B"]
    assert findings[0].model_probabilities["net"] == pytest.approx(0.2)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x89PNG not json",
        b"[1, 2]",
        json.dumps({"error": {"reason": "BAD_MODEL_INPUT", "message": "model input must be float32"}}).encode(),
        json.dumps({"model": {}, "labels": []}).encode(),
    ],
)
def test_unreadable_or_error_answers_are_inference_failures(raw: bytes) -> None:
    with pytest.raises(InferenceFailedError):
        parse_prediction(raw)


def test_an_answer_of_another_ensemble_is_a_mismatch() -> None:
    other = _answer(model={"name": "m", "version": "2"})
    with pytest.raises(ModelMismatchError):
        check_prediction(parse_prediction(other), MANIFEST)
    reordered = json.loads(_answer())
    reordered["findings"].reverse()
    with pytest.raises(ModelMismatchError):
        check_prediction(parse_prediction(json.dumps(reordered).encode()), MANIFEST)


def test_a_malformed_finding_is_an_inference_failure() -> None:
    doc = json.loads(_answer())
    del doc["findings"][1]["votes"]
    with pytest.raises(InferenceFailedError):
        check_prediction(parse_prediction(json.dumps(doc).encode()), MANIFEST)


def test_token_file_problems_are_reported_as_inference_unavailable(tmp_path: Path) -> None:
    good = tmp_path / "key_file.json"
    good.write_text(json.dumps({"inference": {"key": "abc"}, "management": {"key": "def"}}))
    assert read_inference_token(good) == "abc"
    broken = tmp_path / "broken.json"
    broken.write_text('{"inference": ')
    for path in (broken, tmp_path / "missing.json"):
        with pytest.raises(InferenceUnavailableError):
            read_inference_token(path)


# -- explanation reading -----------------------------------------------------------------------------------------------
def test_selecting_an_unknown_label_is_refused() -> None:
    findings = [{"label": "A", "positive": True}, {"label": "B", "positive": False}]
    assert [f["label"] for f in select_labels(findings, [], positive_only=True)] == ["A"]
    assert [f["label"] for f in select_labels(findings, ["B"], positive_only=False)] == ["B"]
    with pytest.raises(core.InvalidInputError) as info:
        select_labels(findings, ["Z"], positive_only=False)
    assert info.value.reason == "UNKNOWN_LABEL"


def test_unreadable_progress_in_the_job_hash_reads_as_zero() -> None:
    progress = progress_message("0" * 32, {"status": "running", "progress": "half"})
    assert (progress.status, progress.progress) == (pb.JOB_STATUS_RUNNING, 0.0)
    assert progress_message("0" * 32, {"status": "exploded"}).status == pb.JOB_STATUS_UNSPECIFIED
