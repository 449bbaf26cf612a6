"""The explanation worker's whole computation for one image: all-label Grad-CAM of every model, per-model
max-normalisation, resampling to a common grid, fusion (mean), disagreement (std), agreement (IoU), quantisation.
Plain function, no I/O: the Celery task reads the input from Redis, calls ``compute_heatmaps`` and stores
``pack_heatmaps`` of the result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from cxr.core.errors import InvalidInputError, ManifestError
from cxr.core.manifest import Manifest
from cxr.explain.fusion import fuse_maps, normalize_maps, resample_maps, spatial_agreement
from cxr.explain.gradcam import EnsembleGradCAM, ModelCams
from cxr.explain.heatmap_store import HeatmapSet, quantize
from cxr.models.bundle import EnsembleNet

log = logging.getLogger(__name__)

TOP_FRACTION = 0.2
MAX_GRID = 512
METHOD = (
    "Grad-CAM on each label's logit at the tensor feeding global average pooling (one forward pass per model, "
    "channel weights from the head's Jacobian); each model's map resampled bilinearly to the grid and "
    "max-normalised to [0, 1] (so no model dominates through its gradient scale; an all-zero map stays zero); "
    "fused = mean over models; std = population std over models (ddof=0); "
    f"spatial_agreement = mean pairwise IoU of the models' top-{round(TOP_FRACTION * 100)}% pixel masks; "
    "mean_disagreement = mean of the std map; maps stored as uint8 round(255*v)"
)


def compute_heatmaps(
    ensemble: EnsembleNet,
    manifest: Manifest,
    x: np.ndarray | torch.Tensor,
    grid: int = 64,
    progress: Callable[[float], None] | None = None,
) -> HeatmapSet:
    """Explain one preprocessed image.

    ``x`` is the model input of the wire format, (1, S, S) or (1, 1, S, S), float, with S the manifest's
    preprocessing size. ``progress`` receives fractions in (0, 1], ending with 1.0. Returns a HeatmapSet with
    maps on a ``grid`` x ``grid`` raster. Raises InvalidInputError(reason="BAD_INPUT_SHAPE" or
    "BAD_INPUT_VALUES") for a wrong input, ManifestError when ensemble and manifest disagree, ValueError for a
    grid outside [1, MAX_GRID].
    """
    if not 1 <= grid <= MAX_GRID:
        raise ValueError(f"grid must be in [1, {MAX_GRID}], got {grid}")
    _check_members(ensemble, manifest)
    image = model_input(x, manifest.preprocess.size)
    report = progress if progress is not None else _ignore
    n_models = len(manifest.models)
    with EnsembleGradCAM(ensemble) as explainer:
        per_model = explainer.explain(image, progress=lambda done: report(0.9 * done / n_models))
    maps = _common_grid(per_model, len(manifest.labels), grid)
    heatmaps = _summarise(maps, manifest)
    report(1.0)
    return heatmaps


def model_input(x: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """(1, S, S) or (1, 1, S, S) array/tensor -> float32 tensor (1, 1, S, S). Raises InvalidInputError for another
    shape (reason BAD_INPUT_SHAPE) or non-finite values (BAD_INPUT_VALUES)."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.array(x, dtype=np.float32))  # a writable copy (npy from Redis is read-only)
    else:
        t = x.detach().to("cpu", torch.float32)
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if tuple(t.shape) != (1, 1, size, size):
        raise InvalidInputError(f"expected a (1, {size}, {size}) model input, got {tuple(x.shape)}",
                                reason="BAD_INPUT_SHAPE")  # fmt: skip
    if not bool(torch.isfinite(t).all()):
        raise InvalidInputError("model input contains NaN or infinite values", reason="BAD_INPUT_VALUES")
    return t


def _common_grid(per_model: list[ModelCams], n_labels: int, grid: int) -> np.ndarray:
    """Every model's (L, h, w) raw maps -> (M, L, grid, grid) float32 in [0, 1], each map max-normalised."""
    for mc in per_model:
        if mc.cams.shape[0] != n_labels:
            raise ManifestError(f"model {mc.name} has {mc.cams.shape[0]} outputs for {n_labels} labels")
    return np.stack([normalize_maps(resample_maps(mc.cams, grid)) for mc in per_model])


def _summarise(maps: np.ndarray, manifest: Manifest) -> HeatmapSet:
    fused, std = fuse_maps(maps)
    return HeatmapSet(
        labels=tuple(manifest.labels),
        models=tuple(manifest.model_names),
        grid=maps.shape[-1],
        per_model=quantize(maps),
        fused=quantize(fused),
        std=quantize(std),
        spatial_agreement=spatial_agreement(maps, TOP_FRACTION),
        mean_disagreement=std.mean(axis=(1, 2)).astype(np.float32),
        method=METHOD,
    )


def _check_members(ensemble: EnsembleNet, manifest: Manifest) -> None:
    if tuple(ensemble.names) != manifest.model_names:
        raise ManifestError(f"ensemble members {ensemble.names} differ from the manifest's {manifest.model_names}")


def _ignore(_: float) -> None:
    return None
