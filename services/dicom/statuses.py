"""The one place where an instance's outcome becomes a C-STORE response status (PS3.4 B.2.3, PS3.7 C).

Every refusal carries an Error Comment (0000,0902) that starts with our machine-readable reason, the same as the
gRPC API's ``cxr-reason`` ("NO_PIXEL_DATA: the file has no Pixel Data (7FE0,0010) element"); the comment is a
LO value, so it is cut to 64 characters. The status code tells the sender whether to retry:

========  ==========================================  =========================================================
status    meaning (PS3.4)                             when
========  ==========================================  =========================================================
0x0000    Success                                     analysed (findings stored, explanation queued)
0xA700    Refused: Out of Resources                   OVERLOADED, RESULTS_BACKLOG: retry later
0xA701    Refused: Out of Resources                   UNAVAILABLE (Redis, TorchServe or the API is down): retry
0xA702    Refused: Out of Resources                   DEADLINE_EXCEEDED: the analysis took too long: retry
0xC000    Error: Cannot understand                    INVALID_ARGUMENT (NOT_DICOM, TRUNCATED_DICOM, ...)
0xC001    Error: Cannot understand                    FAILED_PRECONDITION (UNSUPPORTED_MODALITY, ...): permanent
0xC002    Error: Cannot understand                    TOO_LARGE: permanent for this instance
0x0110    Processing failure                          anything unexpected (logged here, no detail sent)
========  ==========================================  =========================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from cxr.core.errors import Category, CxrError

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DEPENDENCY_UNAVAILABLE = 0xA701
TOO_SLOW = 0xA702
CANNOT_UNDERSTAND = 0xC000
UNSUPPORTED = 0xC001
TOO_LARGE = 0xC002
PROCESSING_FAILURE = 0x0110
COMMENT_MAX = 64  # Error Comment is LO

# gRPC status name (cxr.client.ClientError.code) -> C-STORE status
_BY_GRPC_CODE = {
    "INVALID_ARGUMENT": CANNOT_UNDERSTAND,
    "FAILED_PRECONDITION": UNSUPPORTED,
    "RESOURCE_EXHAUSTED": OUT_OF_RESOURCES,
    "UNAVAILABLE": DEPENDENCY_UNAVAILABLE,
    "DEADLINE_EXCEEDED": TOO_SLOW,
    "CANCELLED": DEPENDENCY_UNAVAILABLE,
}
_BY_REASON = {"TOO_LARGE": TOO_LARGE}
_BY_CATEGORY = {
    Category.INVALID_INPUT: CANNOT_UNDERSTAND,
    Category.UNSUPPORTED: UNSUPPORTED,
    Category.TOO_LARGE: TOO_LARGE,
    Category.OVERLOADED: OUT_OF_RESOURCES,
    Category.UNAVAILABLE: DEPENDENCY_UNAVAILABLE,
}
RETRYABLE = frozenset({OUT_OF_RESOURCES, DEPENDENCY_UNAVAILABLE, TOO_SLOW})


@dataclass(frozen=True)
class StoreOutcome:
    """What one C-STORE is answered: ``status`` and, for a refusal, ``reason`` and a message for people."""

    status: int
    reason: str = ""
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS

    @property
    def retryable(self) -> bool:
        """True when the sender should send the instance again later."""
        return self.status in RETRYABLE

    @property
    def comment(self) -> str:
        """The Error Comment: "REASON: message", at most 64 characters."""
        text = f"{self.reason}: {self.message}" if self.message else self.reason
        text = "".join(c if c.isprintable() and c != "\\" else " " for c in text)
        return text if len(text) <= COMMENT_MAX else text[: COMMENT_MAX - 3] + "..."

    def as_dataset(self) -> Dataset:
        """The status dataset pynetdicom sends back (Status and, for a refusal, Error Comment)."""
        ds = Dataset()
        ds.Status = self.status
        if not self.ok:
            ds.ErrorComment = self.comment
        return ds


SUCCEEDED = StoreOutcome(SUCCESS)


def outcome_for_api_error(code: str, reason: str, message: str) -> StoreOutcome:
    """The gRPC API's refusal (status name, ``cxr-reason``, details) -> its C-STORE outcome.

    The details already start with the reason ("NO_PIXEL_DATA: ..."); that prefix is not repeated."""
    status = _BY_REASON.get(reason) or _BY_GRPC_CODE.get(code, PROCESSING_FAILURE)
    text = message.removeprefix(f"{reason}:").strip()
    if status == PROCESSING_FAILURE:
        text = "internal error; details are in the cxr logs"
    return StoreOutcome(status, reason or code, text)


def outcome_for_error(error: CxrError) -> StoreOutcome:
    """A typed error raised in the front door itself (outbox full, Redis down, a source the results cannot
    reference) -> its C-STORE outcome; an internal one gets a generic comment."""
    status = _BY_CATEGORY.get(error.category, PROCESSING_FAILURE)
    if status == PROCESSING_FAILURE:
        return StoreOutcome(status, "INTERNAL", "internal error; details are in the cxr logs")
    return StoreOutcome(status, error.reason, error.message)


def refused(status: int, reason: str, message: str) -> StoreOutcome:
    """A refusal decided by the front door itself (before or after the API call)."""
    return StoreOutcome(status, reason, message)
