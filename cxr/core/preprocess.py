"""Preprocessing shared by training and serving (numpy + Pillow only; no torch).

Pipeline, identical everywhere:
    decoded radiograph (2-D, float32 in [0, 1], bright = dense, i.e. MONOCHROME2 orientation)
      -> ``resize_square``  (whole image squashed to size x size, antialiased; the paper resizes to a square)
      -> [training only: augmentation on the [0, 1] image]
      -> ``normalize``      (x - mean) / std, one channel -> float32 array of shape (1, size, size)

``prepare_image`` = normalize(resize_square(x)). Training applies its augmentation between the two steps and
nothing else, so train/serve skew is impossible by construction.

Lung cropping (the paper's U-Net crop) is not implemented: no lung-mask model can be bundled here. The spec
carries ``crop`` so that a later version can add it without breaking old manifests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cxr.core.errors import InvalidInputError


@dataclass(frozen=True)
class PreprocessSpec:
    size: int = 224
    mean: float = 0.5
    std: float = 0.25
    crop: str = "none"  # "none" only, for now (see module docstring)

    def __post_init__(self) -> None:
        if self.size < 16 or self.std <= 0 or self.crop != "none":
            raise ValueError(f"bad preprocessing spec {self}")


def to_unit_range(pixels: np.ndarray, *, max_value: float | None = None) -> np.ndarray:
    """Integer (or float) pixels -> float32 in [0, 1].

    ``max_value`` defaults to the dtype's maximum for integers (255 for uint8, 65535 for uint16) and to the
    array's own range for floats.
    """
    a = np.asarray(pixels)
    if a.ndim != 2:
        raise InvalidInputError(f"expected a 2-D greyscale image, got shape {a.shape}", reason="BAD_IMAGE_SHAPE")
    if np.issubdtype(a.dtype, np.integer):
        top = float(max_value if max_value is not None else np.iinfo(a.dtype).max)
        return np.clip(a.astype(np.float32) / top, 0.0, 1.0)
    a = a.astype(np.float32)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if max_value is not None:
        return np.clip(a / float(max_value), 0.0, 1.0)
    return np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo)


def resize_square(image01: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D [0, 1] float image to (size, size) with antialiased bilinear filtering."""
    if image01.ndim != 2 or min(image01.shape) < 2:
        raise InvalidInputError(f"image too small or not 2-D: {image01.shape}", reason="BAD_IMAGE_SHAPE")
    if image01.shape == (size, size):
        return image01.astype(np.float32, copy=False)
    img = Image.fromarray(np.ascontiguousarray(image01, dtype=np.float32), mode="F")
    out = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def normalize(square01: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """(size, size) [0, 1] image -> (1, size, size) float32 normalised model input."""
    if square01.shape != (spec.size, spec.size):
        raise InvalidInputError(f"expected {spec.size}x{spec.size}, got {square01.shape}", reason="BAD_IMAGE_SHAPE")
    return ((square01.astype(np.float32) - spec.mean) / spec.std)[None, :, :]


def prepare_image(image01: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Decoded [0, 1] radiograph -> model input of shape (1, size, size), float32."""
    return normalize(resize_square(image01, spec.size), spec)


def load_image_file(path: str | Path) -> np.ndarray:
    """Read a greyscale PNG/JPEG (8- or 16-bit; RGB is converted to luminance) -> float32 in [0, 1]."""
    with Image.open(path) as img:
        if img.mode in ("I;16", "I;16B", "I;16L"):
            a = np.asarray(img, dtype=np.uint16)
        elif img.mode == "I":
            a32 = np.asarray(img, dtype=np.int64)
            return to_unit_range(a32.astype(np.float32), max_value=65535.0 if a32.max() > 255 else 255.0)
        elif img.mode == "L":
            a = np.asarray(img, dtype=np.uint8)
        else:
            a = np.asarray(img.convert("L"), dtype=np.uint8)
    return to_unit_range(a)
