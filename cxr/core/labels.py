"""Label vocabularies the project knows. A trained ensemble carries its own label list in its manifest;
these constants are for dataset selection and documentation."""

from __future__ import annotations

# The paper's 35 specific PadChest labels, in its order (frequency among PA images).
PADCHEST_PAPER_35: tuple[str, ...] = (
    "normal", "COPD signs", "cardiomegaly", "aortic elongation", "unchanged", "scoliosis", "chronic changes",
    "costophrenic angle blunting", "air trapping", "pneumonia", "pleural effusion", "interstitial pattern",
    "infiltrates", "vertebral degenerative changes", "laminar atelectasis", "kyphosis",
    "vascular hilar enlargement", "apical pleural thickening", "fibrotic band", "nodule", "calcified granuloma",
    "callus rib fracture", "pacemaker", "aortic atheromatosis", "bronchiectasis", "sternotomy", "volume loss",
    "hiatal hernia", "hemidiaphragm elevation", "pseudonodule", "alveolar pattern", "increased density",
    "suture material", "vertebral anterior compression", "supra aortic elongation",
)  # fmt: skip

# NIH ChestX-ray14: 14 findings + "No Finding" (column No_Finding in the bundled labels.csv).
NIH_CXR14: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
    "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax", "No_Finding",
)  # fmt: skip
