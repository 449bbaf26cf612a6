"""Fusion of the ensemble's Grad-CAM maps and the agreement between models (numpy only).

Shapes: a map stack is ``(..., h, w)``; ``per_model`` is ``(M, L, G, G)``: M models, L labels, one G x G map each,
already max-normalised to [0, 1] and resampled to a common grid (the paper averages the models' maps pixel by
pixel; without the per-map normalisation the model with the largest gradient scale would dominate the mean).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from cxr.explain.methods import AGREEMENT_MASKED, FUSION_RULES, MEAN, PROBABILITY_WEIGHTED


def normalize_maps(cams: np.ndarray) -> np.ndarray:
    """Divide each (h, w) map of a ``(..., h, w)`` stack by its own maximum -> float32 in [0, 1].

    Maps are expected non-negative (Grad-CAM is ReLU'ed); negative values are clipped to 0 first. A map whose
    maximum is 0 (no positive evidence anywhere) stays all zero. Raises ValueError on fewer than 2 dimensions or
    non-finite values.
    """
    a = _finite_maps(cams)
    a = np.maximum(a, 0.0)
    peak = a.max(axis=(-2, -1), keepdims=True)
    safe = np.where(peak > 0, peak, 1.0)
    return (a / safe).astype(np.float32)


def resample_maps(cams: np.ndarray, grid: int) -> np.ndarray:
    """Bilinear resampling of a ``(..., h, w)`` stack to ``(..., grid, grid)`` with half-pixel centres
    (``align_corners=False``, no antialiasing: the same sampling as torch's ``F.interpolate(mode="bilinear")``).

    Raises ValueError on a grid < 1, fewer than 2 dimensions or non-finite values.
    """
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    a = _finite_maps(cams).astype(np.float32)
    rows = _interpolation_matrix(a.shape[-2], grid)  # (grid, h)
    cols = _interpolation_matrix(a.shape[-1], grid)  # (grid, w)
    return np.einsum("gh,...hw,kw->...gk", rows, a, cols, optimize=True).astype(np.float32)


def fuse_maps(per_model: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(M, L, G, G)`` -> (mean over models, population standard deviation over models), each ``(L, G, G)``
    float32. The std is the paper's proposed per-pixel disagreement map; it is 0 everywhere when M == 1.
    Raises ValueError if the stack is not 4-D or has no model."""
    a = _model_stack(per_model)
    return a.mean(axis=0).astype(np.float32), a.std(axis=0).astype(np.float32)


def fuse_by_rule(per_model: np.ndarray, rule: str, probs: np.ndarray, votes: np.ndarray) -> np.ndarray:
    """``(M, L, G, G)`` maps -> ``(L, G, G)`` float32 fused by ``rule``:

    * ``mean``: the paper's pixel mean over models;
    * ``probability_weighted``: each model's map weighted by its (calibrated) probability of the label,
      sum_m p_m * map_m / sum_m p_m (the plain mean where every p_m is 0);
    * ``agreement_masked``: the mean over the models that predict the label (``votes[m, l]`` true); the plain
      mean where no model predicts it.

    ``probs`` (M, L) in [0, 1], ``votes`` (M, L) bool. Raises ValueError for an unknown rule or shapes that do
    not match."""
    a = _model_stack(per_model)
    n_models, n_labels = a.shape[:2]
    p, v = np.asarray(probs, dtype=np.float64), np.asarray(votes, dtype=bool)
    if p.shape != (n_models, n_labels) or v.shape != (n_models, n_labels):
        raise ValueError(f"probs {p.shape} and votes {v.shape} must both be {(n_models, n_labels)}")
    if rule == MEAN:
        weights = np.ones((n_models, n_labels))
    elif rule == PROBABILITY_WEIGHTED:
        weights = np.clip(p, 0.0, None)
    elif rule == AGREEMENT_MASKED:
        weights = v.astype(np.float64)
    else:
        raise ValueError(f"unknown fusion rule {rule!r}; known: {FUSION_RULES}")
    total = weights.sum(axis=0, keepdims=True)
    weights = np.where(total > 0, weights / np.where(total > 0, total, 1.0), 1.0 / n_models)
    return np.einsum("ml,mlhw->lhw", weights, a).astype(np.float32)


def spatial_agreement(per_model: np.ndarray, top_fraction: float = 0.2) -> np.ndarray:
    """``(M, L, G, G)`` -> ``(L,)`` float32: for each label, the mean over model pairs of the IoU of the models'
    "hot" masks.

    A model's hot mask holds the pixels whose value is at least its ``ceil(top_fraction * G * G)``-th largest
    value and strictly positive (ties may make it slightly larger; an all-zero map has an empty mask). IoU of two
    empty masks is 1.0 (identical sets); IoU of an empty and a non-empty mask is 0.0. With one model the result
    is 1.0. Raises ValueError on a bad shape or a ``top_fraction`` outside (0, 1].
    """
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    a = _model_stack(per_model)
    n_models, n_labels = a.shape[:2]
    if n_models == 1:
        return np.ones(n_labels, dtype=np.float32)
    masks = _hot_masks(a.reshape(n_models, n_labels, -1), top_fraction)
    pairs = [_iou(masks[i], masks[j]) for i, j in itertools.combinations(range(n_models), 2)]
    return np.mean(pairs, axis=0).astype(np.float32)


def _hot_masks(flat: np.ndarray, top_fraction: float) -> np.ndarray:
    """(M, L, P) values -> (M, L, P) bool: the top ``top_fraction`` of each map's pixels, positives only."""
    k = max(1, math.ceil(top_fraction * flat.shape[-1]))
    kth_largest = np.partition(flat, flat.shape[-1] - k, axis=-1)[..., flat.shape[-1] - k]
    return (flat >= kth_largest[..., None]) & (flat > 0)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(L, P) bool masks -> (L,) IoU, 1.0 where both masks are empty."""
    inter = np.logical_and(a, b).sum(axis=-1)
    union = np.logical_or(a, b).sum(axis=-1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _interpolation_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) matrix of bilinear weights, half-pixel centres, edge samples clamped."""
    src = (np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5
    src = np.clip(src, 0.0, size_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = src - lo
    out = np.zeros((size_out, size_in), dtype=np.float64)
    rows = np.arange(size_out)
    np.add.at(out, (rows, lo), 1.0 - frac)
    np.add.at(out, (rows, hi), frac)
    return out.astype(np.float32)


def _finite_maps(cams: np.ndarray) -> np.ndarray:
    a = np.asarray(cams)
    if a.ndim < 2 or a.shape[-1] < 1 or a.shape[-2] < 1:
        raise ValueError(f"expected maps of shape (..., h, w), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("maps contain NaN or infinite values")
    return a


def _model_stack(per_model: np.ndarray) -> np.ndarray:
    a = _finite_maps(per_model)
    if a.ndim != 4 or a.shape[0] < 1:
        raise ValueError(f"expected (M, L, G, G) with M >= 1, got {a.shape}")
    return a.astype(np.float32, copy=False)
