"""Localisation of a heatmap against a radiologist's box (numpy only).

A map is (G, G) >= 0 on the model-input grid (the whole radiograph squashed to a square); a ``Box`` is in the
same grid's coordinates (x, y = left, top; w, h), continuous (pixel i covers [i, i + 1)). Metrics:

* pointing game: is the map's maximum inside the box? (all maxima of a flat map count: the hit is the fraction
  of the maximal cells inside the box, so a constant map scores the box's area fraction, like chance);
* IoU at a stated threshold: the cells with value >= ``threshold`` x max, against the cells whose centre is
  inside the box;
* energy in box: the share of the map's total mass inside the box (a uniform map scores the area fraction).

Chance baselines: a uniformly random point hits with probability = the box's area fraction
(``chance_hit_rate``); ``centred_gaussian_prior`` is a map that always points at the image centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IOU_THRESHOLD = 0.5  # of each map's maximum


@dataclass(frozen=True)
class Box:
    """An axis-aligned box on a grid: left, top, width, height (grid units, continuous)."""

    x: float
    y: float
    w: float
    h: float

    def __post_init__(self) -> None:
        if not (self.w > 0 and self.h > 0) or not all(np.isfinite([self.x, self.y, self.w, self.h])):
            raise ValueError(f"a box needs a finite position and a positive size, got {self}")

    def scaled(self, factor_x: float, factor_y: float) -> Box:
        """The same box on a grid ``factor`` times finer (e.g. 1024 px -> 64 cells: 64 / 1024)."""
        return Box(self.x * factor_x, self.y * factor_y, self.w * factor_x, self.h * factor_y)


def box_mask(shape: tuple[int, int], box: Box) -> np.ndarray:
    """(rows, cols) bool: the cells whose centre lies inside ``box``."""
    rows, cols = shape
    cy, cx = np.arange(rows) + 0.5, np.arange(cols) + 0.5
    inside_y = (cy >= box.y) & (cy < box.y + box.h)
    inside_x = (cx >= box.x) & (cx < box.x + box.w)
    return inside_y[:, None] & inside_x[None, :]


def area_fraction(shape: tuple[int, int], box: Box) -> float:
    """The share of the image the box covers (clipped to the image): the chance of a random point hitting it."""
    rows, cols = shape
    w = max(0.0, min(box.x + box.w, cols) - max(box.x, 0.0))
    h = max(0.0, min(box.y + box.h, rows) - max(box.y, 0.0))
    return float(w * h / (rows * cols))


def pointing_hit(heat: np.ndarray, box: Box) -> float:
    """1.0 when the map's maximum is inside the box, 0.0 when outside; with several maximal cells, the share
    of them inside (so an all-equal map scores like chance instead of hitting by index order)."""
    a = _map(heat)
    peaks = a >= a.max()
    return float((peaks & box_mask(a.shape, box)).sum() / peaks.sum())


def iou_at(heat: np.ndarray, box: Box, threshold: float = IOU_THRESHOLD) -> float:
    """IoU of {cells >= threshold * max} with the box's cells (0 for an all-zero map)."""
    a = _map(heat)
    if a.max() <= 0:
        return 0.0
    hot, inside = a >= threshold * a.max(), box_mask(a.shape, box)
    union = (hot | inside).sum()
    return float((hot & inside).sum() / union) if union else 0.0


def energy_in_box(heat: np.ndarray, box: Box) -> float:
    """Share of the map's mass inside the box (the box's area fraction for an all-zero map: no information)."""
    a = _map(heat)
    total = a.sum()
    if total <= 0:
        return area_fraction(a.shape, box)
    return float(a[box_mask(a.shape, box)].sum() / total)


def centred_gaussian_prior(grid: int, sigma_fraction: float = 0.25) -> np.ndarray:
    """(grid, grid) float32: a Gaussian centred on the image, sigma = ``sigma_fraction`` of the side, max 1."""
    c = (np.arange(grid) + 0.5) / grid - 0.5
    g = np.exp(-(c[:, None] ** 2 + c[None, :] ** 2) / (2 * sigma_fraction**2))
    return (g / g.max()).astype(np.float32)


def _map(heat: np.ndarray) -> np.ndarray:
    a = np.asarray(heat, dtype=np.float64)
    if a.ndim != 2 or not np.all(np.isfinite(a)):
        raise ValueError(f"expected a finite 2-D map, got shape {a.shape}")
    return np.maximum(a, 0.0)
