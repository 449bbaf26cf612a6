"""Threshold tuning, run checks and label matching of the ensemble build and evaluation."""

import json
from pathlib import Path

import numpy as np
import pytest

from cxr.core.errors import InvalidInputError
from training.ensemble_build import (
    Run,
    best_f1_threshold,
    check_runs,
    label_columns,
    read_run,
    tune_thresholds,
    unique_names,
)
from training.evaluate import match_labels, rule_outputs

pytestmark = pytest.mark.unit


def _f1_at(y: np.ndarray, p: np.ndarray, t: float) -> float:
    b = p >= t
    tp, fp, fn = (b & (y == 1)).sum(), (b & (y == 0)).sum(), (~b & (y == 1)).sum()
    return 2 * tp / (2 * tp + fp + fn)


@pytest.mark.parametrize("seed", range(5))
def test_threshold_maximises_positive_f1_against_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = (rng.random(80) < 0.2).astype(float)
    p = np.clip(0.3 * y + 0.7 * rng.random(80), 0, 1).round(2)  # ties
    t, f1 = best_f1_threshold(y, p)
    brute = max(_f1_at(y, p, c) for c in np.unique(p))
    assert f1 == pytest.approx(brute) and _f1_at(y, p, t) == pytest.approx(brute)
    assert 0.0 <= t <= 1.0


def test_threshold_is_a_midpoint_between_scores() -> None:
    y = np.array([1, 1, 0, 0, 1, 0], dtype=float)
    p = np.array([0.9, 0.8, 0.6, 0.4, 0.3, 0.1])
    t, f1 = best_f1_threshold(y, p)  # best: top two (F1 0.8) -> between 0.8 and 0.6
    assert t == pytest.approx(0.7) and f1 == pytest.approx(0.8)


def test_label_without_validation_positives_keeps_half() -> None:
    y = np.array([[0, 1], [0, 0], [np.nan, 1], [0, 0]], dtype=float)
    p = np.array([[0.9, 0.8], [0.2, 0.1], [0.7, 0.2], [0.1, 0.3]])
    t, f1 = tune_thresholds(y, p)
    assert t[0] == 0.5 and np.isnan(f1[0])
    # label 1, known (y, p): (1, .8) (0, .1) (1, .2) (0, .3): best is p >= 0.2 (F1 0.8), midpoint to 0.1
    assert f1[1] == pytest.approx(0.8) and t[1] == pytest.approx(0.15)


def test_unknown_targets_do_not_move_the_threshold() -> None:
    y = np.array([[1], [0], [np.nan], [1]], dtype=float)
    p = np.array([[0.9], [0.2], [0.95], [0.6]])
    assert tune_thresholds(y, p)[0][0] == pytest.approx((0.6 + 0.2) / 2)


def test_unique_names() -> None:
    assert unique_names(["resnet18", "densenet121", "resnet18", "resnet18"]) == [
        "resnet18", "densenet121", "resnet18-2", "resnet18-3",
    ]  # fmt: skip


def _write_run(root: Path, **override: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    record = {"arch": "resnet18", "labels": ["a", "b"], "hidden": 8, "dropout": 0.2,
              "preprocess": {"size": 32, "mean": 0.5, "std": 0.25, "crop": "none"}} | override  # fmt: skip
    (root / "run.json").write_text(json.dumps(record))
    (root / "best.pt").write_bytes(b"")
    return root


def test_read_run_rejects_what_is_not_a_finished_run(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="not a finished training run") as e:
        read_run(tmp_path)  # empty folder
    assert e.value.reason == "BAD_RUN_DIR"
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(InvalidInputError, match="not a finished training run"):
        read_run(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"arch": "resnet18"}))
    with pytest.raises(InvalidInputError, match="labels"):
        read_run(tmp_path)
    run = _write_run(tmp_path / "ok")
    (run / "best.pt").unlink()
    with pytest.raises(InvalidInputError, match="no best.pt"):
        read_run(run)


def test_check_runs_requires_same_labels_and_preprocessing(tmp_path: Path) -> None:
    a = read_run(_write_run(tmp_path / "a"))
    labels, spec = check_runs([a, read_run(_write_run(tmp_path / "b", arch="mobilenet_v3_large"))])
    assert labels == ("a", "b") and spec.size == 32
    other_size = read_run(_write_run(tmp_path / "c", preprocess={"size": 64}))
    other_labels = Run(tmp_path, {**a.record, "labels": ["a", "c"]})
    for bad in (other_size, other_labels):
        with pytest.raises(InvalidInputError, match="differs") as e:
            check_runs([a, bad])
        assert e.value.reason == "RUNS_DIFFER"
    with pytest.raises(InvalidInputError, match="no runs"):
        check_runs([])


def test_label_columns_by_name() -> None:
    assert label_columns(("x", "b", "a"), ("a", "b")).tolist() == [2, 1]
    with pytest.raises(InvalidInputError, match="lacks") as e:
        label_columns(("a",), ("a", "b"))
    assert e.value.reason == "LABEL_MISMATCH"


def test_match_labels_skips_what_the_data_lacks() -> None:
    model_idx, data_idx, skipped = match_labels(
        ["Effusion", "Cardiomegaly", "other"], ["Cardiomegaly", "Mass", "Effusion"]
    )
    assert model_idx == [0, 2] and data_idx == [1, 0] and skipped == ["Mass"]
    with pytest.raises(InvalidInputError, match="none of the ensemble's labels") as e:
        match_labels(["x"], ["a", "b"])
    assert e.value.reason == "NO_LABELS_IN_COMMON"


def test_rule_outputs_use_the_core_rules() -> None:
    probs = np.array([[[0.9, 0.2], [0.6, 0.7], [0.1, 0.8]]])  # 1 image, 3 models, 2 labels
    thresholds, mt = np.array([0.5, 0.6]), np.full((3, 2), 0.5)
    s, d = rule_outputs(probs, "ctp", thresholds, mt)
    assert np.allclose(s, [[1.6 / 3, 1.7 / 3]]) and d.tolist() == [[True, False]]  # 0.567 < 0.6
    s, d = rule_outputs(probs, "ptc_lw", thresholds, mt)
    assert np.allclose(s, [[2 / 3, 2 / 3]]) and d.tolist() == [[True, True]]
    s, d = rule_outputs(probs, "ptc_mode", thresholds, mt)  # three different label sets: the first model's
    assert d.tolist() == [[True, False]] and np.allclose(s, [[1.0, 0.0]])
