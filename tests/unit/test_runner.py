"""cxr.serving.runner: the server-independent ensemble runner, on a tiny random ensemble and real NIH images."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from serving_fixtures import SIZE, ensemble_dir, nih_inputs

from cxr.core.errors import InvalidInputError, ManifestError
from cxr.core.manifest import read_manifest, write_manifest
from cxr.core.wire import encode_input, encode_npy
from cxr.models.bundle import load_ensemble
from cxr.models.testing import make_random_ensemble
from cxr.serving.runner import EnsembleRunner, error_document

pytestmark = pytest.mark.unit

__all__ = ["ensemble_dir"]  # fixtures used by name


def _raw_npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


@pytest.fixture(scope="module")
def runner(ensemble_dir: Path) -> EnsembleRunner:
    return EnsembleRunner.load(ensemble_dir, "cpu")


def test_predict_equals_direct_forward_and_sigmoid(runner: EnsembleRunner, ensemble_dir: Path) -> None:
    x = nih_inputs(3)
    _, net = load_ensemble(ensemble_dir)
    with torch.no_grad():
        expected = torch.sigmoid(net(torch.from_numpy(x))).numpy()
    got = runner.predict(x)
    assert got.shape == (3, 2, 15) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert not np.allclose(got[0], got[1])  # different radiographs, different answers


def test_decode_request_round_trips_a_real_image(runner: EnsembleRunner) -> None:
    x = nih_inputs(1)[0]
    decoded = runner.decode_request(encode_input(x))
    assert decoded.shape == (1, SIZE, SIZE) and decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, x, rtol=2**-11, atol=0)  # float16 on the wire: half an ulp
    np.testing.assert_array_equal(runner.decode_request(encode_npy(x)), x)  # the legacy npy layout, exact


@pytest.mark.parametrize(
    "blob",
    [
        b"not an npy file at all",
        encode_input(np.zeros((1, 32, 32), np.float32)),  # wrong size for this ensemble
        encode_npy(np.zeros((SIZE, SIZE), np.float32)),  # missing channel axis (legacy npy)
        _raw_npy(np.zeros((1, SIZE, SIZE), np.float64)),  # legacy npy of another dtype
        encode_input(np.full((1, SIZE, SIZE), np.nan, np.float32)),
        encode_input(np.zeros((1, SIZE, SIZE), np.float32))[:-100],  # truncated
    ],
    ids=["garbage", "wrong-size", "no-channel", "npy-float64", "nan", "truncated"],
)
def test_decode_request_rejects_bad_blobs(runner: EnsembleRunner, blob: bytes) -> None:
    with pytest.raises(InvalidInputError) as info:
        runner.decode_request(blob)
    assert info.value.reason == "BAD_MODEL_INPUT"


@pytest.mark.parametrize("shape", [(1, SIZE, SIZE), (2, 1, 32, 32), (0, 1, SIZE, SIZE), (2, 3, SIZE, SIZE)])
def test_predict_rejects_batches_of_the_wrong_shape(runner: EnsembleRunner, shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidInputError) as info:
        runner.predict(np.zeros(shape, np.float32))
    assert info.value.reason == "BAD_MODEL_INPUT"


def test_result_document_follows_the_wire_contract(runner: EnsembleRunner) -> None:
    probs = runner.predict(nih_inputs(1))[0]
    doc = json.loads(json.dumps(runner.result_document(probs)))  # JSON-serialisable as is
    m = runner.manifest
    assert set(doc) == {"model", "labels", "thresholds", "probabilities", "findings"}
    assert doc["model"] == {
        "name": m.name,
        "version": m.version,
        "members": ["resnet18", "mobilenet_v3_large"],
        "ensemble_rule": "ctp",
        "intended_use": m.intended_use,
    }
    assert "NOT FOR CLINICAL USE" in doc["model"]["intended_use"]
    assert doc["labels"] == list(m.labels) and doc["thresholds"] == list(m.thresholds)
    np.testing.assert_allclose(doc["probabilities"], probs, atol=1e-7)
    assert [f["label"] for f in doc["findings"]] == list(m.labels)
    for j, f in enumerate(doc["findings"]):
        assert set(f) == {"label", "probability", "model_probabilities", "votes", "n_models", "threshold", "positive"}
        assert f["probability"] == pytest.approx(float(probs[:, j].mean()), abs=1e-6)
        assert f["model_probabilities"] == pytest.approx({"resnet18": probs[0, j], "mobilenet_v3_large": probs[1, j]})
        assert f["votes"] == int((probs[:, j] >= 0.5).sum()) and f["n_models"] == 2
        assert f["positive"] == (f["probability"] >= f["threshold"])


def test_result_document_uses_each_models_own_thresholds(tmp_path: Path, ensemble_dir: Path) -> None:
    manifest = read_manifest(ensemble_dir)
    n = len(manifest.labels)
    always, never = tuple(0.0 for _ in range(n)), tuple(1.0 for _ in range(n))
    models = (replace(manifest.models[0], thresholds=always), replace(manifest.models[1], thresholds=never))
    for entry in manifest.models:
        (tmp_path / entry.weights).symlink_to(ensemble_dir / entry.weights)
    write_manifest(tmp_path, replace(manifest, models=models))
    runner = EnsembleRunner.load(tmp_path)
    doc = runner.result_document(runner.predict(nih_inputs(1))[0])
    assert [f["votes"] for f in doc["findings"]] == [1] * n  # model 0 always votes yes, model 1 never


def test_result_document_rejects_probabilities_of_the_wrong_shape(runner: EnsembleRunner) -> None:
    with pytest.raises(ValueError, match="do not match"):
        runner.result_document(np.zeros((3, 15), np.float32))


def test_load_rejects_a_folder_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError):
        EnsembleRunner.load(tmp_path)


def test_load_rejects_corrupted_weights(tmp_path: Path) -> None:
    make_random_ensemble(tmp_path, archs=("resnet18",), size=SIZE)
    weights = tmp_path / "resnet18.pt"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ManifestError, match="sha256"):
        EnsembleRunner.load(tmp_path)


def test_error_document_carries_reason_and_message() -> None:
    doc = error_document(InvalidInputError("bad pixels", reason="BAD_MODEL_INPUT"))
    assert doc == {"error": {"reason": "BAD_MODEL_INPUT", "message": "bad pixels"}}
