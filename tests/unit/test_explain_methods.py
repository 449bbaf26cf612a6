"""Explanation methods and fusion rules inside ``compute_heatmaps`` (tiny random ensemble, real NIH radiograph),
and the paper's panels (side-by-side panel, summary page)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr.core.errors import InvalidInputError
from cxr.core.manifest import Manifest
from cxr.core.preprocess import load_image_file, prepare_image
from cxr.explain.compute import captum_labels, compute_heatmaps, model_votes
from cxr.explain.fusion import fuse_by_rule
from cxr.explain.heatmap_store import dequantize, pack_heatmaps, unpack_heatmaps
from cxr.explain.methods import ATTRIBUTION_METHODS, CAPTUM_METHODS, FUSION_RULES, check_method
from cxr.explain.panels import GAP, PanelFinding, finding_panel, summary_page
from cxr.explain.render import disagreement_image, overlay_image
from cxr.models.bundle import EnsembleNet, load_ensemble, logits_to_probabilities
from cxr.models.testing import make_random_ensemble

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO.parent / "shared" / "data" / "nih-cxr14-621" / "images_512" / "00000075_000.png"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, EnsembleNet]:
    folder = tmp_path_factory.mktemp("tiny")
    make_random_ensemble(folder, size=64)
    return load_ensemble(folder)


@pytest.fixture(scope="module")
def x(tiny: tuple[Manifest, EnsembleNet]) -> np.ndarray:
    return prepare_image(load_image_file(IMAGE), tiny[0].preprocess)


@pytest.mark.parametrize("rule", FUSION_RULES)
def test_the_stored_fused_map_is_the_rule_applied_to_the_stored_model_maps(
    tiny: tuple[Manifest, EnsembleNet], x: np.ndarray, rule: str
) -> None:
    manifest, ensemble = tiny
    h = compute_heatmaps(ensemble, manifest, x, grid=16, fusion_rule=rule)
    logits = np.stack([m(torch.from_numpy(x)[None]).detach().numpy()[0] for m in ensemble.members])
    probs = logits_to_probabilities(manifest, logits)
    expected = fuse_by_rule(dequantize(h.per_model), rule, probs, model_votes(manifest, probs))
    assert np.abs(dequantize(h.fused) - expected).max() <= 2.5 / 255  # quantisation of inputs and output
    assert h.explained is None and rule.split("_")[0] in h.method


@pytest.mark.parametrize("method", CAPTUM_METHODS)
def test_captum_methods_explain_only_the_chosen_labels(
    tiny: tuple[Manifest, EnsembleNet], x: np.ndarray, method: str
) -> None:
    manifest, ensemble = tiny
    h = compute_heatmaps(ensemble, manifest, x, grid=16, method=method)
    assert h.explained is not None
    logits = np.stack([m(torch.from_numpy(x)[None]).detach().numpy()[0] for m in ensemble.members])
    chosen = captum_labels(manifest, logits)
    assert sorted(np.flatnonzero(h.explained).tolist()) == sorted(chosen) and 1 <= len(chosen) <= 2
    others = ~h.explained
    assert not h.per_model[:, others].any()  # unexplained labels: empty maps
    assert h.per_model[:, h.explained].max() > 0 and method.split("_")[0] in h.method.lower()
    back = unpack_heatmaps(pack_heatmaps(h))
    assert back.explained is not None and np.array_equal(back.explained, h.explained)
    assert back.is_explained(manifest.labels[chosen[0]])


def test_unknown_methods_and_rules_are_refused(tiny: tuple[Manifest, EnsembleNet], x: np.ndarray) -> None:
    manifest, ensemble = tiny
    with pytest.raises(InvalidInputError) as e:
        compute_heatmaps(ensemble, manifest, x, method="lime")
    assert e.value.reason == "UNKNOWN_EXPLANATION_METHOD"
    with pytest.raises(ValueError, match="fusion rule"):
        compute_heatmaps(ensemble, manifest, x, fusion_rule="max")
    assert check_method("") == "gradcam" and set(CAPTUM_METHODS) < set(ATTRIBUTION_METHODS)


def test_finding_panel_is_the_overlay_next_to_the_disagreement_map() -> None:
    display = np.asarray(Image.open(IMAGE).convert("L"))[:300, :200]
    heat = np.zeros((16, 16), np.float32)
    heat[4:8, 4:8] = 1.0
    std = np.full((16, 16), 0.25, np.float32)
    finding = PanelFinding("Effusion", 0.83, 2, 3, True, 0.41)
    panel = finding_panel(display, heat, std, finding)
    assert panel.shape == (300, 2 * 200 + GAP, 3) and panel.dtype == np.uint8
    left = overlay_image(display, heat, title=finding.title, subtitle="fused Grad-CAM, spatial agreement 0.41")
    right = disagreement_image(display, std, title="Effusion: disagreement between models")
    assert np.array_equal(panel[:, :200], left) and np.array_equal(panel[:, 200 + GAP :], right)
    assert not panel[:, 200 : 200 + GAP].any()
    assert finding.title == "Effusion \u2014 probability 0.830 \u2014 agreement 2 of 3 models"


@pytest.mark.parametrize("n", [0, 1, 3, 5])
def test_summary_page_tiles_every_positive_finding(n: int) -> None:
    display = np.asarray(Image.open(IMAGE).convert("L"))
    tiles = [(PanelFinding(f"L{i}", 0.9, 3, 3), np.eye(16, dtype=np.float32)) for i in range(n)]
    page = summary_page(display, tiles, heading="model 1.0", width=600)
    cols = max(1, int(np.ceil(np.sqrt(n))))
    rows = max(1, int(np.ceil(n / cols)))
    tile = min((600 - GAP * (cols - 1)) // cols, 512)  # tiles never upscale the 512 px radiograph
    assert page.shape[1] == 600 and page.shape[0] > rows * tile  # header band on top of the tiles
    body = page[page.shape[0] - rows * tile - (rows - 1) * GAP :]
    first = body[:tile, :tile]
    assert first.std() > 10  # an image, not an empty tile
    if n:
        assert np.abs(first[..., 0].astype(int) - first[..., 2].astype(int)).max() > 50  # coloured heat
    with pytest.raises(ValueError):
        summary_page(display, tiles, heading="x", width=10)
