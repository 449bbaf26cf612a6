"""The extras of GetExplanation that a job's stored data can make on request: the one-page summary PNG of all
positive findings (``render``) and the DICOM results (``dicom``: SR + Secondary Captures, built by
``cxr.dicom_results``). Numpy, Pillow, pydicom and highdicom; never torch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from cxr.core.errors import CxrError, InvalidInputError, UnsupportedError
from cxr.dicom_results import build_result_datasets, dataset_bytes, result_kind, source_header
from cxr.explain.heatmap_store import HeatmapSet
from cxr.explain.panels import PanelFinding, summary_page
from cxr.explain.render import encode_png
from cxr.ingestion.v1 import ingestion_pb2 as pb

NO_SOURCE = "NO_DICOM_SOURCE"


def summary_png(document: Mapping[str, Any], heatmaps: HeatmapSet, display: np.ndarray) -> bytes:
    """The summary page of the job's positive (and explained) findings, as PNG bytes."""
    tiles = [
        (PanelFinding.from_finding(f), heatmaps.fused[heatmaps.label_index(f["label"])])
        for f in document["findings"]
        if f["positive"] and f["label"] in heatmaps.labels and heatmaps.is_explained(f["label"])
    ]
    model = document.get("model", {})
    heading = f"{model.get('name', '')} {model.get('version', '')}: {len(tiles)} positive findings"
    return encode_png(summary_page(display, tiles, heading=heading))


def dicom_objects(
    source_blob: bytes | None, document: Mapping[str, Any], heatmaps: HeatmapSet, display: np.ndarray
) -> list[pb.DicomObject]:
    """The job's DICOM results as API messages, SR first.

    Raises UnsupportedError (NO_DICOM_SOURCE) when the job has no stored source header (queued by an older
    release, or a header the worker could not keep), and CxrError (BAD_STORED_RESULT) when the stored data cannot
    make results (our fault, not the caller's)."""
    if source_blob is None:
        raise UnsupportedError("this job has no stored DICOM header to build results on", reason=NO_SOURCE)
    try:
        datasets = build_result_datasets(source_header(source_blob), document, heatmaps, display)
    except (InvalidInputError, ValueError) as e:
        raise CxrError(f"the job's stored data cannot make DICOM results: {e}", reason="BAD_STORED_RESULT") from e
    return [_message(ds) for ds in datasets]


def _message(ds: Any) -> pb.DicomObject:
    kind = result_kind(ds)
    return pb.DicomObject(
        kind=kind,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        description=_description(ds, kind),
        data=dataset_bytes(ds),
    )


def _description(ds: Any, kind: str) -> str:
    if kind == "SR":
        return "findings"
    comment = str(ds.get("ImageComments", ""))
    return "summary" if comment.startswith("Summary") else comment.split(" - ", 1)[0]
