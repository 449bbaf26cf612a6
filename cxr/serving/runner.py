"""Server-independent inference over a whole ensemble: request blob (``cxr.core.wire``) -> calibrated
probabilities (each model's logit offset and temperature from the manifest) -> result document.

Everything a model server needs lives here so that the TorchServe handler (``services/inference/handler.py``)
stays a thin adapter and the ensemble could move to another server unchanged. No TorchServe import, no I/O
in ``predict``.

Precision: on CUDA the members run channels_last under bf16 autocast (logits cast back to float32 before the
sigmoid); on CPU everything is float32. The GPU check (``benchmarks/gpu_check_inference.py``) measures how far
the two drift apart.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr.core.ensemble import findings_for_image
from cxr.core.errors import CxrError, InvalidInputError
from cxr.core.manifest import Manifest
from cxr.core.wire import decode_input
from cxr.models.bundle import EnsembleNet, load_ensemble, logits_to_probabilities


def error_document(error: CxrError) -> dict[str, Any]:
    """A typed error -> the per-request error answer ``{"error": {"reason": ..., "message": ...}}``."""
    return {"error": {"reason": error.reason, "message": error.message}}


class EnsembleRunner:
    """One loaded ensemble on one device. Thread-compatible, not thread-safe (one runner per worker)."""

    def __init__(self, manifest: Manifest, net: EnsembleNet, device: torch.device) -> None:
        self.manifest = manifest
        self.net = net
        self.device = device
        self._model_thresholds = np.array([manifest.model_thresholds(n) for n in manifest.model_names], np.float32)

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device = "cpu") -> EnsembleRunner:
        """Load ``manifest.json`` + weights from ``model_dir`` onto ``device`` (eval mode; channels_last on CUDA).

        Raises ManifestError for a malformed or incomplete bundle, RuntimeError for an unusable device.
        """
        dev = torch.device(device)
        manifest, net = load_ensemble(model_dir, dev)
        if dev.type == "cuda":
            net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return cls(manifest, net, dev)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one model input, (1, S, S)."""
        s = self.manifest.preprocess.size
        return (1, s, s)

    def decode_request(self, blob: bytes | bytearray) -> np.ndarray:
        """Wire-format bytes (layout 1 or legacy npy) -> (1, S, S) float32.

        Raises InvalidInputError (reason BAD_MODEL_INPUT) for a bad magic, version, dtype, length, shape or value.
        """
        return decode_input(blob, self.manifest.preprocess)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, 1, S, S) float32 inputs -> per-model probabilities (N, M, L) float32. No I/O.

        Raises InvalidInputError (reason BAD_MODEL_INPUT) when the batch does not have the manifest's shape.
        """
        x = np.asarray(batch)
        if x.ndim != 4 or x.shape[1:] != self.input_shape or x.shape[0] == 0:
            raise InvalidInputError(
                f"batch must be (N, {', '.join(map(str, self.input_shape))}) with N >= 1, got {x.shape}",
                reason="BAD_MODEL_INPUT",
            )
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        with torch.inference_mode():
            logits = self._forward(t).float().cpu().numpy()
        return logits_to_probabilities(self.manifest, logits)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, M, L) with the device's precision policy (bf16 autocast on CUDA, float32 on CPU)."""
        if self.device.type != "cuda":
            return self.net(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return self.net(x.contiguous(memory_format=torch.channels_last))

    def result_document(self, probs: np.ndarray) -> dict[str, Any]:
        """(M, L) probabilities of one image -> the JSON-ready result document of docs/ARCHITECTURE.md.

        Raises ValueError when ``probs`` does not match the manifest's models x labels.
        """
        m = self.manifest
        p = np.asarray(probs, dtype=np.float32)
        findings = findings_for_image(m.labels, m.model_names, p, m.thresholds, self._model_thresholds)
        return {
            "model": {
                "name": m.name,
                "version": m.version,
                "members": list(m.model_names),
                "ensemble_rule": m.ensemble_rule,
                "intended_use": m.intended_use,
            },
            "labels": list(m.labels),
            "thresholds": [float(t) for t in m.thresholds],
            "probabilities": p.tolist(),
            "findings": [dataclasses.asdict(f) for f in findings],
        }
