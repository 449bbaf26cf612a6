"""Ensemble maths of the paper (cxr.core.ensemble) on hand-checked arrays."""

import numpy as np
import pytest

from cxr.core import ensemble as ens

pytestmark = pytest.mark.unit


def test_sigmoid_matches_definition_and_does_not_overflow() -> None:
    x = np.array([-1000.0, -2.0, 0.0, 2.0, 1000.0])
    got = ens.sigmoid(x)
    assert np.allclose(got[1:4], 1 / (1 + np.exp(-x[1:4])), atol=1e-6)
    assert got[0] == 0.0 and got[-1] == 1.0 and np.isfinite(got).all()


def test_ctp_is_mean_over_models() -> None:
    p = np.array([[0.2, 0.9], [0.4, 0.5], [0.9, 0.1]])  # 3 models x 2 labels
    assert np.allclose(ens.ctp_mean(p), [0.5, 0.5])
    batch = np.stack([p, 1 - p])  # (N=2, M=3, L=2)
    assert np.allclose(ens.ctp_mean(batch), [[0.5, 0.5], [0.5, 0.5]])


def test_votes_count_models_at_or_above_their_threshold() -> None:
    p = np.array([[0.5, 0.1], [0.49, 0.9], [0.7, 0.95]])
    assert ens.votes(p, np.array([0.5, 0.9])).tolist() == [2, 2]
    per_model = np.array([[0.6, 0.5], [0.4, 0.5], [0.8, 0.5]])  # (M, L) thresholds
    assert ens.votes(p, per_model).tolist() == [1, 2]


def test_ptc_label_wise_majority_and_tie() -> None:
    p = np.array([[0.9, 0.9], [0.9, 0.1], [0.1, 0.1], [0.1, 0.1]])  # 4 models
    assert ens.ptc_label_wise(p, np.full(2, 0.5)).tolist() == [True, False]  # 2 of 4 ties -> positive


def test_ptc_mode_picks_most_frequent_label_set() -> None:
    p = np.array([[0.9, 0.1, 0.9], [0.9, 0.1, 0.9], [0.1, 0.9, 0.1]])
    assert ens.ptc_mode(p, np.full(3, 0.5)).tolist() == [True, False, True]
    batch = np.stack([p, p[::-1]])
    assert ens.ptc_mode(batch, np.full(3, 0.5)).shape == (2, 3)


def test_ensemble_scores_rules() -> None:
    p = np.array([[[0.8, 0.2], [0.6, 0.4]]])
    assert np.allclose(ens.ensemble_scores(p, "ctp", np.full(2, 0.5)), [[0.7, 0.3]])
    assert np.allclose(ens.ensemble_scores(p, "ptc_lw", np.full(2, 0.5)), [[1.0, 0.0]])
    with pytest.raises(ValueError, match="unknown ensemble rule"):
        ens.ensemble_scores(p, "median", np.full(2, 0.5))


def test_findings_for_image_one_per_label_with_agreement() -> None:
    p = np.array([[0.9, 0.2], [0.7, 0.6], [0.2, 0.1]])
    found = ens.findings_for_image(["a", "b"], ["m1", "m2", "m3"], p, [0.5, 0.5])
    assert [f.label for f in found] == ["a", "b"]
    a, b = found
    assert a.probability == pytest.approx(0.6) and a.votes == 2 and a.positive
    assert a.model_probabilities == {"m1": pytest.approx(0.9), "m2": pytest.approx(0.7), "m3": pytest.approx(0.2)}
    assert a.agreement_text == "2 of 3 models"
    assert b.probability == pytest.approx(0.3) and b.votes == 1 and not b.positive


def test_findings_for_image_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="do not match"):
        ens.findings_for_image(["a"], ["m1", "m2"], np.zeros((3, 1)), [0.5])
