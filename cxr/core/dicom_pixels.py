"""Pixel Data -> 2-D array of stored values (numpy + pydicom + Pillow; never imports torch).

Every transfer syntax goes through pydicom's decoders (native, deflated, RLE, JPEG baseline/extended/lossless,
JPEG-LS, JPEG 2000, HTJ2K, with the pylibjpeg / pyjpegls / Pillow plugins installed). One exception, because
decoding is the dominant cost of the ingestion service: JPEG 2000 decoded at reduced resolution, when the caller
needs fewer pixels than the file holds. The wavelet's low-pass band at level k *is* the image at 1/2**k of the
size, so decoding only those levels is both exact (no extra resampling) and much cheaper (about 4**k fewer
samples to reconstruct).

Every other syntax (and JPEG 2000 whose codestream cannot reduce far enough) is then reduced by ``block_mean``, an
integer-factor area (box) average of the stored values, when the caller needs at most half the pixels per side:
one cheap pass that makes the expensive grey-level steps (modality LUT, VOI, percentiles, inversion) run on
1/factor**2 of the samples. Like the JPEG 2000 low-pass band, it averages stored values before the grey-level
steps; both are linear except for the window's clipping (and a rare Modality LUT Sequence), so the result differs
from "grey levels at full resolution, then averaged" only where a block straddles the window's edge.
"""

from __future__ import annotations

import io
import logging
import math

import numpy as np
from PIL import Image, ImageFile
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import pixel_array
from pydicom.uid import JPEG2000, UID, JPEG2000Lossless

from cxr.core.dicom_codestream import J2kHeader, check_frame, is_j2k_family, is_jpeg_family, parse_j2k_header
from cxr.core.dicom_read import BAD_CONTENT_ERRORS, malformed_as
from cxr.core.errors import InvalidInputError

logger = logging.getLogger(__name__)

_J2K_SYNTAXES = (JPEG2000Lossless, JPEG2000)


def stored_values(
    ds: Dataset, ts: UID, frames: int, *, min_side: int | None, notes: list[str]
) -> tuple[np.ndarray, int]:
    """Decode the first frame's stored values; return (2-D array, reduce level k: the array is 1/2**k size).

    k > 0 only for JPEG 2000 with ``min_side`` set, for the largest k with short_side / 2**k >= min_side
    that the codestream allows. Raises InvalidInputError(reason="CORRUPT_PIXEL_DATA") when a compressed frame's
    own header disagrees with Rows/Columns (checked before any decoder runs), when decoding fails, or when the
    result is not one 2-D frame. Appends an INCOMPLETE_CODESTREAM note to ``notes`` when a compressed frame
    lacks its end marker.
    """
    if is_jpeg_family(ts) or is_j2k_family(ts):
        with malformed_as("CORRUPT_PIXEL_DATA", "the encapsulated pixel data"):
            frame = get_frame(ds.PixelData, 0, number_of_frames=frames)
        if (note := check_frame(frame, ts, int(ds.Rows), int(ds.Columns))) is not None:
            notes.append(note)
        if ts in _J2K_SYNTAXES and min_side is not None:
            reduced = _try_j2k_reduced(frame, min_side)
            if reduced is not None:
                return reduced
    with malformed_as("CORRUPT_PIXEL_DATA", "the pixel data"):
        arr = pixel_array(ds, index=0 if frames > 1 else None)
    if arr.ndim != 2:
        raise InvalidInputError(
            f"decoded pixel data has shape {arr.shape}, expected one greyscale frame", reason="CORRUPT_PIXEL_DATA"
        )
    return arr, 0


def area_factor(shape: tuple[int, ...], min_side: int | None) -> int:
    """Integer reduction factor f = short side // ``min_side`` (1 = none): the largest for which the reduced
    short side, ceil(short / f), is still >= ``min_side``. None -> 1."""
    if min_side is None:
        return 1
    return max(1, min(shape[0], shape[1]) // min_side)


def block_mean(values: np.ndarray, factor: int) -> np.ndarray:
    """Area downsample of a 2-D array by an integer ``factor``: each output sample is the mean of a factor x factor
    block (blocks of the last row / column hold what remains), so the shape is ceil(h / f) x ceil(w / f), the
    same geometry as a JPEG 2000 reduce level. Returns float64 means (exact for any integer input); the input
    itself when factor is 1. Raises ValueError for a factor < 1 or an array that is not 2-D."""
    if factor < 1 or values.ndim != 2:
        raise ValueError(f"block_mean needs a 2-D array and a factor >= 1, got {values.shape} and {factor}")
    if factor == 1:
        return values
    rows = np.arange(0, values.shape[0], factor)
    columns = np.arange(0, values.shape[1], factor)
    sums = _block_sums(values, factor, rows, columns)
    sums /= _block_counts(values.shape[0], rows, factor)[:, None] * _block_counts(values.shape[1], columns, factor)
    return sums


def _block_sums(values: np.ndarray, factor: int, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """float64 sums of the factor x factor blocks. The full blocks are summed through a reshape (about twice as
    fast as ``np.add.reduceat`` on a radiograph); only the partial last row / column of blocks uses reduceat.
    Sums of integers are exact in float64, so the result does not depend on the order."""
    full_h, full_w = values.shape[0] // factor, values.shape[1] // factor
    sums = np.empty((len(rows), len(columns)), np.float64)
    core = values[: full_h * factor, : full_w * factor].reshape(full_h, factor, full_w * factor)
    sums[:full_h, :full_w] = core.sum(axis=1, dtype=np.float64).reshape(full_h, full_w, factor).sum(axis=2)
    if full_w < len(columns):  # the last, partial column of blocks (all rows)
        edge = values[:, full_w * factor :].sum(axis=1, dtype=np.float64)
        sums[:, full_w] = np.add.reduceat(edge, rows)
    if full_h < len(rows):  # the last, partial row of blocks (the full columns)
        edge = values[full_h * factor :, : full_w * factor].sum(axis=0, dtype=np.float64)
        sums[full_h, :full_w] = edge.reshape(full_w, factor).sum(axis=1)
    return sums


def _block_counts(size: int, starts: np.ndarray, factor: int) -> np.ndarray:
    """Samples in each block along one axis: ``factor``, and what remains for the last one."""
    return np.minimum(factor, size - starts).astype(np.float64)


def _try_j2k_reduced(frame: bytes, min_side: int) -> tuple[np.ndarray, int] | None:
    """The reduced JPEG 2000 decode, or None when it does not apply or fails (the caller then decodes at full
    resolution through pydicom, which reports a genuinely corrupt stream with its own error)."""
    header = parse_j2k_header(frame)
    if header is None or header.precision > 16:  # Pillow squeezes deeper samples into 16 bits
        return None
    k = reduce_level(header, min_side)
    if k == 0:
        return None
    try:
        return decode_j2k_reduced(frame[header.start :], header, k), k
    except BAD_CONTENT_ERRORS as exc:
        logger.warning("reduced JPEG 2000 decode failed (%s: %s); decoding at full resolution", type(exc).__name__, exc)
        return None


def reduce_level(header: J2kHeader, min_side: int) -> int:
    """Largest k with short_side / 2**k >= min_side, limited by the codestream's decomposition levels."""
    if header.offset:
        return 0
    short = min(header.width, header.height)
    k = 0
    while k < header.levels and short / 2 ** (k + 1) >= min_side:
        k += 1
    return k


def decode_j2k_reduced(codestream: bytes, header: J2kHeader, k: int) -> np.ndarray:
    """Decode a JPEG 2000 codestream at 1/2**k resolution with Pillow; stored values as int32 (signed
    values restored). Raises what Pillow raises on a broken stream (OSError, ValueError, SyntaxError)."""
    image = Image.open(io.BytesIO(codestream), formats=("JPEG2000",))
    if not isinstance(image, ImageFile.ImageFile):
        raise TypeError(f"Pillow opened the JPEG 2000 stream as {type(image).__name__}")
    if image.mode not in ("L", "I;16"):
        raise ValueError(f"JPEG 2000 stream decodes to mode {image.mode}, expected one greyscale component")
    _load_reduced(image, k)
    container = 8 if image.mode == "L" else 16
    values = np.asarray(image).astype(np.int32)
    if container > header.precision:  # Pillow scales N-bit samples up to its 8/16-bit container
        values >>= container - header.precision
    if header.signed:  # ... and level-shifts signed samples to unsigned
        values -= 1 << (header.precision - 1)
    return values


def _load_reduced(image: ImageFile.ImageFile, k: int) -> None:
    """Load ``image`` at reduce level k.

    Pillow's own ``image.reduce = k`` sizes the output as round-half-up(size / 2**k) while OpenJPEG produces
    ceil(size / 2**k); where they differ (e.g. 1841 px at k=2) Pillow fails with "broken data stream". So set
    the exact size and the tile's reduce argument here (Pillow 11-13 tile layout: args = (codec, reduce,
    layers, fd, length)), as ``Jpeg2KImageFile.load`` itself does.
    """
    p = 1 << k
    size = (math.ceil(image.size[0] / p), math.ceil(image.size[1] / p))
    tile = image.tile[0]
    if not isinstance(tile.args, tuple) or len(tile.args) != 5:
        raise TypeError(f"unexpected Pillow JPEG 2000 tile arguments {tile.args!r}")
    codec, _reduce, layers, fd, length = tile.args
    image._size = size  # see docstring
    image.tile = [tile._replace(extents=(0, 0, *size), args=(codec, k, layers, fd, length))]
    ImageFile.ImageFile.load(image)
