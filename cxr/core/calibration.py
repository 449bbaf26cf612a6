"""Calibrated probabilities from logits (numpy only), applied identically by serving and by evaluation.

Each model of an ensemble carries, per label, a logit offset b and a temperature T (manifest ``ModelEntry``):

    probability = sigmoid((logit - b) / T)

- b corrects the prior shift that weighted BCE builds in on purpose: with positive weight w a label's
  loss-minimising logit is log(w * p / (1 - p)), so b = log(w) (the training run's ``pos_weight``) maps it back to
  the log-odds of p. It is known from training; nothing is fitted.
- T (temperature scaling, Guo et al. 2017) is fitted on the validation part by minimising the negative
  log-likelihood (``training.calibration``): one per model, and per label where the validation part has enough
  positives and negatives to estimate it.

Both are monotone per label, so AUROC, rankings and Grad-CAM maps (computed on the raw logit) are unchanged;
thresholds are tuned on the calibrated probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cxr.core.ensemble import sigmoid


def calibrate_logits(
    logits: np.ndarray, offset: Sequence[float] | None, temperature: Sequence[float] | None
) -> np.ndarray:
    """(…, L) logits -> (…, L) calibrated logits (float64). None offset / temperature: identity."""
    z = np.asarray(logits, dtype=np.float64)
    if offset is not None:
        z = z - np.asarray(offset, dtype=np.float64)
    if temperature is not None:
        z = z / np.asarray(temperature, dtype=np.float64)
    return z


def calibrated_probabilities(
    logits: np.ndarray, offsets: Sequence[Sequence[float] | None], temperatures: Sequence[Sequence[float] | None]
) -> np.ndarray:
    """(…, M, L) logits of M models with each model's (offset, temperature) -> (…, M, L) float32 probabilities.
    Raises ValueError when the number of models differs."""
    z = np.asarray(logits, dtype=np.float64)
    if not (z.shape[-2] == len(offsets) == len(temperatures)):
        raise ValueError(f"logits for {z.shape[-2]} models, calibration for {len(offsets)} / {len(temperatures)}")
    out = np.empty(z.shape, dtype=np.float32)
    for i, (b, t) in enumerate(zip(offsets, temperatures, strict=True)):
        out[..., i, :] = sigmoid(calibrate_logits(z[..., i, :], b, t))
    return out
