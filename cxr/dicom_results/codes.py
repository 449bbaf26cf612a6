"""Coded concepts of the result objects. Standard codes (DCM, SCT, UCUM, LOINC) where one exists; our own
private coding scheme ``99CXR`` (declared in each SR's Coding Scheme Identification Sequence) for the labels and
the ensemble's quantities, which no standard terminology names."""

from __future__ import annotations

import hashlib
import re

from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

SCHEME = "99CXR"
SCHEME_NAME = "cxr-xai private codes"
SCHEME_ORGANISATION = "cxr-xai project (research software, not for clinical use)"

PROCEDURE_CHEST_XRAY = CodedConcept("36643-5", "LN", "XR Chest 2V")  # LOINC, as DCM TID 1500 examples use
COMMENT = CodedConcept("121106", "DCM", "Comment")
NO_UNITS = codes.UCUM.NoUnits
MODELS_UNIT = CodedConcept("{models}", "UCUM", "models")
PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent

ENSEMBLE_PROBABILITY = CodedConcept("PROB", SCHEME, "Ensemble probability")
MODEL_PROBABILITY = CodedConcept("MODELPROB", SCHEME, "Model probability")
THRESHOLD = CodedConcept("THRESHOLD", SCHEME, "Decision threshold")
VOTES = CodedConcept("VOTES", SCHEME, "Models predicting the finding")
N_MODELS = CodedConcept("NMODELS", SCHEME, "Models in the ensemble")
DECISION = CodedConcept("DECISION", SCHEME, "Decision at the threshold")
SPATIAL_AGREEMENT = CodedConcept("SPATIALAGREE", SCHEME, "Spatial agreement of the models' heatmaps")
MEAN_DISAGREEMENT = CodedConcept("MEANDISAGREE", SCHEME, "Mean disagreement of the models' heatmaps")

_SHORT_CODE = re.compile(r"^[A-Za-z0-9_.-]{1,16}$")


def label_code(label: str) -> CodedConcept:
    """A label as a 99CXR code: the label itself when it fits a Code Value (16 characters), else a stable
    "CXR" + 12 hex digits of its SHA-256; the meaning is always the label (at most 64 characters)."""
    value = label if _SHORT_CODE.match(label) else "CXR" + hashlib.sha256(label.encode()).hexdigest()[:12]
    return CodedConcept(value, SCHEME, label[:64])


def coding_scheme_identification() -> Dataset:
    """An item of the Coding Scheme Identification Sequence that declares 99CXR."""
    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = SCHEME_ORGANISATION
    return item
