"""Value types of DICOM decoding; import them from ``cxr.core.dicom_decode``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LATERAL_POLICIES = ("reject", "warn")


@dataclass(frozen=True)
class DicomIdentity:
    """Header facts about one SOP instance. UIDs are identifiers: hash them before logging or keying."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    modality: str
    view_position: str
    photometric_interpretation: str
    transfer_syntax_uid: str
    rows: int
    columns: int
    bits_stored: int


@dataclass(frozen=True)
class DecodePolicy:
    """What a deployment accepts. ``lateral``: "reject" -> LateralViewError, "warn" -> a warning in the result.
    Raises ValueError on construction with an unknown ``lateral`` or a non-positive ``max_pixels``."""

    allowed_modalities: tuple[str, ...] = ("CR", "DX")
    lateral: str = "reject"
    max_pixels: int = 100_000_000  # rows * columns cap

    def __post_init__(self) -> None:
        if self.lateral not in LATERAL_POLICIES:
            raise ValueError(f"lateral must be one of {LATERAL_POLICIES}, got {self.lateral!r}")
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")


@dataclass(frozen=True)
class DecodedRadiograph:
    """A decoded radiograph.

    ``pixels``: 2-D float32 in [0, 1], MONOCHROME2 orientation (bright = dense), VOI applied.
    ``scale``: decoded rows / original rows (1.0 at full resolution, ~0.5 at JPEG 2000 reduce level 1).
    ``warnings``: "CODE: text" strings for everything a reader of the result should know (fallbacks taken,
    first frame of a multi-frame object, lateral view under the "warn" policy, ...).
    """

    identity: DicomIdentity
    pixels: np.ndarray
    scale: float
    warnings: tuple[str, ...]
