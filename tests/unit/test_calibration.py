"""Calibration: fitted on validation logits, stored per model and label in the manifest, applied identically by
serving (the runner) and evaluation; monotone, so rankings do not move."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cxr.core.calibration import calibrate_logits, calibrated_probabilities
from cxr.core.ensemble import sigmoid
from cxr.core.errors import ManifestError
from cxr.core.manifest import Manifest, ModelEntry, read_manifest, write_manifest
from cxr.models.bundle import logits_to_probabilities
from training.calibration import MIN_PER_CLASS, fit_calibration, fit_temperature, offsets_from_pos_weight
from training.metrics import expected_calibration_error

pytestmark = pytest.mark.unit


def _synthetic(n: int, true_t: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits that are ``true_t`` times too confident: y ~ Bernoulli(sigmoid(z / true_t))."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, n)
    y = (rng.random(n) < sigmoid(z / true_t)).astype(np.float64)
    return z, y


def test_temperature_scaling_recovers_a_known_temperature_and_lowers_ece() -> None:
    z, y = _synthetic(20_000, true_t=2.5)
    t = fit_temperature(z, y)
    assert t == pytest.approx(2.5, rel=0.06)
    assert expected_calibration_error(y[:, None], sigmoid(z / t)[:, None]) < 0.5 * expected_calibration_error(
        y[:, None], sigmoid(z)[:, None]
    )
    assert fit_temperature(z, np.zeros_like(z)) == 1.0  # one class only: nothing to fit


def test_the_offset_undoes_the_positive_weight_of_weighted_bce() -> None:
    # weighted BCE with weight w is minimised by logit = log(w p / (1 - p)); subtracting log(w) gives log-odds
    p, w = 0.1, 9.0
    z = np.log(w * p / (1 - p))
    (b,) = offsets_from_pos_weight([w], 1)
    assert float(sigmoid(calibrate_logits(np.array([z]), [b], None))[0]) == pytest.approx(p, rel=1e-5)
    assert offsets_from_pos_weight(None, 3) == (0.0, 0.0, 0.0)


def test_labels_get_their_own_temperature_only_with_enough_examples() -> None:
    rng = np.random.default_rng(1)
    n = 4 * MIN_PER_CLASS
    logits = rng.normal(0, 2, (n, 2))
    y = np.stack([np.arange(n) % 2, (np.arange(n) < MIN_PER_CLASS - 1)], axis=1).astype(np.float64)  # 2nd: few
    y[0, 0] = np.nan  # unknown targets are ignored
    cal = fit_calibration(logits, y, (0.0, 0.0))
    assert cal.own_temperature == (True, False)
    assert cal.temperature[1] == pytest.approx(fit_temperature(logits[~np.isnan(y)], y[~np.isnan(y)]), rel=1e-6)


def test_calibration_is_monotone_per_label() -> None:
    z = np.linspace(-5, 5, 50)[:, None, None].repeat(2, axis=1).repeat(3, axis=2)  # (N, M=2, L=3)
    p = calibrated_probabilities(z, [(0.1, 2.0, -1.0), None], [(0.5, 1.0, 3.0), None])
    assert np.all(np.diff(p, axis=0) >= 0)
    np.testing.assert_allclose(p[:, 1], sigmoid(z[:, 1]), rtol=1e-6)  # None: plain sigmoid
    with pytest.raises(ValueError, match="models"):
        calibrated_probabilities(z, [None], [None])


def _manifest(**entry: object) -> Manifest:
    m = ModelEntry("m", "resnet18", "m.pt", **entry)  # type: ignore[arg-type]
    return Manifest(name="t", version="1", labels=("a", "b"), thresholds=(0.5, 0.5), models=(m,))


def test_manifest_carries_calibration_and_reads_bundles_without_it(tmp_path: Path) -> None:
    m = _manifest(logit_offset=(1.0, 2.0), temperature=(1.5, 0.8), input_norm="tf")
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m
    old = json.loads((tmp_path / "manifest.json").read_text())
    for key in ("logit_offset", "temperature", "input_norm"):
        old["models"][0].pop(key)
    old.pop("calibration")
    old_m = Manifest.from_dict(old)
    assert old_m.models[0].temperature is None and old_m.models[0].input_norm == "spec"
    logits = np.array([[[0.3, -1.2]]])
    np.testing.assert_allclose(logits_to_probabilities(old_m, logits), sigmoid(logits), rtol=1e-6)
    np.testing.assert_allclose(
        logits_to_probabilities(m, logits)[0, 0], sigmoid((logits[0, 0] - [1.0, 2.0]) / [1.5, 0.8]), rtol=1e-6
    )


@pytest.mark.parametrize(
    "entry, match",
    [({"temperature": (1.0,)}, "1 values of temperature"), ({"temperature": (1.0, 0.0)}, "positive"),
     ({"logit_offset": (1.0, 2.0, 3.0)}, "3 values of logit_offset")],
)  # fmt: skip
def test_manifest_rejects_bad_calibration(entry: dict, match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        _manifest(**entry)


def test_the_runner_serves_calibrated_probabilities(tmp_path: Path) -> None:
    from dataclasses import replace

    from cxr.core.manifest import write_manifest
    from cxr.models.testing import make_random_ensemble
    from cxr.serving.runner import EnsembleRunner

    manifest = make_random_ensemble(tmp_path, archs=("resnet18",), size=32)
    x = np.random.default_rng(0).normal(size=(2, 1, 32, 32)).astype(np.float32)
    plain = EnsembleRunner.load(tmp_path).predict(x)
    n = len(manifest.labels)
    entry = replace(manifest.models[0], logit_offset=(0.7,) * n, temperature=(2.0,) * n)
    write_manifest(tmp_path, replace(manifest, models=(entry,)))
    runner = EnsembleRunner.load(tmp_path)
    logits = np.log(plain) - np.log1p(-plain)
    np.testing.assert_allclose(runner.predict(x), sigmoid((logits - 0.7) / 2.0), rtol=1e-4, atol=1e-6)
