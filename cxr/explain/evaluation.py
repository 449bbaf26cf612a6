"""``cxr explain-eval``: do the heatmaps point where radiologists point, and are they faithful to the ensemble?

For every image with a radiologist box (CSV columns ``Image Index, Finding Label, x, y, w, h`` in the image's
own pixels, as NIH's ``BBox_List_2017.csv`` / ``bboxes_1024px.csv``) whose label the ensemble knows: each model's
map of that label and the fused map of every fusion rule are scored with the pointing game, IoU at
``IOU_THRESHOLD`` of the max and energy in box (``cxr.explain.localization``), next to the chance baselines (a
uniformly random point; a centred Gaussian prior map), and, unless skipped, with deletion / insertion curves
(``cxr.explain.faithfulness``) next to a random map. Labels are matched case-insensitively on their
letters and digits, else on their first six when only one label shares them, so NIH's box label "Infiltrate"
finds the label "Infiltration" (``match_label``).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr.core.errors import InvalidInputError
from cxr.core.manifest import Manifest
from cxr.core.preprocess import load_image_file, prepare_image
from cxr.explain.compute import common_grid, model_maps, model_votes
from cxr.explain.faithfulness import deletion_insertion, image_endpoints
from cxr.explain.fusion import fuse_by_rule
from cxr.explain.localization import (
    IOU_THRESHOLD,
    Box,
    area_fraction,
    centred_gaussian_prior,
    energy_in_box,
    iou_at,
    pointing_hit,
)
from cxr.explain.methods import FUSION_RULES, GRADCAM
from cxr.models.bundle import EnsembleNet, logits_to_probabilities

GAUSSIAN_PRIOR = "gaussian_prior"
RANDOM_POINT = "random_point"
RANDOM_MAP = "random_map"
BOX_COLUMNS = ("Image Index", "Finding Label", "x", "y", "w", "h")


@dataclass(frozen=True)
class BoxRow:
    """One radiologist box: image file name, the box's label as written, the box in the image's pixels."""

    image: str
    label: str
    box: Box


@dataclass
class EvalOptions:
    grid: int = 64
    method: str = GRADCAM
    faithfulness: bool = True
    steps: int = 8
    seed: int = 0
    progress: Callable[[str], None] | None = field(default=None, repr=False)


def read_boxes(path: Path) -> list[BoxRow]:
    """The boxes CSV -> rows. Raises InvalidInputError (BAD_BOXES) for a missing column or a bad number."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in BOX_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise InvalidInputError(f"{path} lacks the columns {missing}", reason="BAD_BOXES")
            return [_box_row(r) for r in reader]
    except (ValueError, OSError) as e:
        raise InvalidInputError(f"cannot read the boxes in {path}: {e}", reason="BAD_BOXES") from e


def _box_row(r: dict[str, str]) -> BoxRow:
    box = Box(float(r["x"]), float(r["y"]), float(r["w"]), float(r["h"]))
    return BoxRow(r["Image Index"].strip(), r["Finding Label"].strip(), box)


def match_label(name: str, labels: Sequence[str]) -> int | None:
    """Index of the manifest label that ``name`` means: the same letters and digits (case-insensitive), else the
    only label sharing its first six ("Infiltrate" -> "Infiltration"); None when none or several do."""
    exact = [j for j, label in enumerate(labels) if _label_key(label) == _label_key(name)]
    if exact:
        return exact[0]
    prefix = [j for j, label in enumerate(labels) if _label_key(label)[:6] == _label_key(name)[:6]]
    return prefix[0] if len(prefix) == 1 else None


def _label_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def evaluate(
    ensemble: EnsembleNet, manifest: Manifest, rows: Sequence[BoxRow], images: Path, opts: EvalOptions
) -> dict[str, Any]:
    """Score every usable box; returns the report (see ``summarise``). Boxes whose label the ensemble does not
    know or whose image is missing are listed under ``skipped``. Raises InvalidInputError (NO_BOXES) when no box
    can be scored."""
    per_image, skipped = [], []
    for row in rows:
        j = match_label(row.label, manifest.labels)
        path = images / row.image
        if j is None or not path.is_file():
            skipped.append({"image": row.image, "label": row.label,
                            "why": "unknown label" if j is None else "image not found"})  # fmt: skip
            continue
        if opts.progress is not None:
            opts.progress(f"{row.image} ({manifest.labels[j]})")
        per_image.append(score_image(ensemble, manifest, path, row, j, opts))
    if not per_image:
        raise InvalidInputError("no box could be scored (labels unknown or images missing)", reason="NO_BOXES")
    return summarise(manifest, per_image, skipped, opts)


def candidate_maps(
    ensemble: EnsembleNet, manifest: Manifest, x: torch.Tensor, j: int, opts: EvalOptions
) -> tuple[dict[str, tuple[str, np.ndarray]], np.ndarray]:
    """Every map compared for label ``j`` of one input: {name: (kind, (G, G) map)} with kind "fusion", "model" or
    "baseline", and the (M,) calibrated probabilities of the models."""
    per_model, _ = model_maps(ensemble, manifest, x, opts.method, labels=[j])
    maps = common_grid(per_model, len(manifest.labels), opts.grid)
    probs = logits_to_probabilities(manifest, np.stack([mc.logits for mc in per_model]))
    votes = model_votes(manifest, probs)
    out: dict[str, tuple[str, np.ndarray]] = {
        rule: ("fusion", fuse_by_rule(maps, rule, probs, votes)[j]) for rule in FUSION_RULES
    }
    out.update({name: ("model", maps[i, j]) for i, name in enumerate(manifest.model_names)})
    out[GAUSSIAN_PRIOR] = ("baseline", centred_gaussian_prior(opts.grid))
    return out, probs[:, j]


def score_image(
    ensemble: EnsembleNet, manifest: Manifest, path: Path, row: BoxRow, j: int, opts: EvalOptions
) -> dict[str, Any]:
    """One boxed image -> {"image", "label", "probability", "positive", "chance", "scores": {name: {...}}}."""
    pixels = load_image_file(path)
    x = torch.from_numpy(prepare_image(pixels, manifest.preprocess)).unsqueeze(0)
    height, width = pixels.shape
    box = row.box.scaled(opts.grid / width, opts.grid / height)
    chance = area_fraction((opts.grid, opts.grid), box)
    maps, model_probs = candidate_maps(ensemble, manifest, x, j, opts)
    scores = {name: _localisation(kind, heat, box) for name, (kind, heat) in maps.items()}
    scores[RANDOM_POINT] = {"kind": "baseline", "pointing": chance, "iou": None, "energy": chance}
    if opts.faithfulness:
        random_map = np.random.default_rng(opts.seed).random((opts.grid, opts.grid))
        ends = image_endpoints(ensemble, manifest, x, j)
        for name, heat in [*((n, h) for n, (_, h) in maps.items()), (RANDOM_MAP, random_map)]:
            curves = deletion_insertion(
                ensemble, manifest, x, j, heat, steps=opts.steps, seed=opts.seed, endpoints=ends
            )
            entry = scores.setdefault(name, {"kind": "baseline", "pointing": None, "iou": None, "energy": None})
            entry.update(deletion_auc=curves.deletion_auc, insertion_auc=curves.insertion_auc)
    probability = float(model_probs.mean())
    positive = probability >= manifest.thresholds[j]
    return {"image": row.image, "label": manifest.labels[j], "box_label": row.label, "chance": chance,
            "probability": probability, "positive": positive, "scores": scores}  # fmt: skip


def _localisation(kind: str, heat: np.ndarray, box: Box) -> dict[str, Any]:
    return {
        "kind": kind,
        "pointing": pointing_hit(heat, box),
        "iou": iou_at(heat, box),
        "energy": energy_in_box(heat, box),
    }


def summarise(
    manifest: Manifest, per_image: list[dict[str, Any]], skipped: list[dict[str, str]], opts: EvalOptions
) -> dict[str, Any]:
    """Per map name over all images: pointing_hit_rate, chance_hit_rate, p_value_vs_chance (one-sided, exact,
    Poisson-binomial over the images' chance rates), mean IoU, mean energy in box and chance energy, and the mean
    deletion / insertion AUCs."""
    chances = [img["chance"] for img in per_image]
    names = list(per_image[0]["scores"])
    rules = {name: _aggregate([img["scores"][name] for img in per_image], chances) for name in names}
    return {
        "model": {"name": manifest.name, "version": manifest.version, "members": list(manifest.model_names)},
        "method": opts.method, "grid": opts.grid, "iou_threshold": IOU_THRESHOLD,
        "faithfulness": {"steps": opts.steps, "perturbation": "blurred copy", "score": "ensemble probability"}
        if opts.faithfulness else None,
        "images": len(per_image), "skipped": skipped, "rules": rules, "per_image": per_image,
    }  # fmt: skip


def _aggregate(scores: list[dict[str, Any]], chances: list[float]) -> dict[str, Any]:
    def mean(key: str) -> float | None:
        values = [s[key] for s in scores if s.get(key) is not None]
        return float(np.mean(values)) if values else None

    hits = [s["pointing"] for s in scores]
    out = {
        "kind": scores[0]["kind"],
        "pointing_hit_rate": mean("pointing"),
        "chance_hit_rate": float(np.mean(chances)),
        "p_value_vs_chance": _p_value(hits, chances) if None not in hits else None,
        "mean_iou": mean("iou"),
        "mean_energy_in_box": mean("energy"),
        "chance_energy_in_box": float(np.mean(chances)),
        "n": len(scores),
    }
    if any("deletion_auc" in s for s in scores):
        out.update(deletion_auc=mean("deletion_auc"), insertion_auc=mean("insertion_auc"))
    return out


def _p_value(hits: list[float], chances: list[float]) -> float:
    """P(at least round(sum(hits)) hits) when image i is hit with probability chances[i] (Poisson-binomial)."""
    dist = np.zeros(len(chances) + 1)
    dist[0] = 1.0
    for p in chances:
        dist[1:] = dist[1:] * (1 - p) + dist[:-1] * p
        dist[0] *= 1 - p
    k = int(math.floor(sum(hits) + 1e-9))
    return float(min(1.0, dist[k:].sum()))
