"""Fast all-label Grad-CAM (cxr.explain.gradcam) against captum's LayerGradCam, hook hygiene and memory, and the
worker's whole computation (cxr.explain.compute) on a real NIH radiograph."""

import gc
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from captum.attr import LayerGradCam
from PIL import Image

from cxr.core.errors import InvalidInputError, ManifestError
from cxr.core.manifest import Manifest
from cxr.core.preprocess import PreprocessSpec, prepare_image, to_unit_range
from cxr.explain.compute import compute_heatmaps
from cxr.explain.gradcam import (
    BATCHED_AUTOGRAD,
    HEAD_JACOBIAN,
    EnsembleGradCAM,
    gradcam_all_labels,
    gradcam_all_labels_batched,
)
from cxr.explain.heatmap_store import dequantize, pack_heatmaps, unpack_heatmaps
from cxr.models.architectures import CXRNet, build_model
from cxr.models.bundle import EnsembleNet, load_ensemble
from cxr.models.testing import make_random_ensemble

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
IMAGE = DATA / "nih-cxr14-621" / "images_512" / "00000129_000.png"
N_LABELS = 5
RTOL_OF_MAX = 1e-4  # float32: |ours - captum| <= 1e-4 x that map's max (plus 1e-6 x the model's largest map)
GradCamFn = Callable[[CXRNet, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _image(size: int) -> torch.Tensor:
    """The real radiograph as a (1, 1, size, size) model input."""
    pixels = to_unit_range(np.asarray(Image.open(IMAGE).convert("L")))
    return torch.from_numpy(prepare_image(pixels, PreprocessSpec(size=size)))[None]


def _captum_maps(model: CXRNet, x: torch.Tensor) -> torch.Tensor:
    """captum LayerGradCam on the same layer, one call per label -> (N, L, h, w)."""
    explainer = LayerGradCam(model, model.cam_target)
    per_label = [explainer.attribute(x, target=label, relu_attributions=True)[:, 0] for label in range(N_LABELS)]
    return torch.stack(per_label, dim=1).detach()


def _assert_maps_close(ours: torch.Tensor, reference: torch.Tensor, rtol: float) -> None:
    peak = reference.amax(dim=(2, 3), keepdim=True)
    tolerance = rtol * peak + 1e-6 * reference.max()
    assert ours.shape == reference.shape
    assert bool(((ours - reference).abs() <= tolerance).all()), float(((ours - reference).abs() - tolerance).max())


@pytest.mark.parametrize(
    ("arch", "size"), [("densenet121", 96), ("efficientnet_b0", 96), ("mobilenet_v3_large", 96), ("inception_v3", 160)]
)
def test_all_labels_equal_captum_layer_gradcam(arch: str, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(arch, N_LABELS, hidden=32).eval()
    x = torch.cat([_image(size), torch.randn(1, 1, size, size)])  # a real radiograph and noise, one batch
    reference = _captum_maps(model, x)
    assert reference.amax(dim=(2, 3)).gt(0).sum() >= N_LABELS  # non-trivial maps: the comparison means something
    with torch.no_grad():
        expected_logits = model(x)
    for method in (gradcam_all_labels, gradcam_all_labels_batched):
        logits, cams = method(model, x)
        assert torch.allclose(logits, expected_logits, atol=1e-5)
        _assert_maps_close(cams, reference, RTOL_OF_MAX)


def test_equal_to_captum_up_to_rounding_in_float64() -> None:
    torch.manual_seed(1)
    model = build_model("mobilenet_v3_large", N_LABELS, hidden=32).double().eval()
    x = _image(96).double()
    reference = _captum_maps(model, x)
    for method in (gradcam_all_labels, gradcam_all_labels_batched):
        _assert_maps_close(method(model, x)[1], reference, 1e-10)


@pytest.mark.parametrize("method", [gradcam_all_labels, gradcam_all_labels_batched], ids=["jacobian", "batched"])
def test_training_mode_is_refused(method: GradCamFn) -> None:
    model = build_model("resnet18", 3, hidden=8).train()
    with pytest.raises(ValueError, match="eval mode"):
        method(model, torch.zeros(1, 1, 64, 64))


class _SkipsCamTarget(CXRNet):
    """A model whose forward bypasses cam_target: the batched method cannot see its feature map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x.expand(-1, 3, -1, -1)).mean(dim=(2, 3)))


def test_batched_method_needs_the_forward_to_pass_cam_target() -> None:
    model = build_model("resnet18", 3, hidden=8).eval()
    model.__class__ = _SkipsCamTarget
    with pytest.raises(RuntimeError, match="cam_target"):
        gradcam_all_labels_batched(model, torch.zeros(1, 1, 64, 64))
    assert not model.cam_target._forward_hooks  # removed despite the failure


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, EnsembleNet]:
    root = tmp_path_factory.mktemp("tiny-ensemble")
    make_random_ensemble(root, archs=("resnet18", "mobilenet_v3_large"), size=64, hidden=32)
    return load_ensemble(root)


def _members(ensemble: EnsembleNet) -> list[CXRNet]:
    return [m for m in ensemble.members if isinstance(m, CXRNet)]


def _all_hooks(module: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in module.modules()
    )


def test_ensemble_explainer_matches_single_models_in_manifest_order(tiny: tuple[Manifest, EnsembleNet]) -> None:
    manifest, ensemble = tiny
    x = _image(64)
    with EnsembleGradCAM(ensemble) as fast, torch.inference_mode():  # callers may hold inference mode
        per_model = fast.explain(x)
    with EnsembleGradCAM(ensemble, method=BATCHED_AUTOGRAD) as general, torch.no_grad():
        assert _all_hooks(ensemble) == len(manifest.models)  # one tap per member while inside
        batched = general.explain(x)
    assert [mc.name for mc in per_model] == list(manifest.model_names)
    for mc, other, member in zip(per_model, batched, _members(ensemble), strict=True):
        logits, cams = gradcam_all_labels(member, x)
        assert mc.cams.dtype == np.float32 and mc.cams.shape == (len(manifest.labels), 2, 2)
        assert np.array_equal(mc.cams, cams[0].numpy()) and np.array_equal(mc.logits, logits[0].numpy())
        assert np.allclose(other.cams, mc.cams, rtol=1e-4, atol=1e-6 * mc.cams.max())


def test_explainer_restores_modes_and_refuses_misuse(tiny: tuple[Manifest, EnsembleNet]) -> None:
    _, ensemble = tiny
    ensemble.train()
    try:
        with EnsembleGradCAM(ensemble) as explainer:
            assert not any(m.training for m in ensemble.modules())
            with pytest.raises(ValueError, match="one image"):
                explainer.explain(torch.zeros(2, 1, 64, 64))
        assert all(m.training for m in ensemble.modules())
    finally:
        ensemble.eval()
    with pytest.raises(RuntimeError, match="context manager"):
        explainer.explain(_image(64))
    with pytest.raises(ValueError, match="unknown Grad-CAM method"):
        EnsembleGradCAM(ensemble, method="guided")


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def _explain_loop(ensemble: EnsembleNet, x: torch.Tensor, rounds: int) -> Iterator[int]:
    """Explain ``rounds`` times, alternating methods, yielding the process RSS after each round."""
    process = psutil.Process()
    for i in range(rounds):
        with EnsembleGradCAM(ensemble, method=(HEAD_JACOBIAN, BATCHED_AUTOGRAD)[i % 2]) as explainer:
            explainer.explain(x)
        yield process.memory_info().rss


def test_repeated_explanations_keep_memory_flat_and_leave_no_hooks(tiny: tuple[Manifest, EnsembleNet]) -> None:
    _, ensemble = tiny
    x = _image(64)
    list(_explain_loop(ensemble, x, 4))  # warm-up: allocator pools, lazy kernels
    tensors_before = _live_tensors()
    rss = list(_explain_loop(ensemble, x, 30))
    assert _live_tensors() == tensors_before  # nothing kept alive by hooks or explainer state
    assert rss[-1] - rss[0] < 16 * 2**20, [r // 2**20 for r in rss]
    assert _all_hooks(ensemble) == 0


def test_compute_heatmaps_on_a_real_radiograph(tiny: tuple[Manifest, EnsembleNet]) -> None:
    manifest, ensemble = tiny
    seen: list[float] = []
    h = compute_heatmaps(ensemble, manifest, _image(64)[0].numpy(), grid=32, progress=seen.append, fusion_rule="mean")
    n_models, n_labels = len(manifest.models), len(manifest.labels)
    assert h.per_model.shape == (n_models, n_labels, 32, 32) and h.fused.shape == h.std.shape == (n_labels, 32, 32)
    assert (h.labels, h.models) == (manifest.labels, manifest.model_names) and "max-normalised" in h.method
    peaks = h.per_model.max(axis=(2, 3))
    assert set(np.unique(peaks)) <= {0, 255} and (peaks == 255).any()  # each map scaled to its own max
    maps = dequantize(h.per_model)
    assert np.abs(dequantize(h.fused) - maps.mean(axis=0)).max() <= 1.5 / 255
    assert np.abs(dequantize(h.std) - maps.std(axis=0)).max() <= 1.5 / 255
    assert np.allclose(h.mean_disagreement, maps.std(axis=0).mean(axis=(1, 2)), atol=2 / 255)
    assert ((h.spatial_agreement >= 0) & (h.spatial_agreement <= 1)).all()
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) == n_models + 1
    assert np.array_equal(unpack_heatmaps(pack_heatmaps(h)).fused, h.fused)


def test_compute_heatmaps_accepts_a_tensor_and_matches_the_array_path(tiny: tuple[Manifest, EnsembleNet]) -> None:
    manifest, ensemble = tiny
    x = _image(64)
    a = compute_heatmaps(ensemble, manifest, x, grid=16)
    b = compute_heatmaps(ensemble, manifest, x.numpy()[0], grid=16)
    assert np.array_equal(a.per_model, b.per_model) and np.array_equal(a.spatial_agreement, b.spatial_agreement)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (np.zeros((1, 32, 32), np.float32), "BAD_INPUT_SHAPE"),  # another model's input size
        (np.zeros((3, 64, 64), np.float32), "BAD_INPUT_SHAPE"),  # colour
        (np.full((1, 64, 64), np.nan, np.float32), "BAD_INPUT_VALUES"),
    ],
)
def test_compute_heatmaps_rejects_bad_inputs(tiny: tuple[Manifest, EnsembleNet], bad: np.ndarray, reason: str) -> None:
    manifest, ensemble = tiny
    with pytest.raises(InvalidInputError) as info:
        compute_heatmaps(ensemble, manifest, bad)
    assert info.value.reason == reason


def test_compute_heatmaps_rejects_a_foreign_manifest_and_a_bad_grid(tiny: tuple[Manifest, EnsembleNet]) -> None:
    manifest, ensemble = tiny
    foreign = EnsembleNet(_members(ensemble)[::-1], list(manifest.model_names)[::-1])
    with pytest.raises(ManifestError):
        compute_heatmaps(foreign, manifest, _image(64))
    with pytest.raises(ValueError, match="grid"):
        compute_heatmaps(ensemble, manifest, _image(64), grid=0)
