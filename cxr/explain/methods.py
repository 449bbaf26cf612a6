"""Names of the explanation methods and fusion rules a request or setting may choose (pure Python: the ingestion
service validates requests with these without importing torch or captum).

Attribution methods (``cxr.explain.attributions``):

* ``gradcam`` (default): the paper's Grad-CAM of every label, one forward pass per model (``cxr.explain.gradcam``);
* ``integrated_gradients``, ``occlusion``, ``guided_gradcam``: captum's, for comparison; each costs one to two
  orders of magnitude more, so they explain only the positive labels (the most probable one when none is
  positive), at most ``MAX_CAPTUM_LABELS`` of them, and leave the other labels' maps empty (marked unexplained).

Fusion rules (``cxr.explain.fusion.fuse_by_rule``): ``mean`` (the paper's), ``probability_weighted``,
``agreement_masked``.
"""

from __future__ import annotations

from cxr.core.errors import InvalidInputError

GRADCAM = "gradcam"
INTEGRATED_GRADIENTS = "integrated_gradients"
OCCLUSION = "occlusion"
GUIDED_GRADCAM = "guided_gradcam"
ATTRIBUTION_METHODS = (GRADCAM, INTEGRATED_GRADIENTS, OCCLUSION, GUIDED_GRADCAM)
CAPTUM_METHODS = (INTEGRATED_GRADIENTS, OCCLUSION, GUIDED_GRADCAM)
MAX_CAPTUM_LABELS = 2

MEAN = "mean"
PROBABILITY_WEIGHTED = "probability_weighted"
AGREEMENT_MASKED = "agreement_masked"
FUSION_RULES = (MEAN, PROBABILITY_WEIGHTED, AGREEMENT_MASKED)
# The rule the worker uses unless CXR_FUSION_RULE says otherwise (`mean` = the paper's). Chosen by the evidence in
# docs/EXPLANATIONS.md (`cxr explain-eval` on cxr-nih14-imagenet 2.0.0, 12 boxed NIH images: probability-weighted
# ties the mean on the pointing game and is ahead on IoU, energy in box, deletion and insertion; small margins,
# within noise); re-run it on a new model.
DEFAULT_FUSION_RULE = PROBABILITY_WEIGHTED


def check_method(name: str) -> str:
    """``name`` ("" = the default, gradcam) -> a method of ATTRIBUTION_METHODS. Raises InvalidInputError
    (UNKNOWN_EXPLANATION_METHOD) for any other name."""
    method = name or GRADCAM
    if method not in ATTRIBUTION_METHODS:
        raise InvalidInputError(
            f"unknown explanation method {name!r}; known: {', '.join(ATTRIBUTION_METHODS)}",
            reason="UNKNOWN_EXPLANATION_METHOD",
        )
    return method
