"""Multilabel metrics of the paper with bootstrap confidence intervals (numpy only).

Per label (unknown / NaN targets masked per label):
  ``auroc``; ``auprc`` (average precision, as sklearn's ``average_precision_score``); ``f1_positive`` (F1 of the
  positive class); ``f1_negative``; ``f1_paper_mean_pos_neg`` = (f1_positive + f1_negative) / 2 (the paper's "F1":
  a model that never predicts positive reproduces its values); ``hamming`` (error rate); ``ece`` (15 equal-width
  bins). An F1 with no positives predicted and none present is 0 (sklearn's ``zero_division=0``).
Overall:
  ``auroc_mean`` = unweighted mean of the per-label AUROCs (the paper's global AUC); labels with one class only
  in the data get AUROC NaN, are excluded from the mean and listed in ``auroc_excluded_labels``;
  ``auprc_mean``, ``f1_positive_mean``, ``f1_paper_mean_pos_neg``: unweighted means over labels (NaN skipped);
  ``hamming_loss``: wrong (image, label) decisions / known (image, label) entries; ``ece``: pooled over all known
  (image, label) probabilities.
CIs: percentile bootstrap resampling images (all labels together, so label correlations are kept), seeded;
replicates use multinomial counts as weights, which is the same as resampling rows and vectorises.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ECE_BINS = 15
PER_LABEL_KEYS = ("auroc", "auprc", "f1_positive", "f1_negative", "f1_paper_mean_pos_neg", "hamming", "ece")
OVERALL_KEYS = ("auroc_mean", "auprc_mean", "f1_positive_mean", "f1_paper_mean_pos_neg", "hamming_loss", "ece")


def _groups(s_sorted: np.ndarray) -> np.ndarray:
    """Start positions of runs of equal scores in a sorted score vector."""
    return np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])


def _grouped_weights(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted positives and negatives per distinct score, ascending -> two (B, G) arrays."""
    order = np.argsort(s, kind="mergesort")
    starts = _groups(s[order])
    ws, ys = w[:, order], y[order]
    return np.add.reduceat(ws * ys, starts, axis=1), np.add.reduceat(ws * (1.0 - ys), starts, axis=1)


def weighted_auroc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC (ties count one half) for each row of weights. y (n,) 0/1, s (n,), w (B, n) -> (B,), NaN when a
    replicate lacks either class."""
    pos, neg = _grouped_weights(y, s, w)
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def weighted_average_precision(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average precision (step-wise, thresholds at distinct scores, as sklearn) per row of weights -> (B,);
    NaN without positives."""
    pos, neg = _grouped_weights(y, s, w)
    pos, neg = pos[:, ::-1], neg[:, ::-1]  # descending thresholds
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / np.where(tp + fp > 0, tp + fp, 1.0), 0.0)
        total = pos.sum(axis=1)
        return np.where(total > 0, (pos * precision).sum(axis=1) / np.where(total > 0, total, 1.0), np.nan)


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    den = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2 * tp / np.where(den > 0, den, 1.0), 0.0)


def _bin_index(p: np.ndarray, bins: int) -> np.ndarray:
    return np.minimum((np.clip(p, 0.0, 1.0) * bins).astype(np.int64), bins - 1)


def _bin_sums(y: np.ndarray, p: np.ndarray, w: np.ndarray, bins: int) -> np.ndarray:
    """(B, 3, bins): weighted count, sum of probabilities, sum of outcomes per probability bin."""
    one_hot = np.eye(bins)[_bin_index(p, bins)]  # (n, bins)
    return np.stack([w @ one_hot, (w * p) @ one_hot, (w * y) @ one_hot], axis=1)


def _ece_from_bins(sums: np.ndarray) -> np.ndarray:
    total = sums[:, 0].sum(axis=1)
    gap = np.abs(sums[:, 2] - sums[:, 1]).sum(axis=1)  # sum_b n_b |acc_b - conf_b|
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, gap / np.where(total > 0, total, 1.0), np.nan)


def _label_stats(y: np.ndarray, s: np.ndarray, b: np.ndarray, w: np.ndarray, bins: int) -> dict[str, np.ndarray]:
    """One label's metrics for each row of weights (known entries only)."""
    if len(y) == 0:  # nothing known about this label: every metric undefined
        nan, zero = np.full(len(w), np.nan), np.zeros(len(w))
        return {
            **{k: nan for k in PER_LABEL_KEYS},
            "_errors": zero,
            "_known": zero,
            "_bins": np.zeros((len(w), 3, bins)),
        }
    yb = y.astype(bool)
    tp, fp = w @ (yb & b), w @ (~yb & b)
    fn, tn = w @ (yb & ~b), w @ (~yb & ~b)
    f1p, f1n = _f1(tp, fp, fn), _f1(tn, fn, fp)
    known = tp + fp + fn + tn
    sums = _bin_sums(y, s, w, bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        hamming = np.where(known > 0, (fp + fn) / np.where(known > 0, known, 1.0), np.nan)
    return {
        "auroc": weighted_auroc(y, s, w), "auprc": weighted_average_precision(y, s, w),
        "f1_positive": f1p, "f1_negative": f1n, "f1_paper_mean_pos_neg": (f1p + f1n) / 2, "hamming": hamming,
        "ece": _ece_from_bins(sums), "_errors": fp + fn, "_known": known, "_bins": sums,
    }  # fmt: skip


def _nanmean_rows(a: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(a)
    n = ok.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.where(ok, a, 0.0).sum(axis=1) / np.maximum(n, 1), np.nan)


def _replicate_metrics(
    y: np.ndarray, s: np.ndarray, b: np.ndarray, w: np.ndarray, valid_auroc: np.ndarray, bins: int
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """All metrics for each row of image weights ``w`` (B, N) -> (overall {key: (B,)}, per label [{key: (B,)}])."""
    per = []
    for j in range(y.shape[1]):
        known = ~np.isnan(y[:, j])
        per.append(_label_stats(y[known, j], s[known, j], b[known, j], w[:, known], bins))
    col = {k: np.stack([p[k] for p in per], axis=1) for k in (*PER_LABEL_KEYS, "_errors", "_known")}
    auroc = np.where(valid_auroc[None, :], col["auroc"], np.nan)
    errors, known = col["_errors"].sum(axis=1), col["_known"].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        hamming = np.where(known > 0, errors / np.maximum(known, 1e-12), np.nan)
    labelled = col["_known"] > 0
    overall = {
        "auroc_mean": _nanmean_rows(auroc), "auprc_mean": _nanmean_rows(col["auprc"]),
        "f1_positive_mean": _nanmean_rows(np.where(labelled, col["f1_positive"], np.nan)),
        "f1_paper_mean_pos_neg": _nanmean_rows(np.where(labelled, col["f1_paper_mean_pos_neg"], np.nan)),
        "hamming_loss": hamming, "ece": _ece_from_bins(np.sum([p["_bins"] for p in per], axis=0)),
    }  # fmt: skip
    return overall, per


def _check_shapes(y: np.ndarray, s: np.ndarray, b: np.ndarray, n_labels: int) -> None:
    if y.ndim != 2 or y.shape != s.shape or y.shape != b.shape or y.shape[1] != n_labels:
        raise ValueError(f"targets {y.shape}, scores {s.shape}, decisions {b.shape}, {n_labels} label names differ")
    if len(y) == 0:
        raise ValueError("no images to evaluate")


def _clean(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def _ci(samples: np.ndarray, alpha: float) -> list[float | None]:
    """Percentile interval of bootstrap replicates (NaN replicates ignored)."""
    ok = samples[~np.isnan(samples)]
    if len(ok) == 0:
        return [None, None]
    lo, hi = np.percentile(ok, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return [float(lo), float(hi)]


def _bootstrap(
    y: np.ndarray, s: np.ndarray, b: np.ndarray, valid: np.ndarray, n_boot: int, seed: int, bins: int
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Replicates of every metric -> ({key: (n_boot,)}, [{key: (n_boot,)} per label])."""
    rng = np.random.default_rng(seed)
    n, chunks_o, chunks_p = len(y), [], []
    for start in range(0, n_boot, 100):
        w = rng.multinomial(n, np.full(n, 1.0 / n), size=min(100, n_boot - start)).astype(np.float64)
        o, p = _replicate_metrics(y, s, b, w, valid, bins)
        chunks_o.append(o)
        chunks_p.append(p)
    overall = {k: np.concatenate([c[k] for c in chunks_o]) for k in OVERALL_KEYS}
    per = [{k: np.concatenate([c[j][k] for c in chunks_p]) for k in PER_LABEL_KEYS} for j in range(y.shape[1])]
    return overall, per


def evaluate_predictions(
    targets: np.ndarray,
    scores: np.ndarray,
    decisions: np.ndarray,
    label_names: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    bins: int = ECE_BINS,
) -> dict[str, Any]:
    """Evaluate one model or ensemble rule.

    In: targets (N, L) 0/1 with NaN = unknown; scores (N, L) ranking scores / probabilities in [0, 1];
    decisions (N, L) bool; label names; ``n_boot`` bootstrap replicates (0: no CIs).
    Out: JSON-ready dict: the ``OVERALL_KEYS``, ``ci95`` {key: [lo, hi]}, ``per_label`` {label: {n_pos, n_neg,
    PER_LABEL_KEYS..., ci95}}, ``auroc_excluded_labels``, ``n_images``, ``n_boot``. NaN is written as None.
    Raises ValueError on mismatched shapes or no images.
    """
    y = np.asarray(targets, dtype=np.float64)
    s, b = np.asarray(scores, dtype=np.float64), np.asarray(decisions, dtype=bool)
    _check_shapes(y, s, b, len(label_names))
    n_pos, n_neg = (y == 1).sum(axis=0), (y == 0).sum(axis=0)
    valid = (n_pos > 0) & (n_neg > 0)
    point_o, point_p = _replicate_metrics(y, s, b, np.ones((1, len(y))), valid, bins)
    boot_o, boot_p = _bootstrap(y, s, b, valid, n_boot, seed, bins) if n_boot > 0 else ({}, [{}] * len(label_names))
    per_label = {}
    for j, name in enumerate(label_names):
        entry: dict[str, Any] = {"n_pos": int(n_pos[j]), "n_neg": int(n_neg[j])}
        entry.update({k: _clean(point_p[j][k][0]) for k in PER_LABEL_KEYS})
        if not valid[j]:
            entry["auroc"] = None
        entry["ci95"] = {k: _ci(v, alpha) for k, v in boot_p[j].items()}
        per_label[name] = entry
    out: dict[str, Any] = {k: _clean(point_o[k][0]) for k in OVERALL_KEYS}
    out.update(
        ci95={k: _ci(v, alpha) for k, v in boot_o.items()},
        per_label=per_label,
        auroc_excluded_labels=[n for n, ok in zip(label_names, valid, strict=True) if not ok],
        n_images=int(len(y)),
        n_boot=int(n_boot),
    )
    return out


def mean_auroc(targets: np.ndarray, scores: np.ndarray) -> float:
    """Unweighted mean of per-label AUROCs over labels with both classes (NaN if none): for per-epoch monitoring."""
    y, s = np.asarray(targets, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    values = []
    for j in range(y.shape[1]):
        known = ~np.isnan(y[:, j])
        values.append(weighted_auroc(y[known, j], s[known, j], np.ones((1, int(known.sum()))))[0])
    ok = [v for v in values if not np.isnan(v)]
    return float(np.mean(ok)) if ok else float("nan")


def reliability_bins(targets: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Pooled reliability diagram data over known entries -> {"confidence", "accuracy", "count"}, each (bins,)
    (NaN confidence / accuracy in empty bins)."""
    y, p = np.asarray(targets, dtype=np.float64).ravel(), np.asarray(probs, dtype=np.float64).ravel()
    known = ~np.isnan(y)
    sums = _bin_sums(y[known], p[known], np.ones((1, int(known.sum()))), bins)[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"confidence": sums[1] / sums[0], "accuracy": sums[2] / sums[0], "count": sums[0]}


def mean_auroc_replicates(targets: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean AUROC over labels with both classes, for each row of image weights -> (B,) (NaN labels skipped per
    replicate). targets (N, L) with NaN, scores (N, L), weights (B, N)."""
    y, s = np.asarray(targets, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    cols = []
    for j in range(y.shape[1]):
        known = ~np.isnan(y[:, j])
        if 0 < y[known, j].sum() < known.sum():
            cols.append(weighted_auroc(y[known, j], s[known, j], weights[:, known]))
    return _nanmean_rows(np.stack(cols, axis=1)) if cols else np.full(len(weights), np.nan)


def compare_mean_auroc(
    targets: np.ndarray, scores: dict[str, np.ndarray], reference: str, n_boot: int = 1000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Mean AUROC of several score sets on the same images, with percentile bootstrap 95% CIs, and each one's
    paired difference from ``reference`` (the same resampled images for all, so the difference's CI is much
    narrower than the two CIs suggest) -> {name: {auroc_mean, ci95, delta, delta_ci95, p_better}}, where
    ``p_better`` is the share of replicates in which the set beats the reference. Raises KeyError for an
    unknown reference."""
    y = np.asarray(targets, dtype=np.float64)
    rng = np.random.default_rng(seed)
    w = rng.multinomial(len(y), np.full(len(y), 1.0 / len(y)), size=n_boot).astype(np.float64)
    point = {k: float(mean_auroc_replicates(y, s, np.ones((1, len(y))))[0]) for k, s in scores.items()}
    reps = {k: mean_auroc_replicates(y, s, w) for k, s in scores.items()}
    ref = reps[reference]
    out = {}
    for k in scores:
        diff = reps[k] - ref
        out[k] = {"auroc_mean": point[k], "ci95": _ci(reps[k], 0.05), "delta": point[k] - point[reference],
                  "delta_ci95": _ci(diff, 0.05), "p_better": float(np.mean(diff[~np.isnan(diff)] > 0))}  # fmt: skip
    return out


def expected_calibration_error(targets: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """Pooled ECE over all known (image, label) entries (equal-width bins), as ``evaluate_predictions``."""
    y, p = np.asarray(targets, dtype=np.float64).ravel(), np.asarray(probs, dtype=np.float64).ravel()
    known = ~np.isnan(y)
    return float(_ece_from_bins(_bin_sums(y[known], p[known], np.ones((1, int(known.sum()))), bins))[0])
