"""TorchServe custom handler for the whole ensemble: a thin adapter over ``cxr.serving.runner.EnsembleRunner``.

TorchServe imports this file from the unpacked model archive as module ``handler`` and instantiates its only
class (``ts.model_loader`` requires exactly one class defined here). Nothing is imported from ``ts``: the
context is used through the attributes every TorchServe context has (``system_properties``,
``set_response_status``), so the handler also runs under a plain mock context (unit tests, the GPU check).

Request: ``{"data": <model input>}`` (gRPC ``PredictionsRequest.input``; HTTP bodies arrive as ``"body"``), the
model input in the wire format of ``cxr.core.wire`` (layout 1: 16-byte header + raw float16; the legacy float32
npy is still accepted). Answer, one per request, in order: the compact JSON result document (no spaces), or
``{"error": {"reason", "message"}}`` for a request whose input is invalid; the other requests of the batch are
answered normally. An invalid request also gets a per-request status (400) for HTTP clients; TorchServe's gRPC
frontend ignores per-request statuses and answers OK with the error document, so gRPC clients must look for the
``"error"`` key. One INFO line "cxr batch of N in T ms" per batch shows the batches TorchServe formed and the
handler's own time (the rest of an inference call's time is TorchServe's).
Batch size, batch delay, workers and timeouts live in ``model-config.yaml``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np
import torch

from cxr.core.errors import Category, CxrError, InvalidInputError
from cxr.core.wire import INPUT_KEY
from cxr.cpu_allocator import keep_freed_memory
from cxr.serving.runner import EnsembleRunner, error_document

logger = logging.getLogger(__name__)

THREADS_ENV = "CXR_TORCH_THREADS"  # intra-op threads of one worker; unset -> torch's default
HTTP_STATUS = {Category.INVALID_INPUT: 400, Category.TOO_LARGE: 413, Category.UNSUPPORTED: 422}


def _device(gpu_id: Any) -> torch.device:
    """cuda:<gpu_id> when TorchServe assigned a GPU and CUDA works here, else cpu."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


def _set_threads_from_env() -> None:
    """Apply CXR_TORCH_THREADS (a positive integer) to torch's intra-op pool. Raises ValueError if malformed."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return
    n = int(raw)
    if n < 1:
        raise ValueError(f"{THREADS_ENV} must be >= 1, got {raw!r}")
    torch.set_num_threads(n)


def _request_blob(request: Any) -> bytes | bytearray:
    """One TorchServe request map -> the wire-format bytes. Raises InvalidInputError (reason BAD_MODEL_INPUT)."""
    blob = request.get(INPUT_KEY) if isinstance(request, dict) else None
    if blob is None and isinstance(request, dict):
        blob = request.get("body")
    if not isinstance(blob, bytes | bytearray):
        raise InvalidInputError(
            f"request needs a '{INPUT_KEY}' entry holding model-input bytes, got {type(blob).__name__}",
            reason="BAD_MODEL_INPUT",
        )
    return blob


class CxrEnsembleHandler:
    """initialize -> (preprocess -> inference -> postprocess) per batch, via ``handle``."""

    def __init__(self) -> None:
        self.runner: EnsembleRunner | None = None
        self.initialized = False

    def initialize(self, context: Any) -> None:
        """Load the ensemble from ``context.system_properties["model_dir"]`` onto the assigned device.

        Raises ManifestError for a bad bundle, ValueError for a malformed CXR_TORCH_THREADS.
        """
        props = context.system_properties
        keep_freed_memory()  # the forward's activations stay mapped: no page faults per batch (cxr.cpu_allocator)
        _set_threads_from_env()
        device = _device(props.get("gpu_id"))
        self.runner = EnsembleRunner.load(props["model_dir"], device)
        self.initialized = True
        m = self.runner.manifest
        logger.info(
            "loaded ensemble %s %s (%d models) on %s, %d torch threads",
            m.name, m.version, len(m.models), device, torch.get_num_threads(),
        )  # fmt: skip

    def _runner(self) -> EnsembleRunner:
        if self.runner is None:
            raise RuntimeError("handler used before initialize()")
        return self.runner

    def preprocess(self, requests: list[Any]) -> tuple[np.ndarray | None, list[CxrError | None]]:
        """Requests -> (stacked valid inputs (K, 1, S, S) or None, per-request error or None, in order)."""
        runner = self._runner()
        inputs: list[np.ndarray] = []
        errors: list[CxrError | None] = []
        for request in requests:
            try:
                inputs.append(runner.decode_request(_request_blob(request)))
                errors.append(None)
            except CxrError as e:
                errors.append(e)
        return (np.stack(inputs) if inputs else None), errors

    def inference(self, batch: np.ndarray | None) -> np.ndarray | None:
        """(K, 1, S, S) -> per-model probabilities (K, M, L); None when no request of the batch was valid."""
        return None if batch is None else self._runner().predict(batch)

    def postprocess(self, probs: np.ndarray | None, errors: list[CxrError | None]) -> list[str]:
        """Exactly one JSON string per request: its result document, or its error document."""
        runner = self._runner()
        results: list[str] = []
        k = 0
        for error in errors:
            if error is not None:
                results.append(_compact_json(error_document(error)))
                continue
            if probs is None:
                raise RuntimeError("valid requests but no probabilities: inference was skipped")
            results.append(_compact_json(runner.result_document(probs[k])))
            k += 1
        return results

    def handle(self, data: list[Any] | None, context: Any) -> list[str]:
        """TorchServe's entry point: a batch of requests -> one JSON string per request, in order."""
        if not data:
            return []
        start = time.perf_counter()
        batch, errors = self.preprocess(data)
        results = self.postprocess(self.inference(batch), errors)
        # one line per batch, like TorchServe's own; benchmarks read the batch size and the handler's own time
        logger.info("cxr batch of %d in %.1f ms", len(data), (time.perf_counter() - start) * 1000.0)
        for idx, error in enumerate(errors):
            if error is not None:
                logger.info("request %d of %d rejected: %s", idx, len(errors), error.reason)
                _report_status(context, idx, error)
        return results


def _compact_json(document: dict[str, Any]) -> str:
    """JSON without the default separators' spaces (the answer travels back to ingestion and into Redis)."""
    return json.dumps(document, separators=(",", ":"))


def _report_status(context: Any, idx: int, error: CxrError) -> None:
    """Set a per-request HTTP status where the context supports it (TorchServe's does; gRPC ignores it)."""
    setter = getattr(context, "set_response_status", None)
    if callable(setter):
        setter(HTTP_STATUS.get(error.category, 500), error.reason, idx)
