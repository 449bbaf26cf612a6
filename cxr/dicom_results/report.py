"""The Structured Report: a TID 1500 Measurement Report (highdicom, Comprehensive 3D SR) with one measurement group
per label, in the manifest's order.

Each group: tracking identifier = the label, finding type = the label (99CXR code), the ensemble as algorithm
(name, version), the source image as "Source of Measurement", and the measurements ensemble probability, each
model's probability (algorithm = that model), decision threshold, models predicting the finding ("k of n"),
models in the ensemble, and, with heatmaps, the spatial agreement and mean disagreement of the models' maps; the
decision is a qualitative evaluation (SCT Present / Absent). The root carries a Comment "NOT FOR CLINICAL USE ...";
the document is preliminary, unverified, and its series says NOT FOR CLINICAL USE.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.sr import RelationshipTypeValues, TextContentItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from cxr.dicom_results import codes as cc
from cxr.dicom_results.findings import ModelIdentity, ResultFinding


@dataclass(frozen=True)
class HeatmapSummary:
    """Per-label agreement numbers of the explanation (``HeatmapSet.spatial_agreement`` / ``mean_disagreement``)."""

    labels: tuple[str, ...]
    spatial_agreement: np.ndarray
    mean_disagreement: np.ndarray

    def of(self, label: str) -> tuple[float, float] | None:
        if label not in self.labels:
            return None
        j = self.labels.index(label)
        return float(self.spatial_agreement[j]), float(self.mean_disagreement[j])


@dataclass(frozen=True)
class ReportIds:
    """Where the SR goes: its series and instance UIDs and numbers."""

    series_uid: str
    series_number: int
    sop_uid: str
    instance_number: int = 1


def build_report(
    source: Dataset,
    model: ModelIdentity,
    findings: Sequence[ResultFinding],
    ids: ReportIds,
    *,
    manufacturer: str,
    notice: str,
    heatmaps: HeatmapSummary | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR of one analysed image (see the module docstring). highdicom raises ValueError / TypeError for
    a source it cannot reference (the caller checks the source first)."""
    algorithm = hd.sr.AlgorithmIdentification(name=model.name, version=model.version)
    groups = [_group(source, f, model, algorithm, heatmaps) for f in findings]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(source, model, manufacturer),
        procedure_reported=cc.PROCEDURE_CHEST_XRAY,
        imaging_measurements=groups,
    )
    report[0].ContentSequence.append(
        TextContentItem(name=cc.COMMENT, value=notice, relationship_type=RelationshipTypeValues.CONTAINS)
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=report,
        series_instance_uid=ids.series_uid,
        series_number=ids.series_number,
        sop_instance_uid=ids.sop_uid,
        instance_number=ids.instance_number,
        manufacturer=manufacturer,
        series_description=f"{model.name} findings - NOT FOR CLINICAL USE"[:64],
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.CodingSchemeIdentificationSequence = [cc.coding_scheme_identification()]
    return sr


def _observation_context(source: Dataset, model: ModelIdentity, manufacturer: str) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=hd.UID(), name=manufacturer, manufacturer_name=manufacturer,
        model_name=f"{model.name} {model.version}"[:64],
    )  # fmt: skip
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _group(
    source: Dataset,
    f: ResultFinding,
    model: ModelIdentity,
    algorithm: hd.sr.AlgorithmIdentification,
    heatmaps: HeatmapSummary | None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    decision = cc.PRESENT if f.positive else cc.ABSENT
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f.label[:64]),
        finding_type=cc.label_code(f.label),
        algorithm_id=algorithm,
        measurements=_measurements(f, model, heatmaps),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=cc.DECISION, value=decision)],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )


def _measurements(f: ResultFinding, model: ModelIdentity, heatmaps: HeatmapSummary | None) -> list[hd.sr.Measurement]:
    out = [
        hd.sr.Measurement(name=cc.ENSEMBLE_PROBABILITY, value=round(f.probability, 6), unit=cc.NO_UNITS),
        *[
            hd.sr.Measurement(
                name=cc.MODEL_PROBABILITY,
                value=round(p, 6),
                unit=cc.NO_UNITS,
                algorithm_id=hd.sr.AlgorithmIdentification(name=name[:64], version=model.version),
            )  # fmt: skip
            for name, p in f.model_probabilities.items()
        ],
        hd.sr.Measurement(name=cc.THRESHOLD, value=round(f.threshold, 6), unit=cc.NO_UNITS),
        hd.sr.Measurement(name=cc.VOTES, value=f.votes, unit=cc.MODELS_UNIT),
        hd.sr.Measurement(name=cc.N_MODELS, value=f.n_models, unit=cc.MODELS_UNIT),
    ]
    agreement = heatmaps.of(f.label) if heatmaps is not None else None
    if agreement is not None:
        out.append(hd.sr.Measurement(name=cc.SPATIAL_AGREEMENT, value=round(agreement[0], 4), unit=cc.NO_UNITS))
        out.append(hd.sr.Measurement(name=cc.MEAN_DISAGREEMENT, value=round(agreement[1], 4), unit=cc.NO_UNITS))
    return out
