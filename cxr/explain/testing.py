"""An independent computation of the stored per-model maps, for tests: captum's ``LayerGradCam`` on each model's
``cam_target`` (one backward per label, ``relu_attributions=True``), torch's bilinear ``F.interpolate`` to the
grid and a per-map division by the maximum. It shares no code with ``cxr.explain.gradcam`` / ``fusion`` beyond the
models themselves, so a stored map that matches it is Grad-CAM, not merely a map of the right shape."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam

from cxr.models.bundle import EnsembleNet

# Stored maps are uint8 round(255 v): up to 1/510 off, plus float32 differences between the two computations.
TOLERANCE = 2.0 / 255.0


def captum_gradcam_maps(ensemble: EnsembleNet, x: np.ndarray, grid: int) -> np.ndarray:
    """Model input (1, S, S) or (1, 1, S, S) -> (M, L, grid, grid) float32 in [0, 1]: every member's Grad-CAM of
    every label by captum, resampled and max-normalised as the worker documents (an all-zero map stays zero)."""
    t = torch.from_numpy(np.array(x, dtype=np.float32)).reshape(1, 1, *np.shape(x)[-2:])
    ensemble.eval()
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # captum: "Input Tensor 0 did not already require gradients"
        for member in ensemble.members:
            n_labels = int(member(t).shape[1])
            cam = LayerGradCam(member, member.cam_target)  # type: ignore[arg-type]
            maps = torch.cat([cam.attribute(t, target=j, relu_attributions=True) for j in range(n_labels)], dim=1)
            maps = F.interpolate(maps.detach(), size=(grid, grid), mode="bilinear", align_corners=False)[0]
            peak = maps.amax(dim=(1, 2), keepdim=True)
            out.append(torch.where(peak > 0, maps / torch.where(peak > 0, peak, 1.0), 0.0).numpy())
    return np.stack(out).astype(np.float32)
