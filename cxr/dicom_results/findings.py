"""The inputs of the result builder, checked: the source image's header and the findings document (the TorchServe
handler's JSON answer, docs/ARCHITECTURE.md "Wire format"). pydicom only."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from cxr.core.errors import InvalidInputError

_AGE = re.compile(r"^\d{3}[DWMY]$")
REQUIRED_SOURCE_ATTRIBUTES = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


@dataclass(frozen=True)
class ModelIdentity:
    """The ensemble that made the findings."""

    name: str
    version: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class ResultFinding:
    """One label's answer, as the SR lists it."""

    label: str
    probability: float
    model_probabilities: dict[str, float]
    votes: int
    n_models: int
    threshold: float
    positive: bool


def source_header(data: bytes) -> Dataset:
    """DICOM Part 10 bytes -> the dataset without its pixel data (all a result needs of its source).

    Raises InvalidInputError (NOT_DICOM) for bytes that are not DICOM, and BAD_SOURCE_DICOM when the dataset
    lacks one of ``REQUIRED_SOURCE_ATTRIBUTES``."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError) as e:
        raise InvalidInputError(f"the source is not a readable DICOM file: {e}", reason="NOT_DICOM") from e
    check_source(ds)
    return ds


def check_source(source: Dataset) -> None:
    """Raise InvalidInputError (BAD_SOURCE_DICOM) unless ``source`` names its study, series, instance and SOP
    class (a result must reference them)."""
    missing = [name for name in REQUIRED_SOURCE_ATTRIBUTES if not str(source.get(name, "") or "").strip()]
    if missing:
        raise InvalidInputError(f"the source image has no {', '.join(missing)}", reason="BAD_SOURCE_DICOM")


def read_findings_document(document: Mapping[str, Any]) -> tuple[ModelIdentity, list[ResultFinding]]:
    """The handler's answer -> (model, findings in its order).

    Raises InvalidInputError (BAD_FINDINGS) for a document without a model name and version, without findings,
    or with a finding that lacks a field or has a probability / threshold outside [0, 1]."""
    try:
        model = document["model"]
        identity = ModelIdentity(str(model["name"]), str(model["version"]), tuple(model.get("members", ())))
        findings = [_finding(f) for f in document["findings"]]
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidInputError(f"malformed findings document: {type(e).__name__}: {e}", reason="BAD_FINDINGS") from e
    if not identity.name or not identity.version or not findings:
        raise InvalidInputError("findings document needs a model name, version and findings", reason="BAD_FINDINGS")
    return identity, findings


def _finding(f: Mapping[str, Any]) -> ResultFinding:
    finding = ResultFinding(
        label=str(f["label"]),
        probability=float(f["probability"]),
        model_probabilities={str(k): float(v) for k, v in dict(f.get("model_probabilities", {})).items()},
        votes=int(f["votes"]),
        n_models=int(f["n_models"]),
        threshold=float(f["threshold"]),
        positive=bool(f["positive"]),
    )
    for value in (finding.probability, finding.threshold, *finding.model_probabilities.values()):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"{finding.label}: probability or threshold {value} outside [0, 1]")
    if not 0 <= finding.votes <= finding.n_models or not finding.label:
        raise ValueError(f"{finding.label!r}: votes {finding.votes} of {finding.n_models}")
    return finding


def header_bytes(data: bytes) -> bytes:
    """DICOM Part 10 bytes -> the same file without its pixel data (what ``:source`` stores: a few KiB).

    Raises InvalidInputError like ``source_header``."""
    ds = source_header(data)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# Type 2 patient / study attributes every result copies from its source (highdicom reads them unconditionally).
TYPE2_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                "StudyDate", "StudyTime", "ReferringPhysicianName")  # fmt: skip


def with_type2_attributes(source: Dataset) -> Dataset:
    """A shallow copy of ``source`` where each of TYPE2_COPIED that is missing is present and empty (a Type 2
    attribute may be empty, never absent), so results of a sparse source (e.g. a converted PNG) stay valid."""
    out = Dataset()
    out.update(source)
    if hasattr(source, "file_meta"):
        out.file_meta = source.file_meta
    for keyword in TYPE2_COPIED:
        if keyword not in out:
            setattr(out, keyword, "")
    if "PatientAge" in out and not _AGE.match(str(out.PatientAge or "")):
        del out.PatientAge  # Type 3 where results copy it; an invalid source value (e.g. "81") would make them invalid
    return out
