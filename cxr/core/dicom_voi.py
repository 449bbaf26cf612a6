"""Stored values -> display values in [0, 1], bright = dense (numpy + pydicom; never imports torch).

The grayscale pipeline of PS3.3 C.11, in order:
1. Modality LUT: Modality LUT Sequence, or Rescale Slope / Intercept (``pydicom.pixels.apply_modality_lut``).
2. VOI, first that applies:
   a. VOI LUT Sequence (first item; ``pydicom.pixels.apply_voi``), scaled by its nominal output range;
   b. Window Center / Width (first pair) with VOI LUT Function LINEAR (default), LINEAR_EXACT or SIGMOID,
      computed here directly into [0, 1] with the formulas of PS3.3 C.11.2.1.2;
   c. neither (or an unusable one, with a warning): images of <= 8 bits stored are shown over their nominal
      range (0..255 stays 0..255, exactly as an 8-bit PNG would load); deeper images (typically "for
      processing" data that uses a fraction of its nominal range) are stretched between the 0.5th and 99.5th
      percentiles of the image, so a few saturated or collimated pixels do not flatten the contrast.
3. MONOCHROME1 is inverted (1 - y) so that the result is always MONOCHROME2 (bright = dense). Presentation
   LUT Shape is not applied: for CR/DX it must agree with the photometric interpretation (INVERSE for
   MONOCHROME1), so applying both would invert twice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi

from cxr.core.dicom_read import malformed_as

AUTO_PERCENTILES = (0.5, 99.5)
_PERCENTILE_SAMPLE = 1 << 18  # pixels looked at for the percentiles: exact enough, and fast on 9 MP images


def to_unit_interval(values: np.ndarray, ds: Dataset, notes: list[str]) -> np.ndarray:
    """Apply modality LUT, VOI and photometric inversion; return finite float32 in [0, 1], bright = dense.

    Appends a "CODE: text" string to ``notes`` for each fallback taken. Raises InvalidInputError
    (reason="BAD_LUT") when a modality LUT or rescale cannot be applied.
    """
    with malformed_as("BAD_LUT", "the modality LUT / rescale / VOI attributes"):
        modality = np.asarray(apply_modality_lut(values, ds))
        unit = _voi(modality, ds, notes)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        unit = 1.0 - unit
    return np.clip(np.nan_to_num(unit, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0).astype(np.float32, copy=False)


def _voi(modality: np.ndarray, ds: Dataset, notes: list[str]) -> np.ndarray:
    """Modality values -> [0, 1] by VOI LUT, else window, else the automatic range (module docstring)."""
    if ds.get("VOILUTSequence"):
        try:
            return _voi_lut(modality, ds)
        except (ValueError, TypeError, LookupError, AttributeError, NotImplementedError) as exc:
            notes.append(f"BAD_VOI_LUT: VOI LUT Sequence unusable ({type(exc).__name__}); using the fallback")
    window = read_window(ds, notes)
    if window is not None:
        center, width, function = window
        return apply_window(modality.astype(np.float32, copy=False), center, width, function)
    return _auto_range(modality, ds, notes)


def _voi_lut(modality: np.ndarray, ds: Dataset) -> np.ndarray:
    """First VOI LUT Sequence item, output scaled by its nominal range 2**bits - 1 (bits: LUT Descriptor[2],
    widened when the table holds larger values than its descriptor admits, a known vendor quirk)."""
    lut_input = np.rint(modality).astype(np.int64) if modality.dtype.kind == "f" else modality
    out = np.asarray(apply_voi(lut_input, ds))
    bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
    top = max(2.0**bits - 1.0, 2.0 ** math.ceil(math.log2(float(out.max()) + 1.0)) - 1.0)
    return out.astype(np.float32) / np.float32(top)


def read_window(ds: Dataset, notes: list[str]) -> tuple[float, float, str] | None:
    """(center, width, VOI LUT function) from the first Window Center / Width pair, or None when absent or
    unusable (non-numeric, non-finite, width too small for its function; a note says which)."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    try:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    except (ValueError, TypeError, LookupError, AttributeError) as exc:
        notes.append(f"BAD_WINDOW: Window Center/Width unreadable ({type(exc).__name__}); using the fallback")
        return None
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        notes.append(f"BAD_WINDOW: unknown VOI LUT Function {function[:16]!r}; LINEAR used")
        function = "LINEAR"
    minimum = 1.0 if function == "LINEAR" else 0.0
    if not (math.isfinite(center) and math.isfinite(width)) or width < minimum or width == 0:
        notes.append(f"BAD_WINDOW: unusable window (center {center}, width {width}); using the fallback")
        return None
    return center, width, function


def _first(value: Any) -> float:
    """First value of a possibly multi-valued DS element, as float."""
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = value[0]
    return float(value)


def apply_window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """Window to [0, 1] per PS3.3 C.11.2.1.2 (ymin = 0, ymax = 1). ``width`` >= 1 for LINEAR, > 0 otherwise."""
    c, w = np.float32(center), np.float32(width)
    if function == "SIGMOID":
        return np.float32(1.0) / (np.float32(1.0) + np.exp(np.float32(-4.0) * (x - c) / w))
    if function == "LINEAR_EXACT":
        return np.clip((x - c) / w + np.float32(0.5), 0.0, 1.0)
    if width <= 1.0:  # LINEAR with width 1 is a threshold
        return (x > c - np.float32(0.5)).astype(np.float32)
    return np.clip((x - (c - np.float32(0.5))) / (w - np.float32(1.0)) + np.float32(0.5), 0.0, 1.0)


def _auto_range(modality: np.ndarray, ds: Dataset, notes: list[str]) -> np.ndarray:
    """No usable VOI: nominal range for <= 8 bits stored, else the image's AUTO_PERCENTILES (module docstring)."""
    if int(ds.get("BitsStored", 16) or 16) <= 8:
        lo, hi = nominal_range(ds)
    else:
        lo, hi = _percentile_range(modality)
        notes.append(
            f"NO_VOI: no window or VOI LUT; display range set from the {AUTO_PERCENTILES[0]}th-"
            f"{AUTO_PERCENTILES[1]}th percentiles of the image"
        )
    if not hi > lo:
        notes.append("CONSTANT_IMAGE: all pixels have the same value")
        return np.zeros(modality.shape, dtype=np.float32)
    x = modality.astype(np.float32, copy=False)
    return np.clip((x - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)


def nominal_range(ds: Dataset) -> tuple[float, float]:
    """Range of the modality LUT output implied by the header (PS3.3 C.11.1): LUT Descriptor bits for a
    Modality LUT Sequence, else the Bits Stored / Pixel Representation range through any rescale."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, 2.0 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1.0
    bits = int(ds.BitsStored)
    signed = ds.get("PixelRepresentation") == 1
    lo, hi = (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1) if signed else (0.0, 2.0**bits - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    return lo, hi


def _percentile_range(modality: np.ndarray) -> tuple[float, float]:
    """AUTO_PERCENTILES of an evenly strided sample of at most ~_PERCENTILE_SAMPLE pixels."""
    stride = max(1, math.isqrt(modality.size // _PERCENTILE_SAMPLE))
    sample = modality[::stride, ::stride].astype(np.float64, copy=False)
    lo, hi = np.percentile(sample[np.isfinite(sample)], AUTO_PERCENTILES)
    return float(lo), float(hi)
