"""Faithfulness of a heatmap: deletion and insertion curves (Petsiuk et al., RISE, 2018).

The map's grid cells are ranked by value (ties in a fixed random order). Deletion replaces the top fraction f of
the cells of the model input with a blurred copy of the image and records the ensemble's probability of the label
for f = 0, 1/steps, ..., 1; insertion starts from the blurred image and puts the top cells back. A faithful map
makes the deletion curve fall fast (low area under it) and the insertion curve rise fast (high area). A blurred
copy, rather than black, keeps the perturbed images closer to radiographs. The score is the ensemble's
calibrated probability (mean over models, ``cxr.models.bundle.logits_to_probabilities``) for every map compared,
so fused, single-model and random maps are judged by the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cxr.core.manifest import Manifest
from cxr.models.bundle import EnsembleNet, logits_to_probabilities

STEPS = 8
BLUR_SIGMA_FRACTION = 0.04  # of the image side


@dataclass(frozen=True)
class Curves:
    """One map's deletion and insertion curves (probability at each fraction) and their areas."""

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray

    @property
    def deletion_auc(self) -> float:
        return _auc(self.fractions, self.deletion)

    @property
    def insertion_auc(self) -> float:
        return _auc(self.fractions, self.insertion)


def deletion_insertion(
    ensemble: EnsembleNet,
    manifest: Manifest,
    x: torch.Tensor,
    label: int,
    heat: np.ndarray,
    *,
    steps: int = STEPS,
    seed: int = 0,
    endpoints: tuple[float, float] | None = None,
) -> Curves:
    """x (1, 1, S, S) model input, ``heat`` (G, G) >= 0 -> the curves for label index ``label``. ``endpoints``:
    the probabilities of the image and of its blurred copy, when the caller already has them (the same for every
    map of one image: ``image_endpoints``); computed here otherwise. Raises ValueError for a non-2-D map,
    steps < 1 or a label out of range."""
    if heat.ndim != 2 or steps < 1 or not 0 <= label < len(manifest.labels):
        raise ValueError(f"bad map {heat.shape}, steps {steps} or label {label}")
    blurred = blur(x)
    original, fully_blurred = endpoints or image_endpoints(ensemble, manifest, x, label)
    masks = _top_masks(heat, steps, x.shape[-1], seed)[1:-1]  # (steps - 1, 1, S, S), 1 = "this cell is taken"
    inner = np.zeros(0)
    if len(masks):
        deleted = x * (1 - masks) + blurred * masks
        inserted = blurred * (1 - masks) + x * masks
        inner = ensemble_probability(ensemble, manifest, torch.cat([deleted, inserted]), label)
    k = steps - 1
    fractions = np.linspace(0.0, 1.0, steps + 1)
    deletion = np.concatenate([[original], inner[:k], [fully_blurred]])
    insertion = np.concatenate([[fully_blurred], inner[k:], [original]])
    return Curves(fractions, deletion, insertion)


def image_endpoints(ensemble: EnsembleNet, manifest: Manifest, x: torch.Tensor, label: int) -> tuple[float, float]:
    """(probability of the image, probability of its blurred copy): both curves' ends, whatever the map."""
    p = ensemble_probability(ensemble, manifest, torch.cat([x, blur(x)]), label)
    return float(p[0]), float(p[1])


def ensemble_probability(ensemble: EnsembleNet, manifest: Manifest, images: torch.Tensor, label: int) -> np.ndarray:
    """(N, 1, S, S) -> (N,) the ensemble's calibrated probability of ``label`` (mean over models)."""
    with torch.inference_mode():
        logits = ensemble(images).to("cpu", torch.float32).numpy()
    return logits_to_probabilities(manifest, logits).mean(axis=1)[:, label].astype(np.float64)


def blur(x: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of a (N, 1, S, S) input (separable, reflect padding, sigma = BLUR_SIGMA_FRACTION * S)."""
    sigma = max(1.0, BLUR_SIGMA_FRACTION * x.shape[-1])
    radius = int(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))


def _top_masks(heat: np.ndarray, steps: int, size: int, seed: int) -> torch.Tensor:
    """(steps + 1, 1, size, size) float masks: mask k covers the top k/steps of the map's cells."""
    g_rows, g_cols = heat.shape
    n = g_rows * g_cols
    tie_break = np.random.default_rng(seed).random(n)
    order = np.lexsort((tie_break, -np.asarray(heat, dtype=np.float64).reshape(-1)))  # highest first
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    counts = np.round(np.linspace(0, n, steps + 1)).astype(np.int64)
    cells = np.stack([(rank < c).reshape(g_rows, g_cols) for c in counts]).astype(np.float32)
    up = F.interpolate(torch.from_numpy(cells)[:, None], size=(size, size), mode="nearest")
    return up


def _auc(fractions: np.ndarray, values: np.ndarray) -> float:
    return float(np.sum((values[1:] + values[:-1]) * np.diff(fractions)) / 2.0)
