"""Fit each model's calibration on the validation part (applied by ``cxr.core.calibration`` everywhere).

probability = sigmoid((logit - b) / T) per label, with
- b = log(pos_weight) of the training run (the prior shift weighted BCE builds in; 0 for unweighted losses);
- T by temperature scaling (Guo et al. 2017): the T > 0 minimising the negative log-likelihood of the known
  validation targets. One T per model over all its labels; a label gets its own T only when the validation part
  has at least ``MIN_PER_CLASS`` positives and as many negatives (a temperature fitted on a handful of positives
  is noise). T is searched in [1/20, 20] on a log scale (a bounded scalar minimisation, 1e-4 tolerance).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from cxr.core.calibration import calibrate_logits

MIN_PER_CLASS = 20
LOG_T_BOUNDS = (-np.log(20.0), np.log(20.0))
METHOD = (
    "per model and label: probability = sigmoid((logit - log(pos_weight)) / T); pos_weight from the training run "
    "(prior shift of weighted BCE), T by temperature scaling (minimum validation NLL; one T per model, a label's "
    f"own T where the validation part has >= {MIN_PER_CLASS} positives and >= {MIN_PER_CLASS} negatives)"
)


@dataclass(frozen=True)
class Calibration:
    """One model's calibration: per-label offsets and temperatures, and which labels got their own T."""

    offset: tuple[float, ...]
    temperature: tuple[float, ...]
    own_temperature: tuple[bool, ...]


def nll(z: np.ndarray, y: np.ndarray) -> float:
    """Mean binary negative log-likelihood of logits ``z`` for 0/1 targets ``y`` (overflow-free)."""
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(z: np.ndarray, y: np.ndarray) -> float:
    """The temperature T minimising the NLL of sigmoid(z / T) -> T (1.0 without both classes)."""
    z, y = np.asarray(z, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if len(y) == 0 or y.min() == y.max():
        return 1.0
    res = minimize_scalar(lambda lt: nll(z / np.exp(lt), y), bounds=LOG_T_BOUNDS, method="bounded",
                          options={"xatol": 1e-4})  # fmt: skip
    return float(np.exp(res.x))


def offsets_from_pos_weight(pos_weight: Sequence[float] | None, n_labels: int) -> tuple[float, ...]:
    """log(pos_weight) per label (zeros when the run used no positive weights)."""
    if pos_weight is None:
        return (0.0,) * n_labels
    return tuple(float(np.log(w)) for w in pos_weight)


def fit_calibration(logits: np.ndarray, targets: np.ndarray, offset: Sequence[float]) -> Calibration:
    """(N, L) validation logits of one model, (N, L) targets with NaN, per-label offsets -> Calibration."""
    z = calibrate_logits(logits, offset, None)
    y = np.asarray(targets, dtype=np.float64)
    known = ~np.isnan(y)
    global_t = fit_temperature(z[known], y[known])
    temps, own = [], []
    for j in range(y.shape[1]):
        k = known[:, j]
        n_pos, n_neg = int((y[k, j] == 1).sum()), int((y[k, j] == 0).sum())
        enough = min(n_pos, n_neg) >= MIN_PER_CLASS
        temps.append(fit_temperature(z[k, j], y[k, j]) if enough else global_t)
        own.append(enough)
    return Calibration(tuple(float(b) for b in offset), tuple(temps), tuple(own))
