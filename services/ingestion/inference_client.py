"""Client of TorchServe's gRPC inference API: one long-lived channel, a deadline per call, bounded retries.

TorchServe answers ``Predictions`` with the handler's JSON document (docs/ARCHITECTURE.md). When token
authorisation is on, the inference key from TorchServe's ``key_file.json`` is sent as gRPC metadata
``authorization: Bearer <key>`` (what TorchServe 0.12's GRPCInterceptor reads); the file is read again when
TorchServe answers PERMISSION_DENIED, because keys expire and are replaced.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from cxr.core.errors import CxrError, DependencyUnavailableError
from cxr.core.wire import INPUT_KEY
from cxr.vendor.torchserve import inference_pb2, inference_pb2_grpc

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),  # retries are ours: bounded, with backoff, inside the caller's deadline
    # Reconnect quickly once TorchServe is back (gRPC's default backoff grows to 2 minutes).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)
# TorchServe down, restarting, no free worker, or a worker that died (its 503): worth another attempt.
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
# Answers that mean "inference is not possible right now" (deployment or load), never "your input is bad".
_UNAVAILABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.NOT_FOUND,  # model not registered (yet)
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)


class InferenceUnavailableError(DependencyUnavailableError):
    """TorchServe did not answer in time (after retries) or cannot serve the model now. Nothing was stored."""

    reason = "INFERENCE_UNAVAILABLE"


class InferenceFailedError(CxrError):
    """TorchServe answered, but with an error or a document we cannot read (a server-side bug)."""

    reason = "INFERENCE_FAILED"


@dataclass(frozen=True)
class Prediction:
    """The handler's answer: ``raw`` JSON bytes as sent (stored for the worker) and the parsed ``document``."""

    raw: bytes
    document: dict[str, Any]


def read_inference_token(key_file: Path) -> str:
    """TorchServe ``key_file.json`` -> the inference key. Raises InferenceUnavailableError when unreadable."""
    try:
        return str(json.loads(key_file.read_text())["inference"]["key"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InferenceUnavailableError(f"cannot read TorchServe's inference key from {key_file}: {e}") from e


def parse_prediction(raw: bytes) -> Prediction:
    """Handler answer bytes -> Prediction. Raises InferenceFailedError for an error document or non-JSON."""
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InferenceFailedError(f"TorchServe answered with something that is not JSON: {e}") from e
    if not isinstance(document, dict):
        raise InferenceFailedError("TorchServe answered with JSON that is not an object")
    if "error" in document:
        error = document["error"] if isinstance(document["error"], dict) else {"message": document["error"]}
        raise InferenceFailedError(f"the handler refused our input: {error.get('reason')}: {error.get('message')}")
    for key in ("model", "labels", "findings"):
        if key not in document:
            raise InferenceFailedError(f"TorchServe's answer has no {key!r}")
    return Prediction(raw=bytes(raw), document=document)


class TorchServeClient:
    """Predictions against one TorchServe model over a single long-lived channel (thread-safe)."""

    def __init__(
        self,
        address: str,
        model_name: str,
        *,
        timeout_s: float,
        retries: int,
        token_file: Path | None = None,
        backoff_s: float = 0.1,
        on_retry: Callable[[], None] | None = None,
    ) -> None:
        self.address = address
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.retries = retries
        self._token_file = token_file
        self._token: str | None = None
        self._token_lock = threading.Lock()
        self._backoff_s = backoff_s
        self._on_retry = on_retry or (lambda: None)
        self.last_success = float("-inf")  # time.monotonic() of the last good answer (health checks read it)
        self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._stub = inference_pb2_grpc.InferenceAPIsServiceStub(self._channel)

    def close(self) -> None:
        """Close the channel; calls in progress fail with CANCELLED."""
        self._channel.close()

    def predict(self, model_input: bytes, *, timeout_s: float | None = None) -> Prediction:
        """Send one model input (``cxr.core.wire`` layout 1: 16-byte header + raw float16); return the handler's
        answer.

        The whole call, retries included, ends within ``timeout_s`` (default: the client's). UNAVAILABLE is
        retried up to ``retries`` times with exponential backoff. Raises InferenceUnavailableError when
        TorchServe cannot answer, InferenceFailedError when it answers with an error.
        """
        request = inference_pb2.PredictionsRequest(model_name=self.model_name, input={INPUT_KEY: model_input})
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        token_reloaded = False
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise InferenceUnavailableError(f"TorchServe gave no answer within {self.timeout_s:g} s")
            try:
                response = self._stub.Predictions(request, timeout=remaining, metadata=self._metadata())
                prediction = parse_prediction(response.prediction)
                self.last_success = time.monotonic()
                return prediction
            except grpc.RpcError as e:
                code = e.code()
                if code is grpc.StatusCode.PERMISSION_DENIED and self._token_file and not token_reloaded:
                    token_reloaded = True
                    self._reload_token()
                    continue
                if code not in _RETRYABLE or attempt >= self.retries:
                    raise _error_for(e, attempts=attempt + 1) from None
            attempt += 1
            self._on_retry()
            time.sleep(min(self._backoff_s * 2 ** (attempt - 1), max(0.0, deadline - time.monotonic())))

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self._token_file is None:
            return ()
        with self._token_lock:
            if self._token is None:
                self._token = read_inference_token(self._token_file)
            return (("authorization", f"Bearer {self._token}"),)

    def _reload_token(self) -> None:
        logger.info("TorchServe refused the inference key; reading %s again", self._token_file)
        with self._token_lock:
            self._token = None


def _error_for(error: grpc.RpcError, *, attempts: int) -> CxrError:
    """Final gRPC error of TorchServe -> our error. Details of TorchServe go to the log, not to the caller."""
    code = error.code()  # type: ignore[attr-defined]
    details = error.details()  # type: ignore[attr-defined]
    if code in _UNAVAILABLE:
        logger.warning("TorchServe unavailable after %d attempt(s): %s %s", attempts, code.name, details)
        return InferenceUnavailableError(f"TorchServe cannot serve the model now ({code.name}); retry later")
    logger.error("TorchServe failed: %s %s", code.name, details)
    return InferenceFailedError(f"TorchServe answered {code.name}: {details}")
