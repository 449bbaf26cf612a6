"""The one Redis schema of results and jobs (cxr.core.jobs), as docs/ARCHITECTURE.md ("Redis keys") states it,
and the two services reading it the same way."""

from __future__ import annotations

import time

import pytest

from cxr.core.errors import InvalidInputError
from cxr.core.jobs import (
    JOB_BLOBS,
    TERMINAL,
    JobStatus,
    blob_key,
    check_job_id,
    dicom_key,
    display_key,
    findings_key,
    heatmaps_key,
    input_key,
    is_job_id,
    job_key,
    new_job_fields,
    result_key,
    source_key,
)
from cxr.ingestion.v1 import ingestion_pb2 as pb
from services.ingestion.explanation_view import STATUS, job_status

pytestmark = pytest.mark.unit

JOB = "0123456789abcdef0123456789abcdef"


def test_job_keys_follow_the_architecture_document() -> None:
    assert job_key(JOB) == f"cxr:job:{JOB}"
    named = (input_key, dicom_key, display_key, findings_key, heatmaps_key, source_key)
    assert [key(JOB) for key in named] == [f"cxr:job:{JOB}:{blob}" for blob in JOB_BLOBS]
    assert [blob_key(JOB, blob) for blob in JOB_BLOBS] == [key(JOB) for key in named]


def test_an_unknown_blob_name_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="pixels"):
        blob_key(JOB, "pixels")


def test_result_keys_never_contain_the_sop_uid() -> None:
    uid = "1.2.840.113619.2.55.3.604688119"
    key = result_key("0.1.0", uid)
    assert key.startswith("cxr:result:0.1.0:") and uid not in key and len(key.rsplit(":", 1)[1]) == 32
    assert result_key("0.1.0", uid + "1") != key and result_key("0.2.0", uid) != key


@pytest.mark.parametrize("job_id", ["", "ABCDEF" * 6, "../../etc/passwd", 42, None, "0" * 31, "0" * 33])
def test_anything_but_32_lowercase_hex_digits_is_not_a_job_id(job_id: object) -> None:
    assert not is_job_id(job_id)
    with pytest.raises(InvalidInputError) as err:
        check_job_id(job_id)
    assert err.value.reason == "BAD_JOB_ID"


def test_a_uuid4_hex_is_a_job_id() -> None:
    assert is_job_id(JOB) and check_job_id(JOB) == JOB


def test_a_new_job_hash_has_every_field_the_worker_reads() -> None:
    before = time.time()
    fields = new_job_fields(JobStatus.QUEUED, "waiting", model_name="m", model_version="1.0")
    assert set(fields) == {"status", "progress", "message", "failure_reason", "attempts", "created", "updated",
                           "model_name", "model_version", "explanation_method"}  # fmt: skip
    assert (fields["status"], fields["progress"], fields["attempts"], fields["failure_reason"]) == (
        "queued",
        "0",
        "0",
        "",
    )
    assert fields["created"] == fields["updated"] and before - 0.01 <= float(fields["created"]) <= time.time() + 0.01


def test_every_job_status_has_its_api_status() -> None:
    assert set(STATUS) == set(JobStatus)
    assert {job_status({"status": s.value}) for s in TERMINAL} == {
        pb.JOB_STATUS_DONE,
        pb.JOB_STATUS_FAILED,
        pb.JOB_STATUS_SKIPPED,
    }
