"""cxr: explainable multilabel chest X-ray analysis (ensemble of CNNs + fused Grad-CAM). Not for clinical use."""

__version__ = "0.1.0"
NOT_FOR_CLINICAL_USE = "Research software: NOT FOR CLINICAL USE."
