"""DICOM results of an analysis, for the PACS: a Structured Report (TID 1500 measurement report listing every
finding) and Secondary Capture images of the heatmap panels, in the source image's study. Torch-free.

    from cxr.dicom_results import build_result_datasets, dataset_bytes
    datasets = build_result_datasets(source_header, findings_document, heatmaps, display_image)  # SR first
    for ds in datasets:
        storescu_or_file.write(dataset_bytes(ds))

See ``cxr.dicom_results.build`` for the contract and what is not built (a Parametric Map).
"""

from cxr.dicom_results.build import (
    NOTICE,
    ResultOptions,
    build_result_datasets,
    dataset_bytes,
    result_kind,
)
from cxr.dicom_results.findings import source_header

__all__ = ["NOTICE", "ResultOptions", "build_result_datasets", "dataset_bytes", "result_kind", "source_header"]
