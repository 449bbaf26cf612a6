"""Multilabel losses on logits with unknown (NaN) targets masked out.

- ``wbce`` (the paper): binary cross-entropy with logits, one positive weight per label computed from the
  TRAINING split: ``pos_weight_l = n_neg_l / n_pos_l`` (inverse frequency, the usual reading of the paper's
  "weighted BCE"), counted over known targets only and clamped to [1, 100] by default: never down-weight
  positives, and keep the gradient of a label with a handful of positives from exploding. A label without
  training positives gets the upper bound (it has no positive terms, so the weight is moot).
- ``focal`` (beyond the paper; Lin et al. 2017): BCE times (1 - p_t)^gamma, optional alpha balance.
- ``asl`` (beyond the paper; Ridnik et al. 2021): asymmetric focusing, gamma_neg > gamma_pos, with the negative
  probability shifted by ``clip`` (easy negatives discarded).

Every loss returns the mean over the known (image, label) entries of the batch; an all-unknown batch gives 0.
Losses are computed in float32 even under bf16 autocast.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("wbce", "focal", "asl")
POS_WEIGHT_CLAMP = (1.0, 100.0)


def label_counts(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, L) targets with NaN = unknown -> (n_pos, n_neg), each (L,) int64, over known entries only."""
    y = np.asarray(labels, dtype=np.float64)
    return (y == 1).sum(axis=0).astype(np.int64), (y == 0).sum(axis=0).astype(np.int64)


def pos_weight_from_labels(labels: np.ndarray, clamp: Sequence[float] = POS_WEIGHT_CLAMP) -> np.ndarray:
    """Training targets (N, L) with NaN -> (L,) float32 positive weights n_neg / n_pos, clamped to ``clamp``.

    Raises ValueError if ``labels`` is not 2-D or the clamp range is empty.
    """
    if np.ndim(labels) != 2:
        raise ValueError(f"labels must be (N, L), got shape {np.shape(labels)}")
    lo, hi = float(clamp[0]), float(clamp[1])
    if not 0 < lo <= hi:
        raise ValueError(f"bad clamp range {clamp}")
    n_pos, n_neg = label_counts(labels)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(n_pos > 0, n_neg / np.maximum(n_pos, 1), hi)
    return np.clip(w, lo, hi).astype(np.float32)


def _split_targets(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (float32 logits, targets with NaN replaced by 0, float32 mask of known entries)."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    mask = ~torch.isnan(targets)
    return logits.float(), torch.where(mask, targets, torch.zeros_like(targets)).float(), mask.float()


def masked_mean(elementwise: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``elementwise`` over entries where ``mask`` is 1; 0 when nothing is known."""
    return (elementwise * mask).sum() / mask.sum().clamp(min=1.0)


class MaskedLoss(nn.Module):
    """Base: ``forward(logits, targets) -> scalar``; ``elementwise`` gives the (N, L) terms and the mask."""

    def elementwise(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        terms, mask = self.elementwise(logits, targets)
        return masked_mean(terms, mask)

    def sum_and_count(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the known terms, number of known entries): for exact averages across batches and ranks."""
        terms, mask = self.elementwise(logits, targets)
        return (terms * mask).sum(), mask.sum()


class WeightedBCE(MaskedLoss):
    """The paper's loss: BCE with logits and one positive weight per label."""

    pos_weight: torch.Tensor | None

    def __init__(self, pos_weight: np.ndarray | torch.Tensor | None = None) -> None:
        super().__init__()
        pw = None if pos_weight is None else torch.as_tensor(np.asarray(pos_weight), dtype=torch.float32)
        self.register_buffer("pos_weight", pw)

    def elementwise(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, t, mask = _split_targets(logits, targets)
        terms = F.binary_cross_entropy_with_logits(z, t, pos_weight=self.pos_weight, reduction="none")
        return terms, mask


class FocalLoss(MaskedLoss):
    """Focal loss: -alpha_t (1 - p_t)^gamma log p_t (alpha None: no class balance term)."""

    def __init__(self, gamma: float = 2.0, alpha: float | None = None) -> None:
        super().__init__()
        self.gamma, self.alpha = gamma, alpha

    def elementwise(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, t, mask = _split_targets(logits, targets)
        bce = F.binary_cross_entropy_with_logits(z, t, reduction="none")
        p = torch.sigmoid(z)
        p_t = p * t + (1 - p) * (1 - t)
        terms = bce * (1 - p_t).pow(self.gamma)
        if self.alpha is not None:
            terms = terms * (self.alpha * t + (1 - self.alpha) * (1 - t))
        return terms, mask


class AsymmetricLoss(MaskedLoss):
    """ASL: positives -(1-p)^g+ log p; negatives -p_m^g- log(1-p_m) with p_m = max(p - clip, 0)."""

    def __init__(self, gamma_pos: float = 0.0, gamma_neg: float = 4.0, clip: float = 0.05) -> None:
        super().__init__()
        self.gamma_pos, self.gamma_neg, self.clip = gamma_pos, gamma_neg, clip

    def elementwise(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, t, mask = _split_targets(logits, targets)
        p = torch.sigmoid(z)
        p_m = (p - self.clip).clamp(min=0.0)
        pos = -F.logsigmoid(z) * (1 - p).pow(self.gamma_pos)
        neg = -torch.log((1 - p_m).clamp(min=1e-8)) * p_m.pow(self.gamma_neg)
        return t * pos + (1 - t) * neg, mask


def make_loss(name: str, pos_weight: np.ndarray | None = None) -> MaskedLoss:
    """Loss by name: ``wbce`` (uses ``pos_weight``), ``focal`` or ``asl``. Raises ValueError for others."""
    if name == "wbce":
        return WeightedBCE(pos_weight)
    if name == "focal":
        return FocalLoss()
    if name == "asl":
        return AsymmetricLoss()
    raise ValueError(f"unknown loss {name!r}; known: {LOSSES}")


def constant_predictor_loss(labels: np.ndarray, pos_weight: np.ndarray | None = None) -> float:
    """Weighted BCE of the best constant prediction per label on ``labels`` (N, L) with NaN = unknown: the loss a
    model that learned nothing about the images reaches. Per label with prevalence pi and weight w the best
    constant probability is w pi / (w pi + 1 - pi); the result is the mean over labels with known targets."""
    y = np.asarray(labels, dtype=np.float64)
    w = np.ones(y.shape[1]) if pos_weight is None else np.asarray(pos_weight, dtype=np.float64)
    losses = []
    for j in range(y.shape[1]):
        known = y[~np.isnan(y[:, j]), j]
        if len(known) == 0:
            continue
        pi = known.mean()
        if pi in (0.0, 1.0):
            losses.append(0.0)
            continue
        s = w[j] * pi / (w[j] * pi + 1 - pi)
        losses.append(-(w[j] * pi * np.log(s) + (1 - pi) * np.log(1 - s)))
    return float(np.mean(losses)) if losses else float("nan")
