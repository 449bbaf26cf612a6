"""DICOM results (cxr.dicom_results) built from the real files of ../shared/data/dicom, checked by the real
dciodvfy (dicom3tools) and dsrdump / dcmdump (dcmtk), read back by pydicom."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from cxr.core.errors import InvalidInputError
from cxr.dicom_results import build_result_datasets, dataset_bytes, result_kind, source_header
from cxr.dicom_results.findings import header_bytes
from cxr.explain.display import display_from_dicom
from cxr.explain.heatmap_store import HeatmapSet, quantize
from cxr.explain.panels import GAP
from services.ingestion.explanation_view import read_png

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DICOM = REPO.parent / "shared" / "data" / "dicom"
LABELS = ("Atelectasis", "Pleural_Thickening", "Effusion")
MODELS = ("densenet121", "efficientnet_b0", "mobilenet_v3_large")
POSITIVE = (True, False, True)


def findings_document(labels: tuple[str, ...] = LABELS) -> dict[str, Any]:
    return {
        "model": {"name": "cxr-test", "version": "2.1.0", "members": list(MODELS)},
        "findings": [
            {"label": label, "probability": 0.71 if pos else 0.12, "votes": 2 if pos else 0, "n_models": 3,
             "threshold": 0.5, "positive": pos,
             "model_probabilities": {m: round(0.5 + 0.1 * i, 2) if pos else 0.1 for i, m in enumerate(MODELS)}}
            for label, pos in zip(labels, POSITIVE, strict=True)
        ],
    }  # fmt: skip


def heatmap_set(grid: int = 16) -> HeatmapSet:
    rng = np.random.default_rng(7)
    per_model = rng.random((len(MODELS), len(LABELS), grid, grid)).astype(np.float32)
    return HeatmapSet(
        labels=LABELS, models=MODELS, grid=grid, per_model=quantize(per_model), fused=quantize(per_model.mean(0)),
        std=quantize(per_model.std(0)), spatial_agreement=np.array([0.4, 0.2, 0.3], np.float32),
        mean_disagreement=np.array([0.1, 0.2, 0.15], np.float32), method="test maps",
    )  # fmt: skip


def display_of(name: str, max_side: int = 256) -> np.ndarray:
    return read_png(display_from_dicom((DICOM / name).read_bytes(), max_side))


def write_all(datasets: list[pydicom.Dataset], folder: Path) -> list[Path]:
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{i}-{result_kind(ds)}.dcm"
        path.write_bytes(dataset_bytes(ds))
        paths.append(path)
    return paths


def dciodvfy_errors(path: Path) -> list[str]:
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "nih_no_finding_dx.dcm", "siim_pneumothorax_negative.dcm"])
def test_every_object_passes_dciodvfy_and_reads_back_with_dcmtk(name: str, tmp_path: Path) -> None:
    source = source_header((DICOM / name).read_bytes())
    datasets = build_result_datasets(source, findings_document(), heatmap_set(), display_of(name))
    assert [result_kind(ds) for ds in datasets] == ["SR", "SC", "SC", "SC"]  # SR, 2 positive panels, summary
    for path in write_all(datasets, tmp_path):
        assert dciodvfy_errors(path) == [], path.name
        dump = subprocess.run(["dcmdump", str(path)], capture_output=True, text=True, timeout=60, check=True)
        assert source.StudyInstanceUID in dump.stdout
    sr = subprocess.run(["dsrdump", str(tmp_path / "0-SR.dcm")], capture_output=True, text=True, timeout=60,
                        check=True).stdout  # fmt: skip
    for label in LABELS:
        assert f'"Tracking Identifier")="{label}"' in sr
    assert sr.count('"Decision at the threshold")=(52101004,SCT,"Present")') == 2
    assert sr.count('"Decision at the threshold")=(272519000,SCT,"Absent")') == 1
    assert sr.count('"Ensemble probability")="0.71"') == 2 and 'Algorithm Version")="2.1.0"' in sr
    assert "NOT FOR CLINICAL USE" in sr and "Verification Flag   : UNVERIFIED" in sr


def test_sr_and_captures_reference_the_source_image_and_live_in_its_study(tmp_path: Path) -> None:
    source = source_header((DICOM / "RG1_UNCR.dcm").read_bytes())
    display = display_of("RG1_UNCR.dcm")
    datasets = build_result_datasets(source, findings_document(), heatmap_set(), display)
    back = [pydicom.dcmread(p) for p in write_all(datasets, tmp_path)]
    sr, captures = back[0], back[1:]
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    referenced = evidence.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert referenced.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    image_refs = _image_references(sr)
    assert len(image_refs) == len(LABELS) and set(image_refs) == {source.SOPInstanceUID}
    for ds in back:
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert "NOT FOR CLINICAL USE" in ds.SeriesDescription
    assert len({c.SeriesInstanceUID for c in captures}) == 1 and captures[0].SeriesInstanceUID != sr.SeriesInstanceUID
    for sc in captures:
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert sc.PatientOrientation == source.PatientOrientation and sc.BurnedInAnnotation == "NO"
    panel = captures[0].pixel_array
    assert panel.shape == (display.shape[0], 2 * display.shape[1] + GAP, 3)  # overlay | disagreement, side by side
    assert captures[0].ImageComments.startswith("Atelectasis - probability 0.710 - agreement 2 of 3 models")


def _image_references(sr: pydicom.Dataset) -> list[str]:
    """ReferencedSOPInstanceUID of every IMAGE content item of the SR tree."""
    found: list[str] = []
    stack = list(sr.ContentSequence)
    while stack:
        item = stack.pop()
        if item.ValueType == "IMAGE":
            found.append(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        stack.extend(item.get("ContentSequence", []))
    return found


def test_uids_are_deterministic_so_a_resend_replaces() -> None:
    source = source_header((DICOM / "nih_no_finding_dx.dcm").read_bytes())
    display = display_of("nih_no_finding_dx.dcm", 128)
    first = build_result_datasets(source, findings_document(), heatmap_set(), display)
    again = build_result_datasets(source, findings_document(), heatmap_set(), display)
    uids = [ds.SOPInstanceUID for ds in first]
    assert uids == [ds.SOPInstanceUID for ds in again] and len(set(uids)) == len(uids)


def test_a_header_without_pixels_is_enough_and_without_heatmaps_only_the_sr_is_made(tmp_path: Path) -> None:
    data = (DICOM / "cr_header_only_no_pixels.dcm").read_bytes()
    header = header_bytes(data)
    assert b"\xe0\x7f\x10\x00" not in header  # no Pixel Data element
    datasets = build_result_datasets(source_header(header), findings_document())
    assert [result_kind(ds) for ds in datasets] == ["SR"]
    (path,) = write_all(datasets, tmp_path)
    assert dciodvfy_errors(path) == []


def test_summary_only_when_nothing_is_positive() -> None:
    doc = findings_document()
    for f in doc["findings"]:
        f["positive"], f["probability"], f["votes"] = False, 0.1, 0
    source = source_header((DICOM / "nih_no_finding_dx.dcm").read_bytes())
    datasets = build_result_datasets(source, doc, heatmap_set(), display_of("nih_no_finding_dx.dcm", 128))
    assert [result_kind(ds) for ds in datasets] == ["SR", "SC"]
    assert datasets[1].ImageComments.startswith("Summary")


def test_bad_inputs_get_typed_errors() -> None:
    good = source_header((DICOM / "nih_no_finding_dx.dcm").read_bytes())
    with pytest.raises(InvalidInputError) as e:
        source_header(b"not a dicom file at all" * 10)
    assert e.value.reason == "NOT_DICOM"
    no_uid = pydicom.Dataset()
    no_uid.update(good)
    del no_uid.SOPInstanceUID
    with pytest.raises(InvalidInputError) as e:
        build_result_datasets(no_uid, findings_document())
    assert e.value.reason == "BAD_SOURCE_DICOM" and "SOPInstanceUID" in e.value.message
    broken = findings_document()
    broken["findings"][0]["probability"] = 1.7
    for doc in (broken, {"model": {"name": "m", "version": "1"}, "findings": []}, {"findings": []}):
        with pytest.raises(InvalidInputError) as e:
            build_result_datasets(good, doc)
        assert e.value.reason == "BAD_FINDINGS"
    other = findings_document(("Atelectasis", "Hernia", "Effusion"))
    with pytest.raises(InvalidInputError) as e:
        build_result_datasets(good, other, heatmap_set(), display_of("nih_no_finding_dx.dcm", 128))
    assert e.value.reason == "BAD_HEATMAPS" and "Hernia" in e.value.message


def test_building_results_never_warns_with_the_patients_name() -> None:
    """highdicom quotes odd person names in UserWarnings, which end up in service logs: suppressed while building."""
    import warnings

    source = source_header((DICOM / "RG1_UNCR.dcm").read_bytes())
    source.PatientName = "Zyxwvu"  # one component: highdicom warns about it, quoting the name
    source.ReferringPhysicianName = "Qwertyu"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        datasets = build_result_datasets(source, findings_document(), heatmap_set(), display_of("RG1_UNCR.dcm"))
    assert len(datasets) == 4
    assert not [w for w in caught if "Zyxwvu" in str(w.message) or "Qwertyu" in str(w.message)]
