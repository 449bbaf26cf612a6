"""The ensemble's CNNs: a torchvision backbone + the paper's head (two dense 512-unit ReLU layers with dropout,
one logit per label; the sigmoid is applied outside the model so that Grad-CAM works on the logit).

Every model exposes the same three-step forward, which the fast Grad-CAM relies on:

    A = model.forward_features(x)   # (N, K, h, w): the exact tensor that feeds global average pooling
    z = A.mean(dim=(2, 3))          # (N, K)
    logits = model.head(z)          # (N, L)

Input is one channel (N, 1, S, S), repeated to three inside the model so that optional ImageNet weights fit.

Paper architectures and what we use (torchvision has no Xception / Inception-ResNet-V2):
    DenseNet-201 -> densenet201 (also densenet121, lighter), EfficientNet-B0 -> efficientnet_b0,
    Inception-V3 -> inception_v3, Inception-ResNet-V2 -> substitute resnet50, Xception -> substitute
    mobilenet_v3_large (depthwise-separable convolutions, Xception's defining idea). resnet18 for tiny tests.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm


class CXRNet(nn.Module):
    """Backbone (up to the pooled feature map) + two-layer 512-unit head."""

    def __init__(
        self,
        arch: str,
        backbone: nn.Module,
        feat_dim: int,
        num_labels: int,
        hidden: int = 512,
        dropout: float = 0.2,
        final_relu: bool = False,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.backbone = backbone
        self.final_relu = final_relu  # DenseNet applies ReLU after `features`, before pooling
        self.cam_target = nn.Identity()  # parameter-free hook point: exactly the tensor that feeds pooling
        self.head = nn.Sequential(
            nn.Linear(feat_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_labels),
        )  # fmt: skip
        self.num_labels = num_labels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) -> (N, K, h, w), the tensor global average pooling reads (post-activation)."""
        a = self.backbone(x.expand(-1, 3, -1, -1))
        a = F.relu(a) if self.final_relu else a  # not in-place: a stored activation must stay intact
        return self.cam_target(a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) -> logits (N, L)."""
        return self.head(self.forward_features(x).mean(dim=(2, 3)))


def _inception_features(m: tvm.Inception3) -> nn.Module:
    names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
             "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
             "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]  # fmt: skip
    return nn.Sequential(*[getattr(m, n) for n in names])


def _resnet_features(m: tvm.ResNet) -> nn.Module:
    return nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)


def _no_inplace(module: nn.Module) -> nn.Module:
    """Make activations out-of-place so hooks / stored activations are never overwritten."""
    for mod in module.modules():
        if hasattr(mod, "inplace"):
            mod.inplace = False  # type: ignore[assignment]
    return module


# arch -> (builder(weights) -> (backbone, feat_dim, final_relu), torchvision weights enum name)
_Builder = Callable[[object], tuple[nn.Module, int, bool]]
ARCHITECTURES: dict[str, tuple[_Builder, str]] = {
    "densenet121": (lambda w: (tvm.densenet121(weights=w).features, 1024, True), "DenseNet121_Weights"),
    "densenet201": (lambda w: (tvm.densenet201(weights=w).features, 1920, True), "DenseNet201_Weights"),
    "efficientnet_b0": (lambda w: (tvm.efficientnet_b0(weights=w).features, 1280, False), "EfficientNet_B0_Weights"),
    "inception_v3": (
        lambda w: (_inception_features(tvm.inception_v3(weights=w, aux_logits=w is not None,
                                                        init_weights=w is None, transform_input=False)), 2048, False),
        "Inception_V3_Weights",
    ),
    "resnet18": (lambda w: (_resnet_features(tvm.resnet18(weights=w)), 512, False), "ResNet18_Weights"),
    "resnet50": (lambda w: (_resnet_features(tvm.resnet50(weights=w)), 2048, False), "ResNet50_Weights"),
    "mobilenet_v3_large": (lambda w: (tvm.mobilenet_v3_large(weights=w).features, 960, False),
                           "MobileNet_V3_Large_Weights"),
}  # fmt: skip


def build_model(
    arch: str, num_labels: int, *, hidden: int = 512, dropout: float = 0.2, imagenet: bool = False
) -> CXRNet:
    """Build one ensemble member. ``imagenet=True`` loads torchvision's ImageNet weights (downloads or uses the
    local torch hub cache): opt-in only, never used in tests."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    builder, weights_enum = ARCHITECTURES[arch]
    weights = getattr(tvm, weights_enum).DEFAULT if imagenet else None
    backbone, feat_dim, final_relu = builder(weights)
    return CXRNet(arch, _no_inplace(backbone), feat_dim, num_labels, hidden, dropout, final_relu)
