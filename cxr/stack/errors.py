"""Errors of the local stack supervisor (``cxr up / down / status``). Deployment errors, not caller errors."""

from __future__ import annotations

from cxr.core.errors import Category, CxrError


class StackError(CxrError):
    """Base of every expected failure of the stack supervisor."""

    category = Category.INTERNAL
    reason = "STACK_ERROR"


class BadSettingError(StackError):
    """An environment variable of the stack has a value that cannot be used (e.g. a port that is not a number)."""

    reason = "BAD_SETTING"


class PortInUseError(StackError):
    """A port the stack needs is already bound by another process."""

    category = Category.UNAVAILABLE
    reason = "PORT_IN_USE"


class ModelDirError(StackError):
    """The ensemble directory to serve is missing or has no readable manifest."""

    reason = "MODEL_DIR_INVALID"


class ServiceStartError(StackError):
    """A service exited or did not become ready in time while the stack was starting."""

    category = Category.UNAVAILABLE
    reason = "SERVICE_START_FAILED"

    def __init__(self, message: str, *, service: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.service = service
        self.log_tail = log_tail
