"""captum's attribution methods on one ensemble member, as maps comparable with Grad-CAM's: positive evidence
only, on a coarse grid (average-pooled by ``POOL``), float32, not normalised.

* ``integrated_gradients``: ``IntegratedGradients`` from a black image (0 in [0, 1] pixel space, i.e.
  ``-mean/std`` in model input), ``IG_STEPS`` Gauss-Legendre steps;
* ``occlusion``: ``Occlusion`` with a black square of side S/7, stride S/7 (7 x 7 positions);
* ``guided_gradcam``: ``GuidedGradCam`` at ``cam_target`` (Grad-CAM times guided backpropagation).

Each method runs once per (model, label): callers choose few labels (``cxr.explain.methods.MAX_CAPTUM_LABELS``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import GuidedGradCam, IntegratedGradients, Occlusion

from cxr.core.preprocess import PreprocessSpec
from cxr.explain.methods import CAPTUM_METHODS, GUIDED_GRADCAM, INTEGRATED_GRADIENTS, OCCLUSION
from cxr.models.architectures import CXRNet

POOL = 4
IG_STEPS = 16
OCCLUSION_POSITIONS = 7


def captum_maps(model: CXRNet, x: torch.Tensor, labels: Sequence[int], method: str, spec: PreprocessSpec) -> np.ndarray:
    """x (1, 1, S, S) -> (len(labels), S // POOL, S // POOL) float32 >= 0: ``method``'s attribution of each
    label's logit. Raises ValueError for a method that is not one of CAPTUM_METHODS or a model in training mode."""
    if method not in CAPTUM_METHODS:
        raise ValueError(f"not a captum method: {method!r}; known: {CAPTUM_METHODS}")
    if model.training:
        raise ValueError("attributions need the model in eval mode")
    black = -spec.mean / spec.std
    size = x.shape[-1]
    maps = []
    with torch.inference_mode(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # captum warns about requires_grad on inputs it sets itself
        x = x.detach().clone()
        for label in labels:
            attr = _attribute(model, x, int(label), method, black, size)
            pooled = F.avg_pool2d(F.relu(attr.detach().sum(dim=1, keepdim=True)), POOL)
            maps.append(pooled[0, 0].to("cpu", torch.float32).numpy())
    return np.stack(maps) if maps else np.zeros((0, size // POOL, size // POOL), np.float32)


def _attribute(model: CXRNet, x: torch.Tensor, label: int, method: str, black: float, size: int) -> torch.Tensor:
    if method == INTEGRATED_GRADIENTS:
        ig = IntegratedGradients(model)
        baseline = torch.full_like(x, black)
        return ig.attribute(x, baselines=baseline, target=label, n_steps=IG_STEPS, internal_batch_size=IG_STEPS)
    if method == OCCLUSION:
        side = max(1, size // OCCLUSION_POSITIONS)
        occ = Occlusion(model)
        return occ.attribute(
            x, sliding_window_shapes=(1, side, side), strides=(1, side, side), baselines=black, target=label,
            perturbations_per_eval=OCCLUSION_POSITIONS**2,
        )  # fmt: skip
    if method == GUIDED_GRADCAM:
        return GuidedGradCam(model, model.cam_target).attribute(x, target=label)
    raise ValueError(f"not a captum method: {method!r}")
