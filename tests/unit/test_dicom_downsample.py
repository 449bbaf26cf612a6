"""Decoding at the resolution the caller needs (``decode_radiograph(min_side=...)``) for syntaxes without reduced
decoding: integer-factor block means of the stored values before the grey-level steps. The reduced decode must
be (closely) the full decode resized, in the same orientation, on the real files of ../shared/data/dicom."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from dicom_fixtures import centre_minus_lungs, correlation, read_bytes, resized, small_rg1, to_bytes

from cxr.core.dicom_decode import decode_radiograph
from cxr.core.dicom_pixels import area_factor, block_mean

pytestmark = pytest.mark.unit


def naive_block_mean(values: np.ndarray, f: int) -> np.ndarray:
    """The definition, one block at a time (blocks of the last row / column hold what remains)."""
    rows, cols = -(-values.shape[0] // f), -(-values.shape[1] // f)
    out = np.empty((rows, cols))
    for i in range(rows):
        for j in range(cols):
            out[i, j] = values[i * f : (i + 1) * f, j * f : (j + 1) * f].astype(np.float64).mean()
    return out


# -- the block mean itself ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "f"), [((16, 16), 4), ((17, 23), 4), ((9, 5), 3), ((7, 7), 7), ((5, 9), 2)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32])
def test_block_mean_is_the_mean_of_each_block(shape: tuple[int, int], f: int, dtype: type) -> None:
    info = np.iinfo(dtype)
    values: np.ndarray = np.random.default_rng(f).integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    np.testing.assert_allclose(block_mean(values, f), naive_block_mean(values, f), rtol=1e-12, atol=1e-9)


def test_block_mean_by_one_is_the_input_itself() -> None:
    values = np.arange(12, dtype=np.uint16).reshape(3, 4)
    assert block_mean(values, 1) is values


@pytest.mark.parametrize(("shape", "f"), [((4, 4), 0), ((4, 4), -2), ((4, 4, 1), 2), ((16,), 2)])
def test_block_mean_refuses_a_bad_factor_or_shape(shape: tuple[int, ...], f: int) -> None:
    with pytest.raises(ValueError):
        block_mean(np.zeros(shape, np.uint16), f)


@pytest.mark.parametrize(
    ("shape", "min_side", "f"),
    [((1955, 1841), 224, 8), ((1841, 1955), 224, 8), ((1024, 1024), 224, 4), ((1024, 1024), 600, 1),
     ((100, 80), 224, 1), ((1955, 1841), None, 1), ((448, 500), 224, 2)],
)  # fmt: skip
def test_area_factor_keeps_the_short_side_at_least_min_side(
    shape: tuple[int, int], min_side: int | None, f: int
) -> None:
    assert area_factor(shape, min_side) == f
    if min_side is not None and f > 1:
        assert -(-min(shape) // f) >= min_side


# -- decoding real files at model resolution ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "shape", "max_mean_error"),
    [("RG1_UNCR.dcm", (245, 231), 0.01), ("siim_pneumothorax_negative.dcm", (256, 256), 1e-5),
     ("nih_no_finding_dx.dcm", (256, 256), 1e-5)],
)  # fmt: skip
def test_the_reduced_decode_is_the_full_decode_resized(
    name: str, shape: tuple[int, int], max_mean_error: float
) -> None:
    full = decode_radiograph(read_bytes(name)).pixels
    reduced = decode_radiograph(read_bytes(name), min_side=224)
    assert reduced.pixels.shape == shape and reduced.pixels.dtype == np.float32
    assert reduced.scale == pytest.approx(shape[0] / full.shape[0])
    assert 0.0 <= reduced.pixels.min() and reduced.pixels.max() <= 1.0
    expected = resized(full, shape[1], shape[0])  # box filter: the same area average, after the grey levels
    # 8-bit files without a window are linear all the way: equal. RG1's window clips where blocks straddle it.
    assert float(np.abs(reduced.pixels - expected).mean()) < max_mean_error
    assert correlation(reduced.pixels, expected) > 0.995
    assert centre_minus_lungs(reduced.pixels) > 0.1  # same orientation (RG1 is MONOCHROME1)


def test_the_block_mean_and_jpeg2000_reductions_of_rg1_agree() -> None:
    uncompressed = decode_radiograph(read_bytes("RG1_UNCR.dcm"), min_side=224)
    j2k = decode_radiograph(read_bytes("RG1_J2KR.dcm"), min_side=224)  # reduce level 3: the same 245 x 231
    assert uncompressed.pixels.shape == j2k.pixels.shape == (245, 231)
    assert correlation(uncompressed.pixels, j2k.pixels) > 0.99


def test_a_min_side_above_the_short_side_decodes_at_full_resolution() -> None:
    data = read_bytes("nih_no_finding_dx.dcm")
    assert np.array_equal(decode_radiograph(data, min_side=513).pixels, decode_radiograph(data).pixels)


def test_a_modality_lut_is_applied_to_rounded_block_means() -> None:
    plain = small_rg1(step=5)  # 391 x 369, 15 bits stored, window 15000 / 30000
    ds = small_rg1(step=5)
    item = pydicom.Dataset()
    item.add_new(0x00283002, "US", [32768, 0, 16])  # LUT Descriptor: entries, first mapped value, bits
    item.add_new(0x00283006, "OW", (np.arange(32768, dtype="<u2") // 2).tobytes())  # LUT Data: halves the value
    ds.ModalityLUTSequence = [item]
    ds.WindowCenter, ds.WindowWidth = 7500, 15000  # the same window in the LUT's units
    expected = decode_radiograph(to_bytes(plain), min_side=92).pixels  # factor 369 // 92 = 4
    reduced = decode_radiograph(to_bytes(ds), min_side=92).pixels  # the LUT indexed by the rounded means
    assert reduced.shape == expected.shape == (98, 93)
    np.testing.assert_allclose(reduced, expected, atol=5e-4)  # rounding: at most 1 of 15000 LUT output units
