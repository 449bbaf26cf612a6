"""DICOM decoding (cxr.core.dicom_decode) on the real files of ../shared/data/dicom and variants made from them:
every file decodes to the right picture in the right orientation, or is rejected with its specific reason."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_fixtures import (
    DICOM,
    PNG_DIR,
    RADIOGRAPHS,
    centre_minus_lungs,
    correlation,
    dataset,
    dcmcjpeg,
    read_bytes,
    resized,
    small_rg1,
    to_bytes,
    with_pixels,
)
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.pixels import pixel_array
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from cxr.core import dicom_read
from cxr.core.dicom_codestream import parse_j2k_header
from cxr.core.dicom_decode import DecodedRadiograph, DecodePolicy, decode_radiograph, read_identity
from cxr.core.dicom_pixels import decode_j2k_reduced
from cxr.core.dicom_voi import apply_window
from cxr.core.errors import (
    CxrError,
    InvalidInputError,
    LateralViewError,
    NoPixelDataError,
    NotDicomError,
    TooLargeError,
    TruncatedDicomError,
    UnsupportedModalityError,
    UnsupportedPhotometricError,
    UnsupportedTransferSyntaxError,
)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def full() -> dict[str, DecodedRadiograph]:
    """Full-resolution decodes of the four real radiographs (the JPEG 2000 one takes ~0.5 s: decode once)."""
    return {name: decode_radiograph(read_bytes(name)) for name in RADIOGRAPHS}


@pytest.fixture(scope="module")
def small() -> np.ndarray:
    """Decode of the subsampled RG1 (131 x 123, 15-bit MONOCHROME1, window 15000/30000): the reference that
    every re-encoding below must reproduce."""
    return decode_radiograph(to_bytes(small_rg1())).pixels


def assert_valid(pixels: np.ndarray) -> None:
    assert pixels.ndim == 2 and pixels.dtype == np.float32
    assert np.isfinite(pixels).all() and pixels.min() >= 0.0 and pixels.max() <= 1.0


# --- the real files --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RADIOGRAPHS)
def test_real_radiographs_decode_in_range_and_bright_is_dense(full: dict[str, DecodedRadiograph], name: str) -> None:
    result = full[name]
    assert_valid(result.pixels)
    assert result.pixels.shape == (result.identity.rows, result.identity.columns) and result.scale == 1.0
    assert result.pixels.max() - result.pixels.min() > 0.5  # a real contrast range, not a flat image
    assert centre_minus_lungs(result.pixels) > 0.1  # mediastinum/spine brighter than the lung fields


def test_monochrome1_and_jpeg2000_copies_of_rg1_decode_to_the_same_picture(full: dict[str, DecodedRadiograph]) -> None:
    uncompressed, j2k = full["RG1_UNCR.dcm"].pixels, full["RG1_J2KR.dcm"].pixels
    assert np.array_equal(uncompressed, j2k)  # JPEG 2000 lossless: identical after the same VOI + inversion
    assert correlation(resized(uncompressed, 128, 128), resized(j2k, 128, 128)) > 0.999


def test_rg1_orientation_agrees_with_the_monochrome2_files(full: dict[str, DecodedRadiograph]) -> None:
    rg1 = resized(full["RG1_UNCR.dcm"].pixels, 64, 64)
    for other in ("nih_no_finding_dx.dcm", "siim_pneumothorax_negative.dcm"):
        ref = resized(full[other].pixels, 64, 64)
        assert correlation(rg1, ref) > 0.3 > correlation(1.0 - rg1, ref)


def test_8_bit_monochrome2_without_window_keeps_its_grey_levels(full: dict[str, DecodedRadiograph]) -> None:
    stored = dataset("nih_no_finding_dx.dcm").pixel_array
    np.testing.assert_allclose(full["nih_no_finding_dx.dcm"].pixels, stored / 255.0, atol=1e-6)


def test_reduced_jpeg2000_decode_matches_full_decode_downsampled(full: dict[str, DecodedRadiograph]) -> None:
    reduced = decode_radiograph(read_bytes("RG1_J2KR.dcm"), min_side=256)
    full_px = full["RG1_J2KR.dcm"].pixels
    h, w = reduced.pixels.shape
    assert_valid(reduced.pixels)
    assert min(h, w) >= 256 and min(h, w) / 2 < 256  # the largest reduction that still satisfies min_side
    assert reduced.scale == pytest.approx(h / full_px.shape[0]) == pytest.approx(0.25, abs=0.001)
    expected = resized(full_px, w, h)
    assert correlation(reduced.pixels, expected) > 0.995
    assert float(np.abs(reduced.pixels - expected).mean()) < 0.01
    assert centre_minus_lungs(reduced.pixels) > 0.1


@pytest.mark.parametrize("min_side", [224, 512, 921, 1841, 5000])
def test_min_side_picks_the_largest_jpeg2000_reduction_that_is_big_enough(min_side: int) -> None:
    result = decode_radiograph(read_bytes("RG1_J2KR.dcm"), min_side=min_side)
    short = min(result.pixels.shape)
    assert short >= min(min_side, 1841)
    assert short == 1841 or short / 2 < min_side


def test_min_side_reduces_other_transfer_syntaxes_by_whole_factors() -> None:
    result = decode_radiograph(read_bytes("siim_pneumothorax_negative.dcm"), min_side=224)
    assert result.pixels.shape == (256, 256) and result.scale == 0.25  # 1024 // 224 = 4 (test_dicom_downsample)
    assert decode_radiograph(read_bytes("siim_pneumothorax_negative.dcm"), min_side=600).pixels.shape == (1024, 1024)


def test_reduced_jpeg2000_decoder_at_level_0_equals_pydicom() -> None:
    ds = dataset("RG1_J2KR.dcm")
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    header = parse_j2k_header(frame)
    assert header is not None and (header.height, header.width, header.precision) == (1955, 1841, 15)
    assert np.array_equal(decode_j2k_reduced(frame, header, 0), pixel_array(ds))


def test_reduced_jpeg2000_restores_signed_samples() -> None:
    ds = _signed(small_rg1(step=5))  # 391 x 369, int16
    stored = ds.pixel_array
    ds.compress(JPEG2000Lossless)
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    header = parse_j2k_header(frame)
    assert header is not None and header.signed
    assert np.array_equal(decode_j2k_reduced(frame, header, 0), stored)
    half = decode_j2k_reduced(frame, header, 1)
    assert half.shape == (196, 185) and half.min() < 0
    assert correlation(half.astype(np.float32), resized(stored.astype(np.float32), 185, 196)) > 0.99


def test_read_identity_reads_the_header_only() -> None:
    identity = read_identity(read_bytes("RG1_UNCR.dcm"))
    assert (identity.modality, identity.view_position, identity.photometric_interpretation) == (
        "CR",
        "PA",
        "MONOCHROME1",
    )
    assert (identity.rows, identity.columns, identity.bits_stored) == (1955, 1841, 15)
    assert identity.transfer_syntax_uid == "1.2.840.10008.1.2.1" and identity.sop_instance_uid.startswith("1.3.6.")
    header_only = read_identity(read_bytes("cr_header_only_no_pixels.dcm"))
    assert header_only.modality == "CR" and header_only.rows == 32
    data = read_bytes("RG1_UNCR.dcm")
    assert read_identity(data[: len(data) // 2]).sop_instance_uid == identity.sop_instance_uid  # pixels not read


# --- re-encodings and header variants of a real image ----------------------------------------------------------


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_lossless_re_encodings_decode_equal_to_the_original(small: np.ndarray, syntax: str) -> None:
    ds = small_rg1()
    ds.compress(syntax)
    result = decode_radiograph(to_bytes(ds))
    assert result.identity.transfer_syntax_uid == syntax
    assert np.array_equal(result.pixels, small)


@pytest.mark.parametrize("flag", ["+e1", "+el"])  # JPEG lossless SV1 (.70) and process 14 (.57): pylibjpeg-libjpeg
def test_jpeg_lossless_decodes_equal_to_the_original(small: np.ndarray, tmp_path: Path, flag: str) -> None:
    data = dcmcjpeg(to_bytes(small_rg1()), tmp_path, flag)
    result = decode_radiograph(data)
    assert result.identity.transfer_syntax_uid in ("1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.57")
    assert np.array_equal(result.pixels, small)


def test_12_bit_jpeg_extended_decodes_close_to_the_original(tmp_path: Path) -> None:
    ds = small_rg1(step=5)
    ds = with_pixels(ds, (ds.pixel_array >> 3).astype(np.uint16))  # 15 -> 12 bits stored
    ds.BitsStored, ds.HighBit, ds.WindowCenter, ds.WindowWidth = 12, 11, 1875, 3750
    original = decode_radiograph(to_bytes(ds)).pixels
    result = decode_radiograph(dcmcjpeg(to_bytes(ds), tmp_path, "+ee"))  # lossy, 12-bit: pylibjpeg-libjpeg
    assert result.identity.transfer_syntax_uid == "1.2.840.10008.1.2.4.51"
    assert correlation(result.pixels, original) > 0.99 and float(np.abs(result.pixels - original).mean()) < 0.01


def test_deflated_implicit_big_endian_and_raw_datasets_decode_equal(small: np.ndarray) -> None:
    variants = []
    for syntax in (DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds = small_rg1()
        ds.file_meta.TransferSyntaxUID = syntax
        variants.append(to_bytes(ds))
    ds = small_rg1()
    ds.PixelData, ds.file_meta.TransferSyntaxUID = ds.pixel_array.byteswap().tobytes(), ExplicitVRBigEndian
    variants.append(_write(ds, implicit_vr=False, little_endian=False, force_encoding=True))
    ds = small_rg1()
    ds.preamble, ds.file_meta = None, FileMetaDataset()  # no preamble, no DICM, no file meta (old exports)
    variants.append(_write(ds, implicit_vr=True, little_endian=True))
    for data in variants:
        assert np.array_equal(decode_radiograph(data).pixels, small)


def test_signed_pixels_decode_equal_to_unsigned(small: np.ndarray) -> None:
    shifted_window = _signed(small_rg1())
    shifted_window.WindowCenter = 15000 - 16384
    with_rescale = _signed(small_rg1())
    with_rescale.RescaleSlope, with_rescale.RescaleIntercept, with_rescale.RescaleType = 1, 16384, "US"
    for ds in (shifted_window, with_rescale):
        np.testing.assert_allclose(decode_radiograph(to_bytes(ds)).pixels, small, atol=1e-6)


def test_bits_above_bits_stored_are_ignored(small: np.ndarray) -> None:
    ds = small_rg1()
    arr = ds.pixel_array.copy()
    arr[::2, ::3] |= 0x8000  # bit 15 of a 15-bit image: retired overlay plane
    assert np.array_equal(decode_radiograph(to_bytes(with_pixels(ds, arr))).pixels, small)


def test_monochrome2_label_gives_the_inverted_picture(small: np.ndarray) -> None:
    ds = small_rg1()
    ds.PhotometricInterpretation = "MONOCHROME2"
    np.testing.assert_allclose(decode_radiograph(to_bytes(ds)).pixels, 1.0 - small, atol=1e-6)


def test_rescale_is_applied_before_the_window(small: np.ndarray) -> None:
    ds = small_rg1()
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 2, -100, "US"
    ds.WindowCenter, ds.WindowWidth = 2 * (15000 - 0.5) - 100 + 0.5, 2 * (30000 - 1) + 1  # same window, new units
    np.testing.assert_allclose(decode_radiograph(to_bytes(ds)).pixels, small, atol=1e-4)


def test_voi_lut_sequence_is_preferred_to_the_window(small: np.ndarray) -> None:
    ds = small_rg1()
    table = np.rint(apply_window(np.arange(32768, dtype=np.float32), 15000, 30000, "LINEAR") * 65535)
    item = pydicom.Dataset()
    item.add_new(0x00283002, "US", [32768, 0, 16])  # LUT Descriptor: entries, first mapped value, bits
    item.add_new(0x00283006, "OW", table.astype("<u2").tobytes())  # LUT Data
    ds.VOILUTSequence = [item]
    ds.WindowCenter, ds.WindowWidth = 100, 10  # would give an almost black/white image if it were used
    np.testing.assert_allclose(decode_radiograph(to_bytes(ds)).pixels, small, atol=2e-5)


def test_missing_window_falls_back_to_percentiles_with_a_warning() -> None:
    ds = small_rg1()
    del ds.WindowCenter, ds.WindowWidth
    result = decode_radiograph(to_bytes(ds))
    assert any(w.startswith("NO_VOI") for w in result.warnings)
    assert result.pixels.min() == 0.0 and result.pixels.max() == 1.0  # stretched between the percentiles
    assert centre_minus_lungs(resized(result.pixels, 123, 131)) > 0.1


def test_unusable_window_falls_back_with_a_warning() -> None:
    ds = small_rg1()
    ds.WindowWidth = 0
    result = decode_radiograph(to_bytes(ds))
    assert any(w.startswith("BAD_WINDOW") for w in result.warnings) and any("NO_VOI" in w for w in result.warnings)
    assert_valid(result.pixels)


def test_window_functions_follow_the_standard() -> None:
    x = np.array([0.0, 1.0, 2047.5, 2048.0, 4096.0], dtype=np.float32)  # window center 2048, width 4096
    linear = apply_window(x, 2048, 4096, "LINEAR")  # PS3.3 C.11.2.1.2.1: 0 at x <= c - 0.5 - (w - 1) / 2
    assert linear[0] == 0.0 and linear[1] == pytest.approx(1 / 4095) and linear[2] == 0.5 and linear[4] == 1.0
    exact = apply_window(x, 2048, 4096, "LINEAR_EXACT")  # C.11.2.1.3.2: (x - c) / w + 0.5
    assert exact[0] == 0.0 and exact[1] == pytest.approx(1 / 4096) and exact[3] == 0.5 and exact[4] == 1.0
    sigmoid = apply_window(x, 2048, 4096, "SIGMOID")  # C.11.2.1.3.1: 1 / (1 + exp(-4 (x - c) / w))
    assert sigmoid[3] == pytest.approx(0.5) and sigmoid[0] == pytest.approx(1 / (1 + np.exp(2.0)))
    assert np.all(np.diff(sigmoid) > 0)
    assert list(apply_window(np.array([9.0, 10.0], np.float32), 10, 1, "LINEAR")) == [0.0, 1.0]  # a threshold


def test_sigmoid_voi_function_is_used() -> None:
    ds = small_rg1()
    ds.VOILUTFunction = "SIGMOID"
    result = decode_radiograph(to_bytes(ds))
    expected = 1.0 - apply_window(ds.pixel_array.astype(np.float32), 15000, 30000, "SIGMOID")
    np.testing.assert_allclose(result.pixels, expected, atol=1e-6)


def test_multi_frame_decodes_the_first_frame_with_a_warning(small: np.ndarray) -> None:
    ds = small_rg1()
    first = ds.pixel_array
    result = decode_radiograph(to_bytes(with_pixels(ds, np.stack([first, 32767 - first]))))
    assert np.array_equal(result.pixels, small)
    assert any(w.startswith("MULTI_FRAME") for w in result.warnings)


def test_missing_view_position_is_a_warning(full: dict[str, DecodedRadiograph]) -> None:
    assert any(w.startswith("VIEW_UNKNOWN") for w in full["nih_no_finding_dx.dcm"].warnings)
    assert full["RG1_UNCR.dcm"].warnings == ()


# --- rejections ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 10, 131, 200, 5000])
def test_random_bytes_are_not_dicom(size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    for call in (read_identity, decode_radiograph):
        with pytest.raises(NotDicomError) as err:
            call(data)
        assert err.value.reason == "NOT_DICOM"


def test_a_png_is_not_dicom() -> None:
    png = next(iter(sorted(PNG_DIR.glob("*.png")))).read_bytes()
    with pytest.raises(NotDicomError):
        decode_radiograph(png)


@pytest.mark.parametrize(
    ("name", "cut"),
    [
        ("RG1_UNCR.dcm", 200),  # inside the file meta information
        ("RG1_UNCR.dcm", 1001),  # inside the dataset header
        ("RG1_UNCR.dcm", 3_600_000),  # inside native pixel data
        ("RG1_UNCR.dcm", -1),  # one byte short
        ("RG1_J2KR.dcm", 2_000_000),  # inside encapsulated JPEG 2000 (pydicom alone would drop Pixel Data)
        ("RG1_J2KR.dcm", -3),  # inside the sequence delimiter
        ("siim_pneumothorax_negative.dcm", 60_000),
        ("nih_no_finding_dx.dcm", 797),  # inside the Pixel Data element header
    ],
)
def test_truncated_files_are_reported_as_truncated(name: str, cut: int) -> None:
    data = read_bytes(name)
    with pytest.raises(TruncatedDicomError) as err:
        decode_radiograph(data[:cut])
    assert err.value.reason == "TRUNCATED_DICOM"


def test_a_file_cut_before_the_dicm_prefix_is_not_dicom() -> None:
    with pytest.raises(NotDicomError):
        decode_radiograph(read_bytes("RG1_UNCR.dcm")[:100])


def test_a_truncated_header_is_reported_by_read_identity() -> None:
    with pytest.raises(TruncatedDicomError):
        read_identity(read_bytes("RG1_UNCR.dcm")[:1001])


def test_header_only_file_has_no_pixel_data() -> None:
    with pytest.raises(NoPixelDataError) as err:
        decode_radiograph(read_bytes("cr_header_only_no_pixels.dcm"))
    assert err.value.reason == "NO_PIXEL_DATA" and "7FE0,0010" in str(err.value)


@pytest.mark.parametrize("modality", ["CT", "MR", None])
def test_other_modalities_are_unsupported(modality: str | None) -> None:
    ds = small_rg1()
    if modality is None:
        del ds.Modality
    else:
        ds.Modality = modality
    with pytest.raises(UnsupportedModalityError):
        decode_radiograph(to_bytes(ds))
    assert decode_radiograph(to_bytes(ds), policy=DecodePolicy(allowed_modalities=("CT", "MR", ""))) is not None


def test_rgb_with_matching_pixel_data_is_unsupported() -> None:
    ds = small_rg1()
    rgb = np.repeat((ds.pixel_array >> 7).astype(np.uint8)[:, :, None], 3, axis=2)
    ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration = "RGB", 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = rgb.tobytes()
    with pytest.raises(UnsupportedPhotometricError) as err:
        decode_radiograph(to_bytes(ds))
    assert "RGB" in str(err.value)


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR", ""])
def test_colour_labels_on_greyscale_data_are_unsupported(photometric: str) -> None:
    ds = small_rg1()
    ds.PhotometricInterpretation = photometric
    with pytest.raises(UnsupportedPhotometricError):
        decode_radiograph(to_bytes(ds))


def test_three_samples_per_pixel_under_a_monochrome_label_is_unsupported() -> None:
    ds = small_rg1()
    ds.SamplesPerPixel = 3
    with pytest.raises(UnsupportedPhotometricError) as err:
        decode_radiograph(to_bytes(ds))
    assert err.value.reason == "UNSUPPORTED_SAMPLES"


@pytest.mark.parametrize("view", ["LL", "RL", "LATERAL"])
def test_lateral_views_are_rejected_or_flagged_by_policy(small: np.ndarray, view: str) -> None:
    ds = small_rg1()
    ds.ViewPosition = view
    data = to_bytes(ds)
    with pytest.raises(LateralViewError):
        decode_radiograph(data)
    warned = decode_radiograph(data, policy=DecodePolicy(lateral="warn"))
    assert np.array_equal(warned.pixels, small) and any(w.startswith("LATERAL_VIEW") for w in warned.warnings)


def test_images_over_the_pixel_cap_are_too_large() -> None:
    with pytest.raises(TooLargeError):
        decode_radiograph(read_bytes("RG1_UNCR.dcm"), policy=DecodePolicy(max_pixels=1_000_000))
    ds = small_rg1()
    ds.Rows, ds.Columns = 60000, 60000  # a header bomb: refused before any pixel is touched
    with pytest.raises(TooLargeError):
        decode_radiograph(to_bytes(ds))


@pytest.mark.parametrize(("attribute", "value"), [("Rows", 0), ("Columns", 0)])
def test_zero_dimensions_are_invalid(attribute: str, value: int) -> None:
    ds = small_rg1()
    setattr(ds, attribute, value)
    with pytest.raises(InvalidInputError) as err:
        decode_radiograph(to_bytes(ds))
    assert err.value.reason == "BAD_DIMENSIONS"


@pytest.mark.parametrize(
    ("attribute", "value"), [("BitsStored", 17), ("BitsAllocated", 12), ("PixelRepresentation", 2)]
)
def test_impossible_bit_layouts_are_invalid(attribute: str, value: int) -> None:
    ds = small_rg1()
    setattr(ds, attribute, value)
    with pytest.raises(InvalidInputError) as err:
        decode_radiograph(to_bytes(ds))
    assert err.value.reason == "BAD_BIT_DEPTH"


def test_pixel_data_shorter_than_rows_times_columns_is_invalid() -> None:
    ds = small_rg1()
    ds.Rows = ds.Rows * 2
    with pytest.raises(InvalidInputError) as err:
        decode_radiograph(to_bytes(ds))
    assert err.value.reason == "PIXEL_DATA_SIZE_MISMATCH"


def test_zero_frames_is_invalid() -> None:
    ds = small_rg1()
    ds.NumberOfFrames = 0
    with pytest.raises(InvalidInputError) as err:
        decode_radiograph(to_bytes(ds))
    assert err.value.reason == "BAD_FRAME_COUNT"


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.2.4.100", "1.2.826.0.1.3680043.99.1"])  # MPEG-2, a private one
def test_transfer_syntaxes_without_decoder_are_unsupported(uid: str) -> None:
    ds = small_rg1()
    ds.compress(RLELossless)  # encapsulated, so the file can claim any compressed syntax
    ds.file_meta.TransferSyntaxUID = UID(uid)
    with pytest.raises(UnsupportedTransferSyntaxError):
        decode_radiograph(to_bytes(ds))


def test_a_codestream_larger_than_the_header_says_is_refused_before_decoding() -> None:
    ds = small_rg1()
    ds.compress(JPEGLSLossless)
    frame = bytearray(get_frame(ds.PixelData, 0, number_of_frames=1))
    assert frame[2:4] == b"\xff\xf7"  # SOF55: P(1) Y(2) X(2) from byte 6
    frame[7:11] = (27538).to_bytes(2, "big") + (56341).to_bytes(2, "big")
    ds.PixelData = encapsulate([bytes(frame)])
    with pytest.raises(InvalidInputError) as err:
        decode_radiograph(to_bytes(ds))
    assert err.value.reason == "CORRUPT_PIXEL_DATA" and "56341 x 27538" in str(err.value)


def test_a_broken_jpeg_stream_is_corrupt_pixel_data() -> None:
    ds = dataset("siim_pneumothorax_negative.dcm")
    frame = bytearray(get_frame(ds.PixelData, 0, number_of_frames=1))
    dqt = frame.find(b"\xff\xdb")
    frame[dqt + 4] = 0x55  # quantisation table precision/class nibble: must be 0 or 1
    ds.PixelData = encapsulate([bytes(frame)])
    with pytest.raises(InvalidInputError) as err:
        decode_radiograph(to_bytes(ds))
    assert err.value.reason == "CORRUPT_PIXEL_DATA"


def test_a_jpeg_stream_cut_inside_intact_encapsulation_decodes_with_a_warning() -> None:
    ds = dataset("siim_pneumothorax_negative.dcm")
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = encapsulate([frame[: len(frame) // 2]])  # the decoder fills the rest with grey
    result = decode_radiograph(to_bytes(ds))
    assert_valid(result.pixels)
    assert any(w.startswith("INCOMPLETE_CODESTREAM") for w in result.warnings)


def test_missing_sop_instance_uid_is_invalid() -> None:
    ds = small_rg1()
    del ds.SOPInstanceUID
    data = to_bytes(ds, enforce_file_format=False)
    for call in (read_identity, decode_radiograph):
        with pytest.raises(InvalidInputError) as err:
            call(data)
        assert err.value.reason == "MISSING_SOP_INSTANCE_UID"


def test_caller_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="min_side"):
        decode_radiograph(read_bytes("nih_no_finding_dx.dcm"), min_side=0)
    with pytest.raises(ValueError, match="lateral"):
        DecodePolicy(lateral="ignore")
    with pytest.raises(ValueError, match="max_pixels"):
        DecodePolicy(max_pixels=0)


@pytest.mark.parametrize("seed", range(3))
def test_mutated_files_never_escape_as_untyped_errors(seed: int) -> None:
    """Random byte edits, deletions and insertions in real-derived files (header-heavy): every outcome is a
    valid image or a CxrError, never another exception type."""
    bases = [to_bytes(small_rg1())]
    for syntax in (JPEG2000Lossless, JPEGLSLossless, RLELossless):
        ds = small_rg1()
        ds.compress(syntax)
        bases.append(to_bytes(ds))
    rng = np.random.default_rng(seed)
    outcomes: set[str] = set()
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about each odd value it meets
            for base in bases:
                for _ in range(60):
                    outcomes.add(_decode_outcome(_mutate(base, rng)))
    finally:
        logging.disable(logging.NOTSET)
    assert "ok" in outcomes and len(outcomes) >= 4  # the mutations reach both success and several rejections


def test_deeper_than_16_bit_jpeg2000_is_decoded_at_full_resolution() -> None:
    ds = small_rg1(step=5)
    ds = with_pixels(ds, ds.pixel_array.astype(np.uint32) * 4)  # 17 bits stored in 32-bit words
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.WindowCenter, ds.WindowWidth = 32, 17, 16, 60000, 120000
    reference = decode_radiograph(to_bytes(ds), min_side=64)  # native: full decode, then 5 x 5 block means
    ds.compress(JPEG2000Lossless)
    result = decode_radiograph(to_bytes(ds), min_side=64)  # Pillow would squeeze 17 bits into 16: not used
    assert result.scale == reference.scale and np.array_equal(result.pixels, reference.pixels)
    assert result.pixels.shape == (79, 74)


def test_a_failed_reduced_jpeg2000_decode_falls_back_and_reports_corruption(caplog: pytest.LogCaptureFixture) -> None:
    ds = small_rg1(step=5)
    ds.compress(JPEG2000Lossless)
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    sod = frame.find(b"\xff\x93")
    ds.PixelData = encapsulate([frame[: sod + 2] + bytes(len(frame) - sod - 4) + frame[-2:]])  # tile data zeroed
    with caplog.at_level(logging.WARNING, logger="cxr.core.dicom_pixels"), pytest.raises(InvalidInputError) as err:
        decode_radiograph(to_bytes(ds), min_side=64)
    assert err.value.reason == "CORRUPT_PIXEL_DATA"
    assert any("decoding at full resolution" in r.getMessage() for r in caplog.records)


def test_a_frame_without_codestream_header_is_corrupt() -> None:
    ds = small_rg1()
    ds.compress(JPEGLSLossless)
    ds.PixelData = encapsulate([np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()])
    with pytest.raises(InvalidInputError) as err:
        decode_radiograph(to_bytes(ds))
    assert err.value.reason == "CORRUPT_PIXEL_DATA" and "no frame header" in str(err.value)


def test_an_unusable_modality_lut_is_bad_lut() -> None:
    ds = small_rg1()
    item = pydicom.Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 12])  # 12 bits per entry: not a valid Modality LUT entry size
    item.add_new(0x00283006, "OW", np.arange(4096, dtype="<u2").tobytes())
    ds.ModalityLUTSequence = [item]
    with pytest.raises(InvalidInputError) as err:
        decode_radiograph(to_bytes(ds))
    assert err.value.reason == "BAD_LUT"


def test_an_unusable_voi_lut_falls_back_to_the_window(small: np.ndarray) -> None:
    ds = small_rg1()
    item = pydicom.Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 9])  # 9 bits per entry: PS3.3 allows 8 or 10-16
    item.add_new(0x00283006, "OW", np.arange(4096, dtype="<u2").tobytes())
    ds.VOILUTSequence = [item]
    result = decode_radiograph(to_bytes(ds))
    assert np.array_equal(result.pixels, small) and any(w.startswith("BAD_VOI_LUT") for w in result.warnings)


def test_an_unknown_voi_function_is_treated_as_linear(small: np.ndarray) -> None:
    ds = small_rg1()
    ds.VOILUTFunction = "GAMMA"
    result = decode_radiograph(to_bytes(ds))
    assert np.array_equal(result.pixels, small) and any("GAMMA" in w for w in result.warnings)


def test_a_non_numeric_window_falls_back_with_a_warning() -> None:
    data = bytearray(to_bytes(small_rg1()))
    at = data.find(b"\x28\x00\x50\x10DS")  # (0028,1050) Window Center, explicit VR little endian
    length = int.from_bytes(data[at + 6 : at + 8], "little")
    data[at + 8 : at + 8 + length] = b"abc".ljust(length)
    result = decode_radiograph(bytes(data))
    assert any(w.startswith("BAD_WINDOW") for w in result.warnings) and any("NO_VOI" in w for w in result.warnings)
    assert_valid(result.pixels)


def test_a_constant_image_without_window_is_flagged() -> None:
    ds = small_rg1()
    del ds.WindowCenter, ds.WindowWidth
    result = decode_radiograph(to_bytes(with_pixels(ds, np.full((40, 30), 1000, dtype=np.uint16))))
    assert any(w.startswith("CONSTANT_IMAGE") for w in result.warnings) and result.pixels.shape == (40, 30)
    assert_valid(result.pixels)


def test_a_wrong_value_representation_is_malformed() -> None:
    data = bytearray(to_bytes(small_rg1()))
    at = data.find(b"\x28\x00\x10\x00US")  # (0028,0010) Rows
    data[at + 4 : at + 6] = b"KS"  # not a VR
    with pytest.raises(InvalidInputError) as err:
        decode_radiograph(bytes(data))
    assert err.value.reason == "MALFORMED_DICOM" and "(0028,0010)" in str(err.value)


def test_a_file_that_ends_after_its_file_meta_is_truncated() -> None:
    data = read_bytes("RG1_UNCR.dcm")
    meta_end = 144 + int.from_bytes(data[140:144], "little")  # 132 + the 12-byte (0002,0000) + its value
    with pytest.raises(TruncatedDicomError, match="file meta"):
        decode_radiograph(data[:meta_end])


def test_a_truncated_deflated_file_is_truncated() -> None:
    ds = small_rg1()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    data = to_bytes(ds)
    with pytest.raises(TruncatedDicomError, match="deflated"):
        decode_radiograph(data[: len(data) - 100])


def test_a_deflated_dataset_inflating_past_the_cap_is_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = small_rg1()  # inflates to ~33 kB; the real cap is 256 MiB, lowered here to keep the test small
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    monkeypatch.setattr(dicom_read, "MAX_INFLATED_BYTES", 10_000)
    with pytest.raises(TooLargeError, match="inflates"):
        decode_radiograph(to_bytes(ds))


def test_decoding_never_imports_torch() -> None:
    code = (
        "import sys; from cxr.core.dicom_decode import decode_radiograph; "
        f"decode_radiograph(open({str(DICOM / 'RG1_J2KR.dcm')!r}, 'rb').read(), min_side=224); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- helpers ---------------------------------------------------------------------------------------------------


def _signed(ds: pydicom.FileDataset) -> pydicom.FileDataset:
    """The same picture stored as signed 15-bit values (stored - 16384), PixelRepresentation 1."""
    ds = with_pixels(ds, (ds.pixel_array.astype(np.int32) - 16384).astype(np.int16))
    ds.PixelRepresentation = 1
    return ds


def _write(ds: pydicom.FileDataset, **args: object) -> bytes:
    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, **args)  # type: ignore[arg-type]
    return buf.getvalue()


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 6))):
        pos = int(rng.integers(128, min(len(out), 1700) if rng.random() < 0.7 else len(out)))
        kind = rng.random()
        if kind < 0.6:
            out[pos] = int(rng.integers(0, 256))
        elif kind < 0.8:
            del out[pos : pos + int(rng.integers(1, 9))]
        else:
            out[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
    return bytes(out)


def _decode_outcome(data: bytes) -> str:
    try:
        result = decode_radiograph(data, min_side=32)
    except CxrError as exc:
        return exc.reason
    assert_valid(result.pixels)
    return "ok"
