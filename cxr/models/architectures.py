"""The ensemble's CNNs: a backbone (``cxr.models.backbones``) + a head giving one logit per label (the sigmoid
is applied outside the model so that Grad-CAM works on the logit).

Every model exposes the same three-step forward, which the fast Grad-CAM relies on:

    A = model.forward_features(x)   # (N, K, h, w): the exact tensor that feeds global average pooling
    z = A.mean(dim=(2, 3))          # (N, K)
    logits = model.head(z)          # (N, L)

Heads: the paper's (two dense ``hidden``-unit ReLU layers with dropout, then one logit per label), or with
``hidden=0`` a linear head (dropout, then one logit per label), which the small-data recipe uses.

Input is one channel (N, 1, S, S) normalised by the manifest's ``PreprocessSpec``; the model repeats it to three
channels and, when its weights came from a pretraining that normalised pixels differently (``input_norm``), maps
it to that normalisation first, so that every member of an ensemble shares one preprocessing:

    spec      the spec-normalised input unchanged (models trained from scratch; bundles before input_norm)
    imagenet  (pixel - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225), torchvision's ImageNet weights
    tf        (pixel - 0.5) / 0.5, TensorFlow ports (EfficientNet-Lite, the TFLite MobileNets)
    xrv       pixel * 2048 - 1024, TorchXRayVision's chest X-ray models

(pixel = the [0, 1] greyscale value before normalisation.) The affine map lives in non-persistent buffers
computed from the spec, so state dicts are unchanged by it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cxr.core.preprocess import PreprocessSpec
from cxr.models.backbones import BACKBONES, get_backbone

ARCHITECTURES = BACKBONES  # arch name -> Backbone (kept under its historical name)

INPUT_NORMS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]] | None] = {
    "spec": None,
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "tf": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "xrv": ((0.5, 0.5, 0.5), (1 / 2048, 1 / 2048, 1 / 2048)),
}


def input_affine(input_norm: str, spec: PreprocessSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift), each (1, 3, 1, 1), that turn the spec-normalised input x into the backbone's expected
    input ``x * scale + shift``; None for ``spec``. Raises ValueError for an unknown norm."""
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"unknown input normalisation {input_norm!r}; known: {sorted(INPUT_NORMS)}")
    norm = INPUT_NORMS[input_norm]
    if norm is None:
        return None
    mean, std = torch.tensor(norm[0]), torch.tensor(norm[1])
    # pixel = x * spec.std + spec.mean  ->  (pixel - mean) / std
    scale = spec.std / std
    shift = (spec.mean - mean) / std
    return scale.view(1, 3, 1, 1), shift.view(1, 3, 1, 1)


def make_head(feat_dim: int, num_labels: int, hidden: int, dropout: float) -> nn.Sequential:
    """The paper's two-layer head (``hidden`` > 0) or a linear one (``hidden`` == 0)."""
    if hidden < 0:
        raise ValueError(f"hidden must be >= 0, got {hidden}")
    if hidden == 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(feat_dim, num_labels))
    return nn.Sequential(
        nn.Linear(feat_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, num_labels),
    )  # fmt: skip


class CXRNet(nn.Module):
    """Backbone (up to the pooled feature map) + head."""

    in_scale: torch.Tensor | None
    in_shift: torch.Tensor | None

    def __init__(
        self,
        arch: str,
        backbone: nn.Module,
        feat_dim: int,
        num_labels: int,
        hidden: int = 512,
        dropout: float = 0.2,
        final_relu: bool = False,
        affine: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.backbone = backbone
        self.final_relu = final_relu
        self.cam_target = nn.Identity()  # parameter-free hook point: exactly the tensor that feeds pooling
        self.head = make_head(feat_dim, num_labels, hidden, dropout)
        self.num_labels = num_labels
        self.register_buffer("in_scale", None if affine is None else affine[0], persistent=False)
        self.register_buffer("in_shift", None if affine is None else affine[1], persistent=False)

    def backbone_input(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) spec-normalised -> (N, 3, S, S) in the backbone's own normalisation."""
        x3 = x.expand(-1, 3, -1, -1)
        if self.in_scale is None or self.in_shift is None:
            return x3
        return x3 * self.in_scale.to(x.dtype) + self.in_shift.to(x.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) -> (N, K, h, w), the tensor global average pooling reads (post-activation)."""
        a = self.backbone(self.backbone_input(x))
        a = F.relu(a) if self.final_relu else a  # not in-place: a stored activation must stay intact
        return self.cam_target(a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) -> logits (N, L)."""
        return self.head(self.forward_features(x).mean(dim=(2, 3)))


def _no_inplace(module: nn.Module) -> nn.Module:
    """Make activations out-of-place so hooks / stored activations are never overwritten."""
    for mod in module.modules():
        if hasattr(mod, "inplace"):
            mod.inplace = False  # type: ignore[assignment]
    return module


def build_model(
    arch: str,
    num_labels: int,
    *,
    hidden: int = 512,
    dropout: float = 0.2,
    input_norm: str = "spec",
    spec: PreprocessSpec | None = None,
) -> CXRNet:
    """Build one ensemble member, randomly initialised (``training.init_weights`` loads initial weights).
    ``spec`` (default ``PreprocessSpec()``) and ``input_norm`` fix the input mapping (module docstring).
    Raises ValueError for an unknown architecture, norm or a negative ``hidden``."""
    bb = get_backbone(arch)
    affine = input_affine(input_norm, spec or PreprocessSpec())
    return CXRNet(arch, _no_inplace(bb.build()), bb.feat_dim, num_labels, hidden, dropout, bb.final_relu, affine)
