"""``build_result_datasets``: one analysed radiograph -> the DICOM objects a PACS displays (SR first, then the
Secondary Captures). Numpy, Pillow, pydicom and highdicom only: no torch, so ingestion, the worker or a DICOM
front door can all call it.

UIDs are deterministic (``2.25.`` UIDs derived from the source SOP Instance UID, the model name and version, the
explanation method and the object's role), so building the results of the same analysis again yields the same
UIDs and a PACS that receives them twice replaces instead of duplicating.

Not built: a Parametric Map of the raw fused heatmaps. The Parametric Map IOD needs a Frame of Reference and plane
geometry (PS3.3 A.75), which a projection radiograph (CR / DX) does not have; highdicom 0.28.2 also fails to build
one from such a source. The fused map of every positive finding is in its Secondary Capture, the numbers in the SR.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from cxr import NOT_FOR_CLINICAL_USE
from cxr.core.errors import InvalidInputError
from cxr.dicom_results.captures import CaptureIds, build_capture
from cxr.dicom_results.findings import (
    ModelIdentity,
    ResultFinding,
    check_source,
    read_findings_document,
    with_type2_attributes,
)
from cxr.dicom_results.report import HeatmapSummary, ReportIds, build_report
from cxr.explain.heatmap_store import HeatmapSet
from cxr.explain.panels import PanelFinding, finding_panel, summary_page

SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image
NOTICE = f"{NOT_FOR_CLINICAL_USE} Findings and heatmaps of a research ensemble; they must not inform diagnosis or care."


@dataclass(frozen=True)
class ResultOptions:
    """How the results are made. Series numbers are those of the new SR and SC series in the source's study."""

    manufacturer: str = "cxr-xai"
    sr_series_number: int = 9901
    sc_series_number: int = 9902
    compress_captures: bool = False  # JPEG 2000 lossless instead of uncompressed (not every PACS accepts it)
    summary: bool = True  # add the one-page summary of all positive findings


def build_result_datasets(
    source: Dataset,
    findings_document: Mapping[str, Any],
    heatmaps: HeatmapSet | None = None,
    display_image: np.ndarray | None = None,
    *,
    options: ResultOptions | None = None,
) -> list[Dataset]:
    """The results of one analysed image, SR first.

    In: ``source``, the analysed image's dataset (pixel data not needed: a header read with
    ``stop_before_pixels`` or ``findings.source_header`` will do); ``findings_document``, the handler's JSON
    answer ({"model": {"name", "version", ...}, "findings": [...]}, docs/ARCHITECTURE.md); optionally the job's
    ``heatmaps`` and ``display_image`` (the radiograph as a 2-D uint8 or [0, 1] float array, as the worker stores
    it). Out: [Comprehensive 3D SR listing every finding] + with heatmaps and display, one Secondary Capture per
    positive finding (the overlay next to the disagreement map) and one summary page SC, all in the source's
    study (SR and SCs each in a new series).

    Raises InvalidInputError: BAD_SOURCE_DICOM (the source lacks a study, series or SOP instance or class UID),
    BAD_FINDINGS (a malformed findings document), BAD_HEATMAPS (heatmaps of other labels than the findings);
    ValueError for a display image that cannot be rendered (not 2-D, < 16 px, non-finite)."""
    # highdicom and pydicom warn about odd values by quoting them (the patient's name, say): never in any log
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(highdicom|pydicom)(\.|$)")
        return _build(source, findings_document, heatmaps, display_image, options or ResultOptions())


def _build(
    source: Dataset,
    findings_document: Mapping[str, Any],
    heatmaps: HeatmapSet | None,
    display_image: np.ndarray | None,
    opts: ResultOptions,
) -> list[Dataset]:
    check_source(source)
    source = with_type2_attributes(source)
    model, findings = read_findings_document(findings_document)
    method = heatmaps.method if heatmaps is not None else ""
    uid = _UidMaker(source, model, method)
    summary = _heatmap_summary(heatmaps, findings)
    report = build_report(
        source, model, findings, ReportIds(uid("sr-series"), opts.sr_series_number, uid("sr")),
        manufacturer=opts.manufacturer, notice=NOTICE, heatmaps=summary,
    )  # fmt: skip
    results: list[Dataset] = [report]
    if heatmaps is not None and display_image is not None:
        results.extend(_captures(source, model, findings, heatmaps, display_image, uid, opts))
    return results


def dataset_bytes(ds: Dataset) -> bytes:
    """A result dataset -> DICOM Part 10 bytes (preamble, file meta)."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def result_kind(ds: Dataset) -> str:
    """ "SR" or "SC" (or the SOP Class UID of anything else)."""
    return {SR_SOP_CLASS: "SR", SC_SOP_CLASS: "SC"}.get(str(ds.SOPClassUID), str(ds.SOPClassUID))


class _UidMaker:
    def __init__(self, source: Dataset, model: ModelIdentity, method: str) -> None:
        self._parts = [str(source.SOPInstanceUID), model.name, model.version, method]

    def __call__(self, role: str) -> str:
        """A 2.25 UID (an integer of 128 bits, as UUID-derived UIDs are) from SHA-256 of the parts and role."""
        digest = hashlib.sha256("\x1f".join([*self._parts, role]).encode()).hexdigest()
        return f"2.25.{int(digest[:32], 16)}"


def _heatmap_summary(heatmaps: HeatmapSet | None, findings: list[ResultFinding]) -> HeatmapSummary | None:
    if heatmaps is None:
        return None
    missing = [f.label for f in findings if f.label not in heatmaps.labels]
    if missing:
        raise InvalidInputError(f"the heatmaps have no map for {missing}", reason="BAD_HEATMAPS")
    return HeatmapSummary(heatmaps.labels, heatmaps.spatial_agreement, heatmaps.mean_disagreement)


def _captures(
    source: Dataset,
    model: ModelIdentity,
    findings: list[ResultFinding],
    heatmaps: HeatmapSet,
    display: np.ndarray,
    uid: _UidMaker,
    opts: ResultOptions,
) -> list[Dataset]:
    series = uid("sc-series")
    description = f"{model.name} heatmaps - NOT FOR CLINICAL USE"
    positives = [_panel_finding(f, heatmaps) for f in findings if f.positive]
    out: list[Dataset] = []
    for number, finding in enumerate(positives, start=1):
        j = heatmaps.label_index(finding.label)
        rgb = finding_panel(display, heatmaps.fused[j], heatmaps.std[j], finding)
        comment = f"{finding.title}. Left: fused Grad-CAM; right: disagreement between models. {NOTICE}"
        ids = CaptureIds(series, opts.sc_series_number, uid(f"sc:{finding.label}"), number)
        out.append(_capture(source, rgb, ids, description, comment, opts))
    if opts.summary:
        tiles = [(f, heatmaps.fused[heatmaps.label_index(f.label)]) for f in positives]
        rgb = summary_page(display, tiles, heading=f"{model.name} {model.version}: {len(tiles)} positive findings")
        ids = CaptureIds(series, opts.sc_series_number, uid("sc:summary"), len(positives) + 1)
        out.append(_capture(source, rgb, ids, description, f"Summary of all positive findings. {NOTICE}", opts))
    return out


def _capture(
    source: Dataset, rgb: np.ndarray, ids: CaptureIds, description: str, comment: str, opts: ResultOptions
) -> Dataset:
    return build_capture(
        source, rgb, ids, manufacturer=opts.manufacturer, series_description=description, comment=comment,
        compress=opts.compress_captures,
    )  # fmt: skip


def _panel_finding(f: ResultFinding, heatmaps: HeatmapSet) -> PanelFinding:
    j = heatmaps.label_index(f.label)
    return PanelFinding(f.label, f.probability, f.votes, f.n_models, f.positive, float(heatmaps.spatial_agreement[j]))
