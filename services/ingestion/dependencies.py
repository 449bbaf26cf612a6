"""The ingestion service's dependency checks, run at start (readiness) and then periodically by the health
monitor (``services.ingestion.health_monitor``): Redis must accept a write, the served model must answer.

* ``redis``: ``SET cxr-health:ingestion`` with a short TTL. A write, not a PING: a Redis that answers PING but
  refuses writes (memory limit reached under ``noeviction``, a read-only replica, a failed persistence write)
  cannot take new work either.
* ``torchserve``: a prediction of a blank image at the model's size, checked against the manifest (name,
  version, labels). Once a probe has passed, it is skipped while real predictions succeed: an answer to an
  Analyze call within the last period is as good a proof and costs no extra forward pass on a busy server. A
  failed probe (e.g. another ensemble is served) is repeated at every check until one passes. While the model
  is verified a probe is bounded by ``CXR_HEALTH_TIMEOUT_S`` (a hang is noticed quickly); until it is (at start,
  after a failure) by the inference timeout, because the first forward pass of a (re)started model is slow and a
  probe cut short would never let it become SERVING again.
"""

from __future__ import annotations

import time

import numpy as np

from cxr.core.manifest import Manifest
from cxr.core.wire import encode_input
from services.ingestion.health_monitor import DependencyCheck
from services.ingestion.inference_client import TorchServeClient
from services.ingestion.pipeline import check_prediction
from services.ingestion.result_store import ResultStore


class ModelProbe:
    """The ``torchserve`` check: a blank-image prediction unless a real one succeeded within ``fresh_s``."""

    def __init__(self, inference: TorchServeClient, manifest: Manifest, *, fresh_s: float, timeout_s: float) -> None:
        self._inference = inference
        self._manifest = manifest
        self._fresh_s = fresh_s
        self._timeout_s = timeout_s
        size = manifest.preprocess.size
        self._blank = encode_input(np.zeros((1, size, size), np.float32))
        self._verified = False  # the last probe passed: the served model is ours

    def __call__(self) -> None:
        """Return when the model answers as ours; raise InferenceUnavailableError / InferenceFailedError /
        ModelMismatchError when it does not (in time: see the module docstring)."""
        if self._verified and time.monotonic() - self._inference.last_success < self._fresh_s:
            return
        timeout_s = self._timeout_s if self._verified else max(self._timeout_s, self._inference.timeout_s)
        self._verified = False
        prediction = self._inference.predict(self._blank, timeout_s=timeout_s)
        check_prediction(prediction, self._manifest)
        self._verified = True


def dependency_checks(store: ResultStore, probe: ModelProbe) -> list[DependencyCheck]:
    """The checks behind the service's health, in dependency order."""
    return [DependencyCheck("redis", store.check_writable), DependencyCheck("torchserve", probe)]
