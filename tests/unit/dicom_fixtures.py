"""Helpers for the DICOM decoding tests: paths to the real files in ../shared/data/dicom and variants of them
made with pydicom (or dcmtk's dcmcjpeg) in a temporary folder."""

from __future__ import annotations

import shutil
import subprocess
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileDataset

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
DICOM = DATA / "dicom"
PNG_DIR = DATA / "nih-cxr14-621" / "images_512"
RADIOGRAPHS = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "siim_pneumothorax_negative.dcm", "nih_no_finding_dx.dcm")


def read_bytes(name: str) -> bytes:
    """Bytes of one shared DICOM file."""
    return (DICOM / name).read_bytes()


def dataset(name: str) -> FileDataset:
    """A shared DICOM file parsed by pydicom, for editing."""
    return pydicom.dcmread(DICOM / name)


def to_bytes(ds: Dataset, **write_args: object) -> bytes:
    """Serialise ``ds`` as a Part 10 file (preamble + DICM + file meta) unless write_args say otherwise."""
    buf = BytesIO()
    args: dict = {"enforce_file_format": True, **write_args}
    ds.save_as(buf, **args)
    return buf.getvalue()


def small_rg1(step: int = 15) -> FileDataset:
    """RG1_UNCR (real CR, MONOCHROME1, 15 bits stored, window 15000/30000) subsampled by ``step``: 131 x 123 px
    at the default step; every header attribute but Rows/Columns kept."""
    ds = dataset("RG1_UNCR.dcm")
    return with_pixels(ds, np.ascontiguousarray(ds.pixel_array[::step, ::step]))


def with_pixels(ds: FileDataset, arr: np.ndarray) -> FileDataset:
    """Replace native pixel data (2-D, or 3-D for frames) and the matching Rows/Columns/Number of Frames."""
    ds.Rows, ds.Columns = int(arr.shape[-2]), int(arr.shape[-1])
    if arr.ndim == 3:
        ds.NumberOfFrames = arr.shape[0]
    ds.PixelData = arr.tobytes()
    return ds


def centre_minus_lungs(pixels: np.ndarray) -> float:
    """Mean of the central vertical band (mediastinum/spine) minus the mean of both lung bands, rows 30-65 %.
    Positive for a chest radiograph in MONOCHROME2 orientation (bright = dense)."""
    h, w = pixels.shape
    rows = slice(int(0.30 * h), int(0.65 * h))
    centre = pixels[rows, int(0.45 * w) : int(0.55 * w)].mean()
    lungs = (
        pixels[rows, int(0.20 * w) : int(0.30 * w)].mean() + pixels[rows, int(0.70 * w) : int(0.80 * w)].mean()
    ) / 2
    return float(centre - lungs)


def resized(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Antialiased resize of a float image to (height, width)."""
    img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
    return np.asarray(img.resize((width, height), Image.Resampling.BOX), dtype=np.float32)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two same-shape images."""
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def dcmcjpeg(data: bytes, tmp_path: Path, *flags: str) -> bytes:
    """Re-encode a DICOM file with dcmtk's dcmcjpeg (Debian package dcmtk), e.g. flags ("+e1",) for JPEG lossless
    SV1 or ("+ee",) for 12-bit JPEG extended. Raises AssertionError when dcmtk is not installed."""
    tool = shutil.which("dcmcjpeg")
    assert tool is not None, "dcmtk's dcmcjpeg is needed for the JPEG lossless tests (apt-get install dcmtk)"
    src, dst = tmp_path / "in.dcm", tmp_path / "out.dcm"
    src.write_bytes(data)
    subprocess.run([tool, *flags, str(src), str(dst)], check=True, capture_output=True, timeout=60)
    return dst.read_bytes()
