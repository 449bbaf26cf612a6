"""Typed domain errors. Each carries a stable machine-readable ``reason`` and a message a PACS engineer
understands. Transport layers map the ``category`` to their own status codes in one place (for gRPC:
``services.ingestion.errors_interceptor``)."""

from __future__ import annotations

from enum import StrEnum


class Category(StrEnum):
    """What kind of failure this is, independent of any transport."""

    INVALID_INPUT = "invalid_input"  # the caller sent something we will never accept -> INVALID_ARGUMENT
    UNSUPPORTED = "unsupported"  # valid but outside what this deployment handles -> FAILED_PRECONDITION
    TOO_LARGE = "too_large"  # size cap exceeded: permanent for this file -> INVALID_ARGUMENT
    OVERLOADED = "overloaded"  # back off and retry -> RESOURCE_EXHAUSTED
    UNAVAILABLE = "unavailable"  # a dependency is down; retry later -> UNAVAILABLE
    NOT_FOUND = "not_found"  # unknown job / expired result -> NOT_FOUND
    TIMEOUT = "timeout"  # the caller went silent too long (e.g. an idle upload stream); resend -> DEADLINE_EXCEEDED
    INTERNAL = "internal"


class CxrError(Exception):
    """Base of every expected error. ``reason`` is a short UPPER_SNAKE code, stable across releases."""

    category: Category = Category.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class InvalidInputError(CxrError):
    category = Category.INVALID_INPUT
    reason = "INVALID_INPUT"


class NotDicomError(InvalidInputError):
    reason = "NOT_DICOM"


class TruncatedDicomError(InvalidInputError):
    reason = "TRUNCATED_DICOM"


class NoPixelDataError(InvalidInputError):
    reason = "NO_PIXEL_DATA"


class TooLargeError(CxrError):
    category = Category.TOO_LARGE
    reason = "TOO_LARGE"


class UnsupportedError(CxrError):
    category = Category.UNSUPPORTED
    reason = "UNSUPPORTED"


class UnsupportedModalityError(UnsupportedError):
    reason = "UNSUPPORTED_MODALITY"


class UnsupportedPhotometricError(UnsupportedError):
    reason = "UNSUPPORTED_PHOTOMETRIC_INTERPRETATION"


class UnsupportedTransferSyntaxError(UnsupportedError):
    reason = "UNSUPPORTED_TRANSFER_SYNTAX"


class LateralViewError(UnsupportedError):
    reason = "LATERAL_VIEW"


class OverloadedError(CxrError):
    category = Category.OVERLOADED
    reason = "OVERLOADED"


class DependencyUnavailableError(CxrError):
    category = Category.UNAVAILABLE
    reason = "DEPENDENCY_UNAVAILABLE"


class NotFoundError(CxrError):
    category = Category.NOT_FOUND
    reason = "NOT_FOUND"


class ManifestError(CxrError):
    """An ensemble directory or manifest is malformed (a deployment error, not a caller error)."""

    category = Category.INTERNAL
    reason = "BAD_MODEL_MANIFEST"
