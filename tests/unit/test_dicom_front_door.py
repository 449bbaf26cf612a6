"""The DICOM front door's pure parts: settings (CLI > env > default, the allow-list policy), the C-STORE status of
every kind of outcome, the retry backoff, and its import surface (never torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cxr.core.errors import DependencyUnavailableError, InvalidInputError, OverloadedError, TooLargeError
from cxr.stack.settings import StackSettings
from services.dicom import statuses
from services.dicom.delivery import backoff_s
from services.dicom.settings import ANY_AE, Destination, SettingsError, load_settings

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def test_defaults_let_a_plain_local_storescu_in() -> None:
    s = load_settings([], {})
    assert (s.host, s.port, s.ae_title) == ("127.0.0.1", 11112, "CXR")
    assert s.allowed_aets == (ANY_AE,) and s.any_calling_ae
    assert s.destination is None
    assert (s.max_associations, s.max_concurrent) == (8, 4)
    assert s.ingestion_addr == "127.0.0.1:50151"


def test_cli_overrides_environment_and_lists_are_parsed() -> None:
    env = {"CXR_DICOM_ALLOWED_AETS": "PACS1, ROUTER ", "CXR_DICOM_DESTINATION": "ORTHANC@10.0.0.5:4242",
           "CXR_DICOM_MAX_ASSOCIATIONS": "3"}  # fmt: skip
    s = load_settings(["--max-associations", "5", "--addr", "0.0.0.0:104"], env)
    assert s.max_associations == 5
    assert s.allowed_aets == ("PACS1", "ROUTER") and not s.any_calling_ae
    assert s.destination == Destination("ORTHANC", "10.0.0.5", 4242)
    assert str(s.destination) == "ORTHANC@10.0.0.5:4242"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CXR_DICOM_ADDR": "0.0.0.0:11112"}, "CXR_DICOM_ALLOWED_AETS must name"),  # "*" beyond loopback
        ({"CXR_DICOM_AE_TITLE": "A" * 17}, "CXR_DICOM_AE_TITLE"),
        ({"CXR_DICOM_AE_TITLE": "BAD\\AE"}, "CXR_DICOM_AE_TITLE"),
        ({"CXR_DICOM_ALLOWED_AETS": " , "}, "CXR_DICOM_ALLOWED_AETS"),
        ({"CXR_DICOM_DESTINATION": "127.0.0.1:4242"}, "AET@host:port"),
        ({"CXR_DICOM_DESTINATION": "PACS@127.0.0.1:0"}, "must not be 0"),
        ({"CXR_DICOM_MAX_CONCURRENT": "0"}, "CXR_DICOM_MAX_CONCURRENT"),
        ({"CXR_DICOM_SEND_RETRY_S": "60", "CXR_DICOM_SEND_RETRY_MAX_S": "10"}, "must not exceed"),
        ({"CXR_REDIS_URL": "http://user:secret@host"}, "CXR_REDIS_URL"),
    ],
)
def test_bad_settings_fail_fast_naming_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings([], env)
    assert named in str(caught.value)
    assert "secret" not in str(caught.value)


def test_an_explicit_allow_list_may_listen_beyond_loopback() -> None:
    s = load_settings([], {"CXR_DICOM_ADDR": "0.0.0.0:11112", "CXR_DICOM_ALLOWED_AETS": "PACS1"})
    assert s.host == "0.0.0.0" and s.allowed_aets == ("PACS1",)


@pytest.mark.parametrize(
    ("code", "reason", "status", "retryable"),
    [
        ("INVALID_ARGUMENT", "NO_PIXEL_DATA", 0xC000, False),
        ("INVALID_ARGUMENT", "TOO_LARGE", 0xC002, False),
        ("FAILED_PRECONDITION", "UNSUPPORTED_MODALITY", 0xC001, False),
        ("RESOURCE_EXHAUSTED", "OVERLOADED", 0xA700, True),
        ("UNAVAILABLE", "INFERENCE_UNAVAILABLE", 0xA701, True),
        ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED", 0xA702, True),
        ("INTERNAL", "INTERNAL", 0x0110, False),
        ("UNKNOWN", "UNKNOWN", 0x0110, False),
    ],
)
def test_api_refusals_become_c_store_statuses(code: str, reason: str, status: int, retryable: bool) -> None:
    outcome = statuses.outcome_for_api_error(code, reason, f"{reason}: the file has no Pixel Data (7FE0,0010)")
    assert (outcome.status, outcome.retryable, outcome.ok) == (status, retryable, False)
    ds = outcome.as_dataset()
    assert ds.Status == status
    assert ds.ErrorComment.startswith(f"{reason}:") and len(ds.ErrorComment) <= 64
    assert ds.ErrorComment.count(reason) == 1  # the API's "REASON: " prefix is not repeated
    if status == 0x0110:
        assert "Pixel Data" not in ds.ErrorComment  # internal details stay in the log


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (OverloadedError("outbox full", reason="RESULTS_BACKLOG"), 0xA700),
        (DependencyUnavailableError("redis down", reason="STORE_UNAVAILABLE"), 0xA701),
        (InvalidInputError("no study UID", reason="BAD_SOURCE_DICOM"), 0xC000),
        (TooLargeError("too big"), 0xC002),
    ],
)
def test_front_door_errors_become_c_store_statuses(error: Exception, status: int) -> None:
    outcome = statuses.outcome_for_error(error)  # type: ignore[arg-type]
    assert outcome.status == status
    assert outcome.comment.startswith(error.reason)  # type: ignore[attr-defined]


def test_success_has_no_error_comment_and_long_comments_are_cut() -> None:
    assert "ErrorComment" not in statuses.SUCCEEDED.as_dataset()
    long = statuses.refused(0xC000, "NOT_DICOM", "x" * 500 + "\\ back\x00slash")
    assert len(long.comment) == 64 and long.comment.endswith("...")
    assert "\\" not in statuses.refused(0xC000, "R", "a\\b").comment  # a backslash would split the LO value


def test_backoff_doubles_up_to_its_cap() -> None:
    delays = [backoff_s(n, 5.0, 600.0) for n in range(1, 12)]
    assert 4.5 <= delays[0] <= 5.5 and 9.0 <= delays[1] <= 11.0
    assert all(d <= 660.0 for d in delays) and delays[-1] >= 540.0


def test_stack_settings_give_the_dicom_door_its_own_ports_and_title() -> None:
    s = StackSettings.from_env({"CXR_DICOM_PORT": "11999", "CXR_DICOM_AE_TITLE": "MYCXR"}, cwd=REPO)
    assert s.dicom_address == "127.0.0.1:11999" and s.dicom_ae_title == "MYCXR"
    assert s.service_ports("dicom") == {"CXR_DICOM_PORT": 11999, "CXR_DICOM_METRICS_PORT": 9153}
    assert s.addresses()["dicom"] == "127.0.0.1:11999"


def test_the_dicom_service_never_imports_torch() -> None:
    code = (
        "import sys, services.dicom.server, services.dicom.__main__; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
