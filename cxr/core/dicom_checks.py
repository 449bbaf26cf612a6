"""Header checks before any pixel is decoded: cheap, and they bound the work a hostile file can cause.

Each check raises the typed error of ``cxr.core.errors`` for its failure, with a message a PACS engineer can act
on (attribute names and tags, never patient data). numpy-free, torch-free.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from cxr.core.dicom_types import DecodePolicy, DicomIdentity
from cxr.core.errors import (
    InvalidInputError,
    LateralViewError,
    NoPixelDataError,
    TooLargeError,
    UnsupportedModalityError,
    UnsupportedPhotometricError,
    UnsupportedTransferSyntaxError,
)

GREYSCALE = ("MONOCHROME1", "MONOCHROME2")
# (0018,5101) View Position values that mean a lateral projection (PS3.3 C.8.11.5 defines LL and RL;
# the others are seen in the wild). Decubitus (LLD, RLD) films are frontal projections and pass.
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLAT", "RLAT", "LEFT LATERAL", "RIGHT LATERAL"})
_NATIVE_BYTES = {8: 1, 16: 2, 32: 4}


def check_modality(identity: DicomIdentity, policy: DecodePolicy) -> None:
    """Raises UnsupportedModalityError unless (0008,0060) Modality is one of ``policy.allowed_modalities``."""
    modality = identity.modality.strip().upper()
    if modality not in {m.upper() for m in policy.allowed_modalities}:
        shown = f"'{modality[:16]}'" if modality else "missing"
        raise UnsupportedModalityError(
            f"Modality (0008,0060) is {shown}; this service accepts {', '.join(policy.allowed_modalities)}"
        )


def check_photometric(identity: DicomIdentity, ds: Dataset) -> None:
    """Raises UnsupportedPhotometricError unless the image is one greyscale sample per pixel."""
    photometric = identity.photometric_interpretation.strip().upper()
    if photometric not in GREYSCALE:
        shown = f"'{photometric[:24]}'" if photometric else "missing"
        raise UnsupportedPhotometricError(
            f"Photometric Interpretation (0028,0004) is {shown}; only MONOCHROME1 / MONOCHROME2 radiographs are "
            "accepted (colour, YBR and palette images are not)"
        )
    samples = ds.get("SamplesPerPixel", 1)
    if samples != 1:
        raise UnsupportedPhotometricError(
            f"Samples per Pixel (0028,0002) is {samples}; a greyscale image has 1", reason="UNSUPPORTED_SAMPLES"
        )


def check_dimensions(identity: DicomIdentity, policy: DecodePolicy) -> None:
    """Raises InvalidInputError(reason="BAD_DIMENSIONS") for missing/zero Rows or Columns and TooLargeError
    when Rows x Columns exceeds ``policy.max_pixels``."""
    if identity.rows <= 0 or identity.columns <= 0:
        raise InvalidInputError(
            f"Rows (0028,0010) = {identity.rows} and Columns (0028,0011) = {identity.columns}: both must be > 0",
            reason="BAD_DIMENSIONS",
        )
    if identity.rows * identity.columns > policy.max_pixels:
        raise TooLargeError(
            f"image is {identity.columns} x {identity.rows} = {identity.rows * identity.columns} pixels; "
            f"the limit is {policy.max_pixels}"
        )


def check_view(identity: DicomIdentity, policy: DecodePolicy, notes: list[str]) -> None:
    """Lateral views: LateralViewError under policy "reject", a LATERAL_VIEW note under "warn"."""
    view = identity.view_position.strip().upper()
    if view not in LATERAL_VIEWS:
        if not view:
            notes.append("VIEW_UNKNOWN: View Position (0018,5101) is empty; assumed frontal")
        return
    message = f"View Position (0018,5101) is '{view}'; the models were trained on frontal (PA/AP) radiographs"
    if policy.lateral == "reject":
        raise LateralViewError(message)
    notes.append(f"LATERAL_VIEW: {message}; results are unreliable")


def check_pixel_module(ds: Dataset, ts: UID) -> int:
    """Check Pixel Data presence, bit depth and transfer syntax; return the number of frames.

    Raises NoPixelDataError, InvalidInputError (reasons BAD_BIT_DEPTH, BAD_FRAME_COUNT, PIXEL_DATA_SIZE_MISMATCH),
    UnsupportedTransferSyntaxError.
    """
    if "PixelData" not in ds:
        other = " (it has Float/Double Float Pixel Data, not used for radiographs)" if _has_float_pixels(ds) else ""
        raise NoPixelDataError(f"the file has no Pixel Data (7FE0,0010) element{other}")
    allocated, stored = int(ds.get("BitsAllocated", 0) or 0), int(ds.get("BitsStored", 0) or 0)
    if allocated not in _NATIVE_BYTES or not 1 <= stored <= allocated or ds.get("PixelRepresentation", 0) not in (0, 1):
        raise InvalidInputError(
            f"Bits Allocated {allocated} / Bits Stored {stored} / Pixel Representation "
            f"{ds.get('PixelRepresentation')} is not a valid greyscale radiograph layout",
            reason="BAD_BIT_DEPTH",
        )
    frames = _frame_count(ds)
    _check_transfer_syntax(ts)
    if not ts.is_compressed:
        _check_native_length(ds, frames, _NATIVE_BYTES[allocated])
    return frames


def _has_float_pixels(ds: Dataset) -> bool:
    return "FloatPixelData" in ds or "DoubleFloatPixelData" in ds


def _frame_count(ds: Dataset) -> int:
    """Number of Frames (0028,0008), 1 when absent. Raises InvalidInputError for 0, negative or non-numeric."""
    raw = ds.get("NumberOfFrames", 1)
    try:
        frames = int(raw if raw not in (None, "") else 1)
    except (TypeError, ValueError):
        frames = 0
    if frames < 1:
        raise InvalidInputError(f"Number of Frames (0028,0008) is {str(raw)[:16]!r}", reason="BAD_FRAME_COUNT")
    return frames


def _check_transfer_syntax(ts: UID) -> None:
    """Raises UnsupportedTransferSyntaxError when no installed pydicom plugin decodes ``ts``."""
    try:
        available = get_decoder(ts).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise UnsupportedTransferSyntaxError(
            f"no decoder available for Transfer Syntax UID (0002,0010) {str(ts)[:64]} ({ts.name[:64]})"
        )


def _check_native_length(ds: Dataset, frames: int, sample_bytes: int) -> None:
    """Uncompressed Pixel Data must hold Rows x Columns x frames samples (a shorter element was already reported
    as truncation if the file ended early; here the header itself is inconsistent)."""
    expected = int(ds.Rows) * int(ds.Columns) * frames * sample_bytes
    actual = len(ds.PixelData)
    if actual < expected:
        raise InvalidInputError(
            f"Pixel Data holds {actual} bytes but Rows x Columns x frames x {sample_bytes} bytes needs {expected}",
            reason="PIXEL_DATA_SIZE_MISMATCH",
        )
