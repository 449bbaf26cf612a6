"""The explanation worker's whole computation for one image: every model's map of every label (Grad-CAM, or a
captum method for comparison), per-model max-normalisation, resampling to a common grid, fusion by a rule (the
paper's mean, probability-weighted or agreement-masked), disagreement (std), agreement (IoU), quantisation.
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
from cxr.explain.attributions import POOL, captum_maps
from cxr.explain.fusion import fuse_by_rule, fuse_maps, normalize_maps, resample_maps, spatial_agreement
from cxr.explain.gradcam import EnsembleGradCAM, ModelCams
from cxr.explain.heatmap_store import HeatmapSet, quantize
from cxr.explain.methods import DEFAULT_FUSION_RULE, FUSION_RULES, GRADCAM, MAX_CAPTUM_LABELS, check_method
from cxr.models.bundle import EnsembleNet, logits_to_probabilities

log = logging.getLogger(__name__)

TOP_FRACTION = 0.2
MAX_GRID = 512
METHOD = (
    "{attribution} on each label's logit; each model's map resampled bilinearly to the grid and "
    "max-normalised to [0, 1] (so no model dominates through its gradient scale; an all-zero map stays zero); "
    "fused = {fusion}; std = population std over models (ddof=0); "
    f"spatial_agreement = mean pairwise IoU of the models' top-{round(TOP_FRACTION * 100)}% pixel masks; "
    "mean_disagreement = mean of the std map; maps stored as uint8 round(255*v); research, NOT FOR CLINICAL USE"
)
ATTRIBUTION_TEXT = {
    GRADCAM: "Grad-CAM at the tensor feeding global average pooling (one forward pass per model, channel weights "
    "from the head's Jacobian)",
    "integrated_gradients": "captum IntegratedGradients from a black image (16 steps), positive part, 4x4 pooled",
    "occlusion": "captum Occlusion (black squares of side S/7, stride S/7), positive part, 4x4 pooled",
    "guided_gradcam": "captum GuidedGradCam at the tensor feeding global average pooling, positive part, 4x4 pooled",
}
FUSION_TEXT = {
    "mean": "mean over models (the paper's rule)",
    "probability_weighted": "mean over models weighted by each model's calibrated probability of the label",
    "agreement_masked": "mean over the models that predict the label (all models when none does)",
}


def compute_heatmaps(
    ensemble: EnsembleNet,
    manifest: Manifest,
    x: np.ndarray | torch.Tensor,
    grid: int = 64,
    progress: Callable[[float], None] | None = None,
    *,
    fusion_rule: str = DEFAULT_FUSION_RULE,
    method: str = GRADCAM,
) -> HeatmapSet:
    """Explain one preprocessed image.

    ``x`` is the model input of the wire format, (1, S, S) or (1, 1, S, S), float, with S the manifest's
    preprocessing size. ``progress`` receives fractions in (0, 1], ending with 1.0. ``fusion_rule`` is one of
    ``FUSION_RULES``, ``method`` one of ``cxr.explain.methods.ATTRIBUTION_METHODS`` (a captum method explains only
    the positive labels, at most MAX_CAPTUM_LABELS, else the most probable one; ``explained`` says which).
    Returns a HeatmapSet with maps on a ``grid`` x ``grid`` raster. Raises InvalidInputError(reason=
    "BAD_INPUT_SHAPE", "BAD_INPUT_VALUES" or "UNKNOWN_EXPLANATION_METHOD"), ManifestError when ensemble and
    manifest disagree, ValueError for a grid outside [1, MAX_GRID] or an unknown fusion rule.
    """
    if not 1 <= grid <= MAX_GRID:
        raise ValueError(f"grid must be in [1, {MAX_GRID}], got {grid}")
    if fusion_rule not in FUSION_RULES:
        raise ValueError(f"unknown fusion rule {fusion_rule!r}; known: {FUSION_RULES}")
    method = check_method(method)
    _check_members(ensemble, manifest)
    image = model_input(x, manifest.preprocess.size)
    report = progress if progress is not None else _ignore
    per_model, explained = model_maps(ensemble, manifest, image, method, report)
    maps = common_grid(per_model, len(manifest.labels), grid)
    logits = np.stack([mc.logits for mc in per_model])
    text = METHOD.format(attribution=ATTRIBUTION_TEXT[method], fusion=FUSION_TEXT[fusion_rule])
    heatmaps = _summarise(maps, manifest, logits, fusion_rule, text, explained)
    report(1.0)
    return heatmaps


def model_maps(
    ensemble: EnsembleNet, manifest: Manifest, image: torch.Tensor, method: str,
    progress: Callable[[float], None] | None = None, labels: list[int] | None = None,
) -> tuple[list[ModelCams], np.ndarray | None]:  # fmt: skip
    """Every member's raw maps of every label for one (1, 1, S, S) input, in manifest order, and which labels
    were explained (None: all, as Grad-CAM does). A captum method explains ``labels`` (default
    ``captum_labels``). Raises ValueError for an unknown method."""
    report = progress if progress is not None else _ignore
    n_models = len(manifest.models)
    with EnsembleGradCAM(ensemble) as explainer:
        per_model = explainer.explain(image, progress=lambda done: report(0.9 * done / n_models))
    if method == GRADCAM:
        return per_model, None
    chosen = labels if labels is not None else captum_labels(manifest, np.stack([mc.logits for mc in per_model]))
    out = []
    for i, (mc, member) in enumerate(zip(per_model, ensemble.members, strict=True)):
        maps = np.zeros((len(manifest.labels), *_captum_shape(image)), np.float32)
        maps[chosen] = captum_maps(member, image, chosen, method, manifest.preprocess)  # type: ignore[arg-type]
        out.append(ModelCams(mc.name, mc.logits, maps))
        report(0.9 * (i + 1) / n_models)
    explained = np.zeros(len(manifest.labels), dtype=bool)
    explained[chosen] = True
    return out, explained


def captum_labels(manifest: Manifest, logits: np.ndarray) -> list[int]:
    """The labels a captum method explains: the positive ones (ensemble probability >= threshold), most
    probable first, at most MAX_CAPTUM_LABELS; the most probable label when none is positive."""
    probs = logits_to_probabilities(manifest, logits).mean(axis=0)
    order = [int(j) for j in np.argsort(-probs, kind="stable")]
    positive = [j for j in order if probs[j] >= manifest.thresholds[j]]
    return (positive or order[:1])[:MAX_CAPTUM_LABELS]


def model_votes(manifest: Manifest, probs: np.ndarray) -> np.ndarray:
    """(M, L) calibrated probabilities -> (M, L) bool: each model's vote against its own thresholds."""
    thresholds = np.array([manifest.model_thresholds(name) for name in manifest.model_names], dtype=np.float32)
    return np.asarray(probs) >= thresholds


def _captum_shape(image: torch.Tensor) -> tuple[int, int]:
    return image.shape[-2] // POOL, image.shape[-1] // POOL


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


def common_grid(per_model: list[ModelCams], n_labels: int, grid: int) -> np.ndarray:
    """Every model's (L, h, w) raw maps -> (M, L, grid, grid) float32 in [0, 1], each map max-normalised."""
    for mc in per_model:
        if mc.cams.shape[0] != n_labels:
            raise ManifestError(f"model {mc.name} has {mc.cams.shape[0]} outputs for {n_labels} labels")
    return np.stack([normalize_maps(resample_maps(mc.cams, grid)) for mc in per_model])


def _summarise(
    maps: np.ndarray, manifest: Manifest, logits: np.ndarray, fusion_rule: str, method: str,
    explained: np.ndarray | None,
) -> HeatmapSet:  # fmt: skip
    probs = logits_to_probabilities(manifest, logits)
    fused = fuse_by_rule(maps, fusion_rule, probs, model_votes(manifest, probs))
    _, std = fuse_maps(maps)
    return HeatmapSet(
        labels=tuple(manifest.labels),
        models=tuple(manifest.model_names),
        grid=maps.shape[-1],
        per_model=quantize(maps),
        fused=quantize(fused),
        std=quantize(std),
        spatial_agreement=spatial_agreement(maps, TOP_FRACTION),
        mean_disagreement=std.mean(axis=(1, 2)).astype(np.float32),
        method=method,
        explained=explained,
    )


def _check_members(ensemble: EnsembleNet, manifest: Manifest) -> None:
    if tuple(ensemble.names) != manifest.model_names:
        raise ManifestError(f"ensemble members {ensemble.names} differ from the manifest's {manifest.model_names}")


def _ignore(_: float) -> None:
    return None
