"""The display image of a job (``cxr:job:{id}:display``): the radiograph as an 8-bit greyscale PNG, long side at
most ``CXR_OVERLAY_MAX_SIDE``, on which GetExplanation renders the overlays. Numpy + Pillow + the DICOM core;
never imports torch.

The explanation worker makes it from the uploaded DICOM file (``display_from_dicom``), off the synchronous Analyze
path: Analyze decodes only at model resolution, and this decode is at the resolution the display needs (the full
resolution for files at most 1.5 x the display size; else a reduced JPEG 2000 level or an integer area reduction,
``display_decode_min_side``). Pillow's fastest deflate level (compress_level=1) keeps the encode at ~20 ms for a 1024 px
radiograph (~115 ms at the default level).
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from cxr.core.dicom_decode import DecodePolicy, decode_radiograph, read_identity

# The worker does not judge admission again: lateral views were already rejected (or accepted with a warning)
# by the ingestion service under its CXR_LATERAL_POLICY, so here a lateral view is only noted, never refused.
# Every other check (modality, photometric interpretation, pixel cap, syntaxes) is the default policy, as in
# ingestion.
DISPLAY_POLICY = DecodePolicy(lateral="warn")
# A file between 1x and 2x the display size would need a full-resolution decode (for JPEG 2000, ~3x the cost of
# one reduce level) only to be shrunk afterwards. Where half resolution still gives at least this fraction of the
# display's size, the display is decoded at half resolution and kept at that size (long side <= max_side, as the
# :display contract says): a 1955 x 1841 CR asked at 1024 gives a 978 x 921 display.
HALF_RESOLUTION_SLACK = 0.75


def to_grey8(pixels01: np.ndarray) -> np.ndarray:
    """[0, 1] float image -> uint8 (round half up, clipped)."""
    scaled = np.multiply(pixels01, 255.0, dtype=np.float32)
    scaled += 0.5
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return scaled.astype(np.uint8)


def shrink_to(grey8: np.ndarray, max_side: int) -> np.ndarray:
    """Antialiased bilinear downscale so that the long side is at most ``max_side`` (never upscales)."""
    height, width = grey8.shape
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return grey8
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(grey8).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))


def grey_png(grey8: np.ndarray) -> bytes:
    """2-D uint8 array -> 8-bit greyscale PNG bytes (Pillow, fastest deflate level).

    Raises ValueError for anything but a non-empty 2-D uint8 array.
    """
    if grey8.ndim != 2 or grey8.dtype != np.uint8 or grey8.size == 0:
        raise ValueError(f"expected a non-empty 2-D uint8 image, got {grey8.dtype} {grey8.shape}")
    buf = io.BytesIO()
    Image.fromarray(grey8).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def display_png(pixels01: np.ndarray, max_side: int) -> bytes:
    """Decoded [0, 1] radiograph -> the stored display PNG (long side <= ``max_side``)."""
    return grey_png(shrink_to(to_grey8(pixels01), max_side))


def display_min_side(rows: int, columns: int, max_side: int) -> int:
    """Short side (pixels) the decoder must deliver for a display whose long side is min(``max_side``, the
    image's long side). Raises ValueError for a non-positive argument."""
    if min(rows, columns, max_side) < 1:
        raise ValueError(f"rows, columns and max_side must be >= 1, got {rows}, {columns}, {max_side}")
    short, long = sorted((rows, columns))
    return max(1, math.ceil(short * min(max_side, long) / long))


def display_decode_min_side(rows: int, columns: int, max_side: int) -> int:
    """The ``min_side`` to decode a display with: ``display_min_side``, or half the short side where the image is
    less than twice the display size and half of it is still >= HALF_RESOLUTION_SLACK of the display (then one
    JPEG 2000 reduce level or 2 x 2 block means replace a full-resolution decode). Raises ValueError like
    ``display_min_side``."""
    want = display_min_side(rows, columns, max_side)
    short = min(rows, columns)
    half = short // 2
    if short // want == 1 and half >= 1 and half >= HALF_RESOLUTION_SLACK * want:
        return half
    return want


def display_from_dicom(data: bytes, max_side: int, policy: DecodePolicy = DISPLAY_POLICY) -> bytes:
    """DICOM file bytes -> the display PNG (long side <= ``max_side``), decoded by the same core as Analyze.

    Raises every error of ``cxr.core.dicom_decode.decode_radiograph`` (all ``CxrError`` subclasses with their
    reason: NOT_DICOM, TRUNCATED_DICOM, CORRUPT_PIXEL_DATA, ...) for a file that cannot be decoded.
    """
    identity = read_identity(data)
    min_side = display_decode_min_side(max(1, identity.rows), max(1, identity.columns), max_side)
    decoded = decode_radiograph(data, min_side=min_side, policy=policy)
    return display_png(decoded.pixels, max_side)
