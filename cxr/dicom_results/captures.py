"""Secondary Capture images (highdicom ``SCImage``) of rendered panels, in the source image's study and in a new
series. RGB, 8 bits; uncompressed (Explicit VR Little Endian: every PACS accepts it) or JPEG 2000 lossless
(``compress=True``, about 4x smaller, YBR_RCT)."""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

_BIPED = {"A", "P", "R", "L", "H", "F"}


@dataclass(frozen=True)
class CaptureIds:
    """Where one SC goes: its series and instance UIDs and numbers."""

    series_uid: str
    series_number: int
    sop_uid: str
    instance_number: int


def build_capture(
    source: Dataset,
    rgb: np.ndarray,
    ids: CaptureIds,
    *,
    manufacturer: str,
    series_description: str,
    comment: str,
    compress: bool = False,
) -> hd.sc.SCImage:
    """An (H, W, 3) uint8 panel -> a Secondary Capture image of the source's patient and study.

    Patient Orientation and Laterality are the source's (both halves of a panel and every summary tile keep the
    radiograph's orientation); empty when the source has none. The SC references the source image (Source Image
    Sequence). Raises ValueError for a non-RGB-uint8 array."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.dtype} {rgb.shape}")
    orientation = _orientation(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        source, np.ascontiguousarray(rgb), "YBR_RCT" if compress else "RGB", 8, "PATIENT",
        ids.series_uid, ids.series_number, ids.sop_uid, ids.instance_number, manufacturer,
        patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid=JPEG2000Lossless if compress else ExplicitVRLittleEndian,
    )  # fmt: skip
    if orientation is None:
        sc.PatientOrientation = []  # unknown: Type 2, so present and empty rather than made up
    sc.Laterality = str(source.get("Laterality", "") or "")
    sc.SeriesDescription = series_description[:64]
    sc.ImageComments = _ascii(comment)[:10240]
    sc.BurnedInAnnotation = "NO"  # the burned-in text names labels and models, never the patient
    sc.SourceImageSequence = [_reference(source)]
    return sc


def _orientation(source: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation when it is two biped directions (e.g. L\\F), else None."""
    values = [str(v) for v in (source.get("PatientOrientation") or [])]
    if len(values) == 2 and all(v and set(v) <= _BIPED for v in values):
        return values[0], values[1]
    return None


def _ascii(text: str) -> str:
    """Text for an attribute in the default character set: dashes become '-', anything else non-ASCII '?'."""
    return text.translate({0x2014: "-", 0x2013: "-"}).encode("ascii", "replace").decode("ascii")


def _reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item
