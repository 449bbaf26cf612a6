"""Ensemble maths of the paper (numpy only).

Shapes: ``probs`` is (M, L) for one image or (N, M, L) for a batch: M models, L labels.

- CTP (combine then predict): mean probability over models, then threshold. The paper's best rule.
- PTC-lw: per-label majority vote of the models' binary predictions (ties -> positive when exactly half).
- PTC-mode: the most frequent complete label set among the models (ties -> the set of the lowest model index).
- votes / agreement: how many models are positive for a label, each against its own threshold.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def sigmoid(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)  # overflow-free logistic


def ctp_mean(probs: np.ndarray) -> np.ndarray:
    """(…, M, L) -> (…, L): mean probability over the model axis."""
    return np.asarray(probs, dtype=np.float32).mean(axis=-2)


def binarize(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """p >= threshold, broadcasting thresholds over the last axis (labels) or (M, L) per model."""
    return np.asarray(probs) >= np.asarray(thresholds, dtype=np.float32)


def votes(probs: np.ndarray, model_thresholds: np.ndarray) -> np.ndarray:
    """(…, M, L) probabilities, (M, L) or (L,) thresholds -> (…, L) number of positive models."""
    return binarize(probs, model_thresholds).sum(axis=-2).astype(np.int32)


def ptc_label_wise(probs: np.ndarray, model_thresholds: np.ndarray) -> np.ndarray:
    """Per-label majority vote -> (…, L) bool. Exactly half the models counts as positive."""
    m = np.asarray(probs).shape[-2]
    return votes(probs, model_thresholds) * 2 >= m


def ptc_mode(probs: np.ndarray, model_thresholds: np.ndarray) -> np.ndarray:
    """Most frequent complete label set across models -> (…, L) bool."""
    b = binarize(probs, model_thresholds)
    flat = b.reshape(-1, b.shape[-2], b.shape[-1])
    out = np.empty((flat.shape[0], flat.shape[-1]), dtype=bool)
    for i, sets in enumerate(flat):
        keys = [row.tobytes() for row in sets]
        counts = Counter(keys)
        best = max(counts.values())
        winner = next(k for k in keys if counts[k] == best)  # first model's set among the tied
        out[i] = sets[keys.index(winner)]
    return out.reshape(b.shape[:-2] + (b.shape[-1],))


def ensemble_scores(probs: np.ndarray, rule: str, model_thresholds: np.ndarray) -> np.ndarray:
    """Ranking scores of an ensemble rule, (…, L): CTP's mean, or the vote fraction for the PTC rules
    (PTC rules lose ranking information; the fraction is what an AUROC of them can use)."""
    if rule == "ctp":
        return ctp_mean(probs)
    m = np.asarray(probs).shape[-2]
    if rule == "ptc_lw":
        return votes(probs, model_thresholds).astype(np.float32) / m
    if rule == "ptc_mode":
        return ptc_mode(probs, model_thresholds).astype(np.float32)
    raise ValueError(f"unknown ensemble rule {rule!r}")


@dataclass(frozen=True)
class Finding:
    """One label's answer for one image."""

    label: str
    probability: float  # ensemble (CTP) probability
    model_probabilities: dict[str, float]
    votes: int  # models positive for this label
    n_models: int
    threshold: float
    positive: bool  # probability >= threshold

    @property
    def agreement_text(self) -> str:
        return f"{self.votes} of {self.n_models} models"


def findings_for_image(
    labels: Sequence[str],
    model_names: Sequence[str],
    probs: np.ndarray,
    thresholds: Sequence[float],
    model_thresholds: np.ndarray | None = None,
) -> list[Finding]:
    """(M, L) per-model probabilities of one image -> one Finding per label, in label order."""
    p = np.asarray(probs, dtype=np.float32)
    if p.shape != (len(model_names), len(labels)):
        raise ValueError(f"probabilities {p.shape} do not match {len(model_names)} models x {len(labels)} labels")
    t = np.asarray(thresholds, dtype=np.float32)
    mt = t if model_thresholds is None else np.asarray(model_thresholds, dtype=np.float32)
    mean = ctp_mean(p)
    v = votes(p, mt)
    return [
        Finding(
            label=lab,
            probability=float(mean[j]),
            model_probabilities={name: float(p[i, j]) for i, name in enumerate(model_names)},
            votes=int(v[j]),
            n_models=len(model_names),
            threshold=float(t[j]),
            positive=bool(mean[j] >= t[j]),
        )
        for j, lab in enumerate(labels)
    ]
