"""The display image (cxr.explain.display): the PNG encoder checked against Pillow's decoder, and the display made
from real DICOM files by the same decoding core as Analyze, as the explanation worker makes it."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest
from dicom_fixtures import DICOM, REPO, centre_minus_lungs, correlation, dataset, read_bytes, resized, to_bytes
from PIL import Image

from cxr.core.dicom_decode import decode_radiograph
from cxr.core.errors import CxrError
from cxr.explain.display import (
    display_decode_min_side,
    display_from_dicom,
    display_min_side,
    display_png,
    grey_png,
    shrink_to,
)

pytestmark = pytest.mark.unit


def png_pixels(blob: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(blob)) as image:
        assert (image.format, image.mode) == ("PNG", "L")
        return np.asarray(image)


# -- the PNG encoder ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 1), (33, 17), (256, 300)])
def test_the_display_png_decodes_to_exactly_the_pixels(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    grey = rng.integers(0, 256, size=shape, dtype=np.uint8)  # noise: every row difference wraps somewhere
    np.testing.assert_array_equal(png_pixels(grey_png(grey)), grey)


def test_the_display_is_shrunk_to_the_long_side_and_never_enlarged() -> None:
    ramp = np.linspace(0.0, 1.0, 300 * 200, dtype=np.float32).reshape(300, 200)
    shown = png_pixels(display_png(ramp, 150))
    assert shown.shape == (150, 100)
    assert shown[0, 0] <= 2 and shown[-1, -1] >= 253  # the grey range survives
    assert shrink_to(np.zeros((40, 60), np.uint8), 1024).shape == (40, 60)


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4), np.float32), np.zeros((4, 4, 3), np.uint8), np.zeros((0, 4), np.uint8)]
)
def test_the_png_encoder_refuses_what_is_not_a_greyscale_image(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        grey_png(bad)


# -- how much the decoder must deliver ---------------------------------------------------------------------------
def test_display_min_side_is_the_short_side_of_the_display() -> None:
    assert display_min_side(1955, 1841, 1024) == 965  # ceil(1841 * 1024 / 1955)
    assert display_min_side(1841, 1955, 1024) == 965
    assert display_min_side(1024, 1024, 256) == 256
    assert display_min_side(100, 80, 1024) == 80  # never more than the image has


def test_display_decode_min_side_halves_files_less_than_twice_the_display() -> None:
    assert display_decode_min_side(1955, 1841, 1024) == 920  # -> 2 x 2 means / one JPEG 2000 level: 978 x 921
    assert display_decode_min_side(1024, 1024, 256) == 256  # a 4x factor already: unchanged
    assert display_decode_min_side(1200, 1000, 1024) == 854  # half (500) would be too small: full resolution
    assert display_decode_min_side(100, 80, 1024) == 80  # smaller than the display: full resolution


@pytest.mark.parametrize("args", [(0, 10, 64), (10, 0, 64), (10, 10, 0)])
def test_display_min_side_refuses_non_positive_sizes(args: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        display_min_side(*args)


# -- from real DICOM files ---------------------------------------------------------------------------------------
def test_a_display_from_a_real_dicom_is_the_radiograph_at_the_overlay_size() -> None:
    shown = png_pixels(display_from_dicom(read_bytes("nih_no_finding_dx.dcm"), 256))
    assert shown.shape == (256, 256)
    full = decode_radiograph(read_bytes("nih_no_finding_dx.dcm")).pixels  # 1024 x 1024, read at 1/4 here
    expected = resized(full, 256, 256) * 255.0
    assert float(np.abs(shown - expected).mean()) < 1.0 and correlation(shown, expected) > 0.999
    assert centre_minus_lungs(shown / 255.0) > 0.1  # bright = dense, not inverted


def test_the_uncompressed_and_jpeg2000_copies_give_the_same_display_at_half_resolution() -> None:
    uncompressed = png_pixels(display_from_dicom(read_bytes("RG1_UNCR.dcm"), 1024))
    assert uncompressed.shape == (978, 921)  # 1955 x 1841 read at half resolution (2 x 2 block means), not resized
    j2k = png_pixels(display_from_dicom(read_bytes("RG1_J2KR.dcm"), 1024))  # one JPEG 2000 reduce level
    assert j2k.shape == uncompressed.shape
    diff = np.abs(j2k.astype(np.float64) - uncompressed)
    assert float(diff.mean()) < 1.5 and correlation(j2k, uncompressed) > 0.999
    assert centre_minus_lungs(uncompressed / 255.0) > 0.1  # MONOCHROME1 inverted
    full = decode_radiograph(read_bytes("RG1_UNCR.dcm")).pixels * 255.0  # the full-resolution decode, shrunk
    assert correlation(uncompressed, resized(full, 921, 978)) > 0.999


def test_a_lateral_view_admitted_by_ingestion_still_gets_its_display() -> None:
    ds = dataset("siim_pneumothorax_negative.dcm")
    ds.ViewPosition = "LL"  # ingestion refused it or, under CXR_LATERAL_POLICY=warn, analysed it
    assert png_pixels(display_from_dicom(to_bytes(ds), 128)).shape == (128, 128)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: b"\x00" * 300, "NOT_DICOM"),
        (lambda: read_bytes("cr_header_only_no_pixels.dcm"), "NO_PIXEL_DATA"),
        (lambda: read_bytes("siim_pneumothorax_negative.dcm")[:60_000], "TRUNCATED_DICOM"),
    ],
    ids=["garbage", "no-pixels", "truncated"],
)
def test_a_file_that_does_not_decode_raises_the_decoders_reason(make: Callable[[], bytes], reason: str) -> None:
    with pytest.raises(CxrError) as err:
        display_from_dicom(make(), 256)
    assert err.value.reason == reason


def test_the_display_and_the_job_schema_never_import_torch() -> None:
    code = (
        "import sys; from cxr.explain.display import display_from_dicom; import cxr.core.jobs; "
        "import services.ingestion.pipeline; "
        f"display_from_dicom(open({str(DICOM / 'RG1_UNCR.dcm')!r}, 'rb').read(), 128); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=REPO)
