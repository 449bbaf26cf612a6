"""The paper's panels, completed (numpy + Pillow only; no torch: the ingestion service and the DICOM result
builder call this).

* ``finding_panel``: for one finding, the fused heatmap over the radiograph (titled with the label, the ensemble
  probability and the agreement "k of n models") and, next to it, the models' per-pixel disagreement (standard
  deviation) map, which the paper names as future work. One RGB image, two display-sized halves.
* ``summary_page``: one page with the overlay of every positive finding as tiles, headed by the model's name
  and version and NOT FOR CLINICAL USE (a page that says so when no finding is positive).

Both return (H, W, 3) uint8 arrays; ``cxr.explain.render.encode_png`` turns them into PNG bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cxr.explain.display import shrink_to
from cxr.explain.render import (
    CLINICAL_WARNING,
    MIN_SIDE,
    _draw_fitted,
    disagreement_image,
    overlay_image,
    overlay_title,
)

GAP = 8  # px of black between the two halves of a panel and between summary tiles
SUMMARY_WIDTH = 1536  # px, the summary page's width
_HEADER_LINES = 2


@dataclass(frozen=True)
class PanelFinding:
    """What a panel says about one label (from a finding of the handler's answer)."""

    label: str
    probability: float
    votes: int
    n_models: int
    positive: bool = True
    spatial_agreement: float | None = None

    @classmethod
    def from_finding(cls, finding: Mapping[str, Any], spatial_agreement: float | None = None) -> PanelFinding:
        """A finding dict ({"label", "probability", "votes", "n_models", "positive", ...}) -> PanelFinding.
        Raises KeyError / ValueError for a malformed finding."""
        return cls(
            label=str(finding["label"]),
            probability=float(finding["probability"]),
            votes=int(finding["votes"]),
            n_models=int(finding["n_models"]),
            positive=bool(finding["positive"]),
            spatial_agreement=spatial_agreement,
        )

    @property
    def title(self) -> str:
        return overlay_title(self.label, self.probability, self.votes, self.n_models)


def finding_panel(display: np.ndarray, heat: np.ndarray, std: np.ndarray, finding: PanelFinding) -> np.ndarray:
    """Radiograph (H, W) + fused map + std map (each (G, G), float in [0, 1] / [0, 0.5] or uint8 as stored) ->
    (H, 2W + GAP, 3) uint8: the titled overlay on the left, the disagreement map on the right.

    Raises ValueError for a non-2-D, too small (< 16 px) or non-finite input."""
    agreement = "" if finding.spatial_agreement is None else f", spatial agreement {finding.spatial_agreement:.2f}"
    left = overlay_image(display, heat, title=finding.title, subtitle=f"fused Grad-CAM{agreement}")
    right = disagreement_image(display, std, title=f"{finding.label}: disagreement between models")
    return side_by_side(left, right)


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two (H, W, 3) uint8 images of the same height -> (H, W1 + GAP + W2, 3), GAP black columns between.
    Raises ValueError for different heights."""
    if left.shape[0] != right.shape[0]:
        raise ValueError(f"images of different heights: {left.shape} and {right.shape}")
    gap = np.zeros((left.shape[0], GAP, 3), np.uint8)
    return np.concatenate([left, gap, right], axis=1)


def summary_page(
    display: np.ndarray, tiles: Sequence[tuple[PanelFinding, np.ndarray]], *, heading: str, width: int = SUMMARY_WIDTH
) -> np.ndarray:
    """One page: every (finding, fused map) of ``tiles`` as an overlay tile on a shrunken radiograph, in a
    near-square grid under a header (``heading`` and NOT FOR CLINICAL USE). With no tiles, the plain
    radiograph under a header that says no finding is above its threshold. Returns (H, ``width``, 3) uint8.

    Raises ValueError for a bad display or map (as ``overlay_image``) or a ``width`` below 64 px."""
    if width < 64:
        raise ValueError(f"the summary page must be at least 64 px wide, got {width}")
    n = len(tiles)
    cols = max(1, math.ceil(math.sqrt(n)))
    tile_side = max(MIN_SIDE, (width - GAP * (cols - 1)) // cols)
    small = shrink_to(_grey8(display), tile_side)
    if n == 0:
        images = [np.repeat(small[..., None], 3, axis=-1)]
        heading = f"{heading} - no finding above its threshold"
    else:
        images = [overlay_image(small, heat, title=f.title, subtitle="fused Grad-CAM") for f, heat in tiles]
    return _with_header(_grid(images, cols, width), heading)


def _grey8(display: np.ndarray) -> np.ndarray:
    a = np.asarray(display)
    if a.dtype == np.uint8:
        return a
    return np.round(np.clip(a.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def _grid(images: Sequence[np.ndarray], cols: int, width: int) -> np.ndarray:
    """Equal-sized RGB tiles -> one RGB image ``width`` wide, row by row, GAP px apart, black background."""
    tile_h, tile_w = images[0].shape[:2]
    rows = math.ceil(len(images) / cols)
    page = np.zeros((rows * tile_h + (rows - 1) * GAP, width, 3), np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        top, left = r * (tile_h + GAP), c * (tile_w + GAP)
        page[top : top + tile_h, left : left + tile_w] = image[:, : width - left]
    return page


def _with_header(body: np.ndarray, heading: str) -> np.ndarray:
    """A black header band with ``heading`` (white) and NOT FOR CLINICAL USE (red) above ``body``."""
    width = body.shape[1]
    size = max(10, width // 60)
    line = int(size * 1.3) + 4
    header = Image.new("RGB", (width, _HEADER_LINES * line + 6))
    draw = ImageDraw.Draw(header)
    _draw_fitted(draw, (6, 3), heading, size, width - 12)
    _draw_fitted(draw, (6, 3 + line), CLINICAL_WARNING, size, width - 12, fill=(255, 80, 80))
    return np.concatenate([np.asarray(header), body], axis=0)
