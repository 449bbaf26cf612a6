"""The one place where domain errors become gRPC statuses.

``ErrorInterceptor`` wraps every method of the ingestion service: a ``CxrError`` becomes the status of its
category, its ``reason`` goes into the trailing metadata ``cxr-reason`` and prefixes the details
("NO_PIXEL_DATA: ..."); anything else becomes INTERNAL with a generic message and a logged traceback.
The servicer never calls ``context.abort`` itself; it raises.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import grpc

from cxr.core.errors import Category, CxrError

logger = logging.getLogger(__name__)

REASON_KEY = "cxr-reason"
SERVICE_PREFIX = "/cxr.ingestion.v1.IngestionService/"
INTERNAL_DETAILS = "INTERNAL: internal error (logged on the server; no detail is sent)"

STATUS_BY_CATEGORY: dict[Category, grpc.StatusCode] = {
    Category.INVALID_INPUT: grpc.StatusCode.INVALID_ARGUMENT,
    Category.TOO_LARGE: grpc.StatusCode.INVALID_ARGUMENT,
    Category.UNSUPPORTED: grpc.StatusCode.FAILED_PRECONDITION,
    Category.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Category.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Category.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Category.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    Category.INTERNAL: grpc.StatusCode.INTERNAL,
}

# (rpc name, final status code, reason or None) -> None; the metrics module records outcomes through this.
OutcomeHook = Callable[[str, grpc.StatusCode, str | None], None]


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """An exception -> (status code, reason, details). Internal and unknown errors get a generic text."""
    if isinstance(error, CxrError) and error.category is not Category.INTERNAL:
        return STATUS_BY_CATEGORY[error.category], error.reason, f"{error.reason}: {error.message}"
    return grpc.StatusCode.INTERNAL, "INTERNAL", INTERNAL_DETAILS


def _ignore_outcome(rpc: str, code: grpc.StatusCode, reason: str | None) -> None:
    """Default outcome hook: records nothing."""


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions of the ingestion service's handlers to statuses and reports every call's outcome.

    Other services on the same server (health, reflection) pass through untouched.
    """

    def __init__(self, on_outcome: OutcomeHook | None = None) -> None:
        self._on_outcome = on_outcome or _ignore_outcome

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        rpc = method.removeprefix(SERVICE_PREFIX)
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._wrap_single(handler.unary_unary, rpc), **kwargs)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._wrap_single(handler.stream_unary, rpc), **kwargs)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._wrap_stream(handler.unary_stream, rpc), **kwargs)
        return handler  # no bidirectional methods in this service

    def _wrap_single(self, behavior: Callable[[Any, grpc.ServicerContext], Any], rpc: str) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                response = behavior(request, context)
            except Exception as error:  # noqa: BLE001 - every failure gets a status here, by design
                self._fail(rpc, context, error)
            self._on_outcome(rpc, grpc.StatusCode.OK, None)
            return response

        return wrapped

    def _wrap_stream(self, behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]], rpc: str) -> Any:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from behavior(request, context)
            except Exception as error:  # noqa: BLE001 - every failure gets a status here, by design
                self._fail(rpc, context, error)
            self._on_outcome(rpc, grpc.StatusCode.OK, None)

        return wrapped

    def _fail(self, rpc: str, context: grpc.ServicerContext, error: Exception) -> NoReturn:
        """Record and send the status of ``error``; always raises (grpc's abort exception or ``error``)."""
        if not context.is_active():  # the client went away (cancelled or deadline): nobody to answer
            logger.info("%s ended early: client cancelled or deadline exceeded", rpc)
            self._on_outcome(rpc, grpc.StatusCode.CANCELLED, None)
            raise error
        code, reason, details = status_for(error)
        if code is grpc.StatusCode.INTERNAL:
            logger.error("%s failed with an internal error", rpc, exc_info=error)
        else:
            logger.info("%s rejected: %s", rpc, reason)
        self._on_outcome(rpc, code, reason)
        context.set_trailing_metadata(((REASON_KEY, reason),))
        context.abort(code, details)
        raise error  # not reached: abort raises
