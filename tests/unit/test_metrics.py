"""Metrics against sklearn, the paper's F1 definition, bootstrap CIs and calibration."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, hamming_loss, roc_auc_score

from training.metrics import (
    OVERALL_KEYS,
    evaluate_predictions,
    mean_auroc,
    reliability_bins,
    weighted_auroc,
)

pytestmark = pytest.mark.unit
LABELS = ["a", "b", "c", "d"]


def _data(n: int = 240, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets with unknowns, scores rounded to 2 decimals (ties), decisions at 0.5."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 4)) < [0.1, 0.3, 0.5, 0.2]).astype(np.float64)
    s = np.clip(0.35 * y + 0.65 * rng.random((n, 4)), 0, 1).round(2)
    y[rng.random((n, 4)) < 0.1] = np.nan
    return y, s, s >= 0.5


def test_per_label_metrics_match_sklearn_with_unknowns_masked() -> None:
    y, s, b = _data()
    r = evaluate_predictions(y, s, b, LABELS, n_boot=0)
    for j, lab in enumerate(LABELS):
        k = ~np.isnan(y[:, j])
        got = r["per_label"][lab]
        assert got["auroc"] == pytest.approx(roc_auc_score(y[k, j], s[k, j]), abs=1e-12)
        assert got["auprc"] == pytest.approx(average_precision_score(y[k, j], s[k, j]), abs=1e-12)
        assert got["f1_positive"] == pytest.approx(f1_score(y[k, j], b[k, j]), abs=1e-12)
        assert got["f1_negative"] == pytest.approx(f1_score(y[k, j], b[k, j], pos_label=0), abs=1e-12)
        assert got["hamming"] == pytest.approx(hamming_loss(y[k, j], b[k, j]), abs=1e-12)
        assert got["n_pos"] + got["n_neg"] == k.sum()


def test_overall_metrics_follow_the_paper_definitions() -> None:
    y, s, b = _data(seed=1)
    r = evaluate_predictions(y, s, b, LABELS, n_boot=0)
    per = r["per_label"]
    assert r["auroc_mean"] == pytest.approx(np.mean([per[lab]["auroc"] for lab in LABELS]))
    assert r["f1_paper_mean_pos_neg"] == pytest.approx(
        np.mean([(per[lab]["f1_positive"] + per[lab]["f1_negative"]) / 2 for lab in LABELS])
    )
    known = ~np.isnan(y)
    assert r["hamming_loss"] == pytest.approx(((b != (y == 1)) & known).sum() / known.sum())


def test_hamming_equals_sklearn_multilabel_without_unknowns() -> None:
    y, s, b = _data(seed=2)
    y = np.nan_to_num(y)
    assert evaluate_predictions(y, s, b, LABELS, n_boot=0)["hamming_loss"] == pytest.approx(hamming_loss(y, b))


def test_never_positive_model_reproduces_paper_style_f1() -> None:
    y, s, _ = _data(seed=3)
    r = evaluate_predictions(y, s, np.zeros_like(s, dtype=bool), LABELS, n_boot=0)
    assert r["f1_positive_mean"] == 0.0
    assert r["f1_paper_mean_pos_neg"] > 0.3  # half of a high negative-class F1


def test_single_class_label_is_excluded_from_the_auroc_mean_and_reported() -> None:
    y, s, b = _data(seed=4)
    y[:, 2] = np.where(np.isnan(y[:, 2]), np.nan, 0.0)
    r = evaluate_predictions(y, s, b, LABELS, n_boot=50)
    assert r["per_label"]["c"]["auroc"] is None and r["auroc_excluded_labels"] == ["c"]
    assert r["auroc_mean"] == pytest.approx(np.mean([r["per_label"][lab]["auroc"] for lab in "abd"]))


def test_bootstrap_cis_contain_the_point_estimate_and_are_seeded() -> None:
    y, s, b = _data(seed=5)
    r = evaluate_predictions(y, s, b, LABELS, n_boot=300, seed=7)
    for key in OVERALL_KEYS:
        lo, hi = r["ci95"][key]
        assert lo < r[key] < hi, key
    for lab in LABELS:
        lo, hi = r["per_label"][lab]["ci95"]["auroc"]
        assert lo <= r["per_label"][lab]["auroc"] <= hi
    assert evaluate_predictions(y, s, b, LABELS, n_boot=300, seed=7)["ci95"] == r["ci95"]
    assert evaluate_predictions(y, s, b, LABELS, n_boot=300, seed=8)["ci95"] != r["ci95"]


def test_bootstrap_ci_narrows_with_more_images() -> None:
    y1, s1, b1 = _data(n=100, seed=6)
    y2, s2, b2 = _data(n=2000, seed=6)
    w1 = np.diff(evaluate_predictions(y1, s1, b1, LABELS, n_boot=200)["ci95"]["auroc_mean"])[0]
    w2 = np.diff(evaluate_predictions(y2, s2, b2, LABELS, n_boot=200)["ci95"]["auroc_mean"])[0]
    assert w2 < w1 / 2


def test_weighted_auroc_equals_auroc_of_the_resampled_rows() -> None:
    y, s, _ = _data(n=60, seed=8)
    yk, sk = np.nan_to_num(y[:, 1]), s[:, 1]
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 60, 60)
    counts = np.bincount(idx, minlength=60).astype(np.float64)
    assert weighted_auroc(yk, sk, counts[None])[0] == pytest.approx(roc_auc_score(yk[idx], sk[idx]), abs=1e-12)


def test_ece_small_when_calibrated_large_when_overconfident() -> None:
    rng = np.random.default_rng(9)
    p = rng.random((20000, 1))
    y = (rng.random((20000, 1)) < p).astype(np.float64)
    calibrated = evaluate_predictions(y, p, p >= 0.5, ["x"], n_boot=0)["ece"]
    over = np.where(p >= 0.5, 1.0, 0.0)  # says 0 or 1, is right ~75 % of the time
    overconfident = evaluate_predictions(y, over, over >= 0.5, ["x"], n_boot=0)["ece"]
    assert calibrated < 0.02
    assert overconfident == pytest.approx(0.25, abs=0.02)


def test_ece_hand_computed() -> None:
    y = np.array([[1.0], [0.0], [1.0], [1.0]])
    p = np.array([[0.9], [0.9], [0.1], [0.1]])  # bin of 0.9: acc 0.5; bin of 0.1: acc 1.0
    ece = evaluate_predictions(y, p, p >= 0.5, ["x"], n_boot=0)["ece"]
    assert ece == pytest.approx(0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.1))
    bins = reliability_bins(y, p)
    assert bins["count"].sum() == 4 and bins["accuracy"][13] == 0.5 and bins["confidence"][1] == pytest.approx(0.1)


def test_mean_auroc_for_monitoring() -> None:
    y, s, _ = _data(seed=10)
    r = evaluate_predictions(y, s, s >= 0.5, LABELS, n_boot=0)
    assert mean_auroc(y, s) == pytest.approx(r["auroc_mean"])
    assert np.isnan(mean_auroc(np.zeros((5, 2)), np.random.default_rng(0).random((5, 2))))


def test_bad_inputs_raise() -> None:
    y, s, b = _data()
    with pytest.raises(ValueError, match="differ"):
        evaluate_predictions(y, s[:, :3], b, LABELS)
    with pytest.raises(ValueError, match="differ"):
        evaluate_predictions(y, s, b, LABELS[:3])
    with pytest.raises(ValueError, match="no images"):
        evaluate_predictions(y[:0], s[:0], b[:0], LABELS)


def test_label_with_no_known_targets_is_undefined_not_a_crash() -> None:
    y, s, b = _data(seed=11)
    y[:, 3] = np.nan
    r = evaluate_predictions(y, s, b, LABELS, n_boot=20)
    assert r["per_label"]["d"]["auroc"] is None and r["per_label"]["d"]["f1_positive"] is None
    assert r["f1_positive_mean"] == pytest.approx(np.mean([r["per_label"][lab]["f1_positive"] for lab in "abc"]))
