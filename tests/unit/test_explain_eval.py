"""Localisation metrics, fusion rules, deletion / insertion and `cxr explain-eval` on hand-made maps and boxes whose
answers are known, and on tiny ensembles whose behaviour is built in."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr.cli.main import main as cxr_main
from cxr.core.errors import InvalidInputError
from cxr.core.manifest import Manifest, ModelEntry
from cxr.explain.evaluation import _p_value, match_label, read_boxes
from cxr.explain.faithfulness import deletion_insertion
from cxr.explain.fusion import fuse_by_rule
from cxr.explain.localization import (
    Box,
    area_fraction,
    box_mask,
    centred_gaussian_prior,
    energy_in_box,
    iou_at,
    pointing_hit,
)
from cxr.models.bundle import EnsembleNet
from cxr.models.testing import make_random_ensemble

pytestmark = pytest.mark.unit

BOX = Box(x=8, y=4, w=4, h=6)  # cells x 8..11, y 4..9 of a 16 x 16 grid


def peaked(at: tuple[int, int], grid: int = 16) -> np.ndarray:
    heat = np.zeros((grid, grid), np.float32)
    heat[at] = 1.0
    return heat


def test_pointing_game_hits_inside_and_misses_outside() -> None:
    assert pointing_hit(peaked((5, 9)), BOX) == 1.0  # row 5, column 9: inside
    assert pointing_hit(peaked((5, 2)), BOX) == 0.0  # column 2: left of the box
    assert pointing_hit(peaked((12, 9)), BOX) == 0.0  # row 12: below
    flat = np.ones((16, 16), np.float32)  # no peak: scores the box's share of the image, like chance
    assert pointing_hit(flat, BOX) == pytest.approx(24 / 256) == pytest.approx(area_fraction((16, 16), BOX))


def test_iou_and_energy_of_known_maps() -> None:
    exact = box_mask((16, 16), BOX).astype(np.float32)
    assert exact.sum() == 24
    assert iou_at(exact, BOX) == 1.0 and energy_in_box(exact, BOX) == 1.0
    half = exact.copy()
    half[:, 10:] = 0  # only the box's left half is hot
    assert iou_at(half, BOX) == pytest.approx(0.5) and energy_in_box(half, BOX) == 1.0
    outside = peaked((0, 0))
    assert iou_at(outside, BOX) == 0.0 and energy_in_box(outside, BOX) == 0.0
    assert energy_in_box(np.ones((16, 16)), BOX) == pytest.approx(24 / 256)
    assert iou_at(np.zeros((16, 16)), BOX) == 0.0


def test_boxes_scale_and_clip_and_bad_ones_are_refused() -> None:
    assert Box(512, 256, 64, 128).scaled(16 / 1024, 16 / 1024) == Box(8, 4, 1, 2)
    assert area_fraction((16, 16), Box(12, 12, 8, 8)) == pytest.approx(16 / 256)  # half outside the image
    for bad in ((0, 0, 0, 4), (0, 0, 4, -1), (float("nan"), 0, 1, 1)):
        with pytest.raises(ValueError):
            Box(*bad)
    with pytest.raises(ValueError):
        pointing_hit(np.array([1.0, 2.0]), BOX)


def test_gaussian_prior_points_at_the_centre() -> None:
    prior = centred_gaussian_prior(16)
    assert prior.max() == 1.0 and pointing_hit(prior, Box(6, 6, 4, 4)) == 1.0
    assert pointing_hit(prior, Box(0, 0, 4, 4)) == 0.0


def test_p_value_of_the_pointing_game_against_chance() -> None:
    assert _p_value([1, 1], [0.5, 0.5]) == pytest.approx(0.25)
    assert _p_value([0, 0], [0.1, 0.2]) == pytest.approx(1.0)
    assert _p_value([1, 0, 1], [0.1, 0.1, 0.1]) == pytest.approx(1 - 0.9**3 - 3 * 0.1 * 0.9**2)


def test_fusion_rules_on_known_maps() -> None:
    maps = np.zeros((3, 1, 2, 2), np.float32)
    maps[0, 0, 0, 0] = maps[1, 0, 0, 1] = maps[2, 0, 1, 1] = 1.0  # each model looks somewhere else
    probs = np.array([[0.9], [0.1], [0.0]])
    votes = np.array([[True], [False], [False]])
    assert np.allclose(fuse_by_rule(maps, "mean", probs, votes)[0], [[1 / 3, 1 / 3], [0, 1 / 3]])
    assert np.allclose(fuse_by_rule(maps, "probability_weighted", probs, votes)[0], [[0.9, 0.1], [0, 0]])
    assert np.allclose(fuse_by_rule(maps, "agreement_masked", probs, votes)[0], [[1, 0], [0, 0]])
    nobody = np.zeros((3, 1), bool)  # no model votes: the plain mean
    assert np.allclose(fuse_by_rule(maps, "agreement_masked", probs, nobody), fuse_by_rule(maps, "mean", probs, nobody))
    with pytest.raises(ValueError, match="unknown fusion rule"):
        fuse_by_rule(maps, "median", probs, votes)
    with pytest.raises(ValueError, match="must both be"):
        fuse_by_rule(maps, "mean", probs[:2], votes)


class _LooksTopLeft(torch.nn.Module):
    """A 'model' whose logit grows with the fine texture (mean square) of the image's top-left quarter: a
    0/1 checkerboard there scores 0.5 (logit +5), its blurred copy about 0.25 (logit -5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[-1] // 2
        return ((x[..., :s, :s] ** 2).mean(dim=(1, 2, 3)).unsqueeze(1) - 0.375) * 40


def _toy_ensemble() -> tuple[Manifest, EnsembleNet]:
    manifest = Manifest(name="toy", version="1", labels=("A",), thresholds=(0.5,),
                        models=(ModelEntry(name="toy", arch="toy", weights="-"),))  # fmt: skip
    return manifest, EnsembleNet([_LooksTopLeft()], ["toy"]).eval()  # type: ignore[list-item]


def test_a_map_on_what_the_model_uses_deletes_faster_and_inserts_faster_than_a_wrong_one() -> None:
    manifest, ensemble = _toy_ensemble()
    x = torch.zeros(1, 1, 32, 32)
    x[..., :16, :16] = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2  # texture where the model looks
    right = np.zeros((8, 8))
    right[:4, :4] = 1.0
    wrong = np.zeros((8, 8))
    wrong[4:, 4:] = 1.0
    good = deletion_insertion(ensemble, manifest, x, 0, right, steps=4)
    bad = deletion_insertion(ensemble, manifest, x, 0, wrong, steps=4)
    assert good.deletion[0] == pytest.approx(bad.deletion[0]) and good.deletion[0] > 0.9  # same start
    assert good.deletion[1] < 0.5 < bad.deletion[1]  # removing the right quarter drops the probability at once
    assert good.deletion_auc < bad.deletion_auc and good.insertion_auc > bad.insertion_auc
    with pytest.raises(ValueError):
        deletion_insertion(ensemble, manifest, x, 3, right)


def test_labels_match_nih_box_names() -> None:
    labels = ("Atelectasis", "Infiltration", "Pneumonia", "Pneumothorax", "Pleural_Thickening")
    assert match_label("Infiltrate", labels) == 1
    assert match_label("Pneumonia", labels) == 2 and match_label("pneumothorax", labels) == 3
    assert match_label("Pleural Thickening", labels) == 4
    assert match_label("Pneumo", labels) is None and match_label("Mass", labels) is None


def test_a_boxes_csv_without_its_columns_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "boxes.csv"
    bad.write_text("image,label\nx.png,Mass\n")
    with pytest.raises(InvalidInputError) as e:
        read_boxes(bad)
    assert e.value.reason == "BAD_BOXES"
    bad.write_text("Image Index,Finding Label,x,y,w,h\nx.png,Mass,1,2,three,4\n")
    with pytest.raises(InvalidInputError):
        read_boxes(bad)


def test_explain_eval_command_end_to_end_on_a_tiny_ensemble(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "model"
    manifest = make_random_ensemble(model, size=64)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((128, 128)) * 255).astype(np.uint8)).save(images / "a.png")
    boxes = tmp_path / "boxes.csv"
    label = manifest.labels[0]
    boxes.write_text(f"Image Index,Finding Label,x,y,w,h\na.png,{label},32,32,64,64\nmissing.png,{label},0,0,9,9\n"
                     "a.png,NotALabel,0,0,9,9\n")  # fmt: skip
    rc = cxr_main(["explain-eval", "--model", str(model), "--boxes", str(boxes), "--images", str(images),
                   "--json", "--grid", "16", "--steps", "2"])  # fmt: skip
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 1 and len(report["skipped"]) == 2
    rules = report["rules"]
    assert {"mean", "probability_weighted", "agreement_masked", "gaussian_prior", "random_point", "random_map"} <= set(
        rules
    ) and set(manifest.model_names) <= set(rules)
    for r in rules.values():
        assert r["chance_hit_rate"] == pytest.approx(0.25)  # the box covers a quarter of the image
    assert rules["random_point"]["pointing_hit_rate"] == pytest.approx(0.25)
    assert rules["gaussian_prior"]["pointing_hit_rate"] == 1.0  # the box is centred
    assert 0.0 <= rules["mean"]["pointing_hit_rate"] <= 1.0 and rules["mean"]["deletion_auc"] is not None
    empty = tmp_path / "none.csv"
    empty.write_text("Image Index,Finding Label,x,y,w,h\nmissing.png,Mass,0,0,9,9\n")
    assert cxr_main(["explain-eval", "--model", str(model), "--boxes", str(empty), "--images", str(images)]) == 2
    assert "NO_BOXES" in capsys.readouterr().err
