"""services/inference/handler.py driven like TorchServe drives it, with a small mock context (no server)."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from serving_fixtures import ensemble_dir, nih_blobs

from cxr.core.errors import ManifestError
from cxr.core.wire import encode_input, encode_npy
from cxr.models.bundle import load_ensemble
from cxr.serving.runner import EnsembleRunner
from services.inference import handler as handler_module
from services.inference.handler import CxrEnsembleHandler

pytestmark = pytest.mark.unit

__all__ = ["ensemble_dir"]  # fixtures used by name


class MockContext:
    """The parts of ts.context.Context the handler uses."""

    def __init__(self, model_dir: Path, gpu_id: int | None = None) -> None:
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": gpu_id, "batch_size": 8}
        self.manifest = {"model": {"modelName": "cxr", "handler": "handler.py"}}
        self.statuses: dict[int, tuple[int, str]] = {}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)


@pytest.fixture(scope="module")
def handler(ensemble_dir: Path) -> CxrEnsembleHandler:
    h = CxrEnsembleHandler()
    h.initialize(MockContext(ensemble_dir))
    return h


@pytest.fixture(scope="module")
def runner(ensemble_dir: Path) -> EnsembleRunner:
    return EnsembleRunner.load(ensemble_dir)


def test_batch_of_good_requests_gets_one_result_each_in_order(
    handler: CxrEnsembleHandler, runner: EnsembleRunner
) -> None:
    blobs = nih_blobs(4)
    ctx = MockContext(Path("unused"))
    results = handler.handle([{"data": bytearray(b)} for b in blobs], ctx)
    assert len(results) == 4 and ctx.statuses == {}
    for blob, result in zip(blobs, results, strict=True):
        alone = runner.predict(runner.decode_request(blob)[None])[0]  # the same image on its own
        doc = json.loads(result)
        np.testing.assert_allclose(doc["probabilities"], alone, atol=1e-5)
        assert doc["labels"] == list(runner.manifest.labels)
        assert doc["findings"][0]["probability"] == pytest.approx(float(alone[:, 0].mean()), abs=1e-5)


def test_probabilities_equal_direct_ensemble_forward(handler: CxrEnsembleHandler, ensemble_dir: Path) -> None:
    blobs = nih_blobs(2)
    _, net = load_ensemble(ensemble_dir)
    x = torch.from_numpy(np.stack([handler._runner().decode_request(b) for b in blobs]))
    with torch.no_grad():
        expected = torch.sigmoid(net(x)).numpy()
    docs = [json.loads(r) for r in handler.handle([{"data": b} for b in blobs], MockContext(Path("unused")))]
    np.testing.assert_allclose([d["probabilities"] for d in docs], expected, atol=1e-6)


def test_bad_request_gets_its_error_while_the_others_succeed(
    handler: CxrEnsembleHandler, runner: EnsembleRunner
) -> None:
    good = nih_blobs(2)
    wrong_size = encode_input(np.zeros((1, 32, 32), np.float32))
    requests: list[dict[str, Any]] = [
        {"data": good[0]},
        {"data": b"\x93NUMPY garbage"},
        {"other": good[1]},  # no data entry
        {"data": wrong_size},
        {"data": "a string, not bytes"},
        {"data": good[1]},
    ]
    ctx = MockContext(Path("unused"))
    docs = [json.loads(r) for r in handler.handle(requests, ctx)]
    assert len(docs) == len(requests)
    for i in (1, 2, 3, 4):
        assert set(docs[i]) == {"error"} and docs[i]["error"]["reason"] == "BAD_MODEL_INPUT", docs[i]
        assert docs[i]["error"]["message"]
        assert ctx.statuses[i] == (400, "BAD_MODEL_INPUT")
    assert set(ctx.statuses) == {1, 2, 3, 4}
    for i, blob in ((0, good[0]), (5, good[1])):
        alone = runner.predict(runner.decode_request(blob)[None])[0]
        np.testing.assert_allclose(docs[i]["probabilities"], alone, atol=1e-5)


def test_batch_of_only_bad_requests_is_answered_without_inference(handler: CxrEnsembleHandler) -> None:
    ctx = MockContext(Path("unused"))
    batch, errors = handler.preprocess([{"data": b"junk"}, {}])
    assert batch is None and handler.inference(batch) is None
    results = handler.handle([{"data": b"junk"}, {}], ctx)
    assert [json.loads(r)["error"]["reason"] for r in results] == ["BAD_MODEL_INPUT"] * 2
    assert len(errors) == 2 and all(e is not None for e in errors)


def test_http_body_entry_is_accepted(handler: CxrEnsembleHandler) -> None:
    (blob,) = nih_blobs(1)
    (result,) = handler.handle([{"body": blob}], MockContext(Path("unused")))
    assert "probabilities" in json.loads(result)


def test_empty_batch_gives_no_results(handler: CxrEnsembleHandler) -> None:
    assert handler.handle([], MockContext(Path("unused"))) == []


def test_handle_before_initialize_fails_clearly() -> None:
    with pytest.raises(RuntimeError, match="before initialize"):
        CxrEnsembleHandler().handle([{"data": b"x"}], MockContext(Path("unused")))


def test_initialize_without_a_bundle_fails(tmp_path: Path) -> None:
    with pytest.raises(ManifestError):
        CxrEnsembleHandler().initialize(MockContext(tmp_path))


def test_gpu_id_falls_back_to_cpu_without_cuda(ensemble_dir: Path) -> None:
    h = CxrEnsembleHandler()
    h.initialize(MockContext(ensemble_dir, gpu_id=0))
    assert h.runner is not None and h.initialized
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert str(h.runner.device) == expected


def test_torch_threads_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, ensemble_dir: Path) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("CXR_TORCH_THREADS", "1")
        CxrEnsembleHandler().initialize(MockContext(ensemble_dir))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    for bad in ("zero", "0"):
        monkeypatch.setenv("CXR_TORCH_THREADS", bad)
        with pytest.raises(ValueError):
            CxrEnsembleHandler().initialize(MockContext(ensemble_dir))


def test_module_satisfies_torchserve_loader_rules() -> None:
    # ts.model_loader instantiates the only class defined in the handler module
    own = [c for _, c in inspect.getmembers(handler_module, inspect.isclass) if c.__module__ == handler_module.__name__]
    assert own == [CxrEnsembleHandler]
    assert callable(CxrEnsembleHandler().handle)
    # the GPU check machine has no TorchServe: nothing may be imported from ``ts``
    tree = ast.parse(Path(handler_module.__file__ or "").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "ts" not in imported and "cxr" in imported


def test_wire_layout_errors_are_answered_per_request(handler: CxrEnsembleHandler) -> None:
    good = nih_blobs(1)[0]
    wrong_version = good[:4] + bytes([9]) + good[5:]
    wrong_dtype = good[:5] + bytes([3]) + good[6:]
    requests: list[dict[str, Any]] = [
        {"data": good[:-2]},  # one float16 pixel short
        {"data": wrong_version},
        {"data": wrong_dtype},
        {"data": encode_npy(handler._runner().decode_request(good))},  # legacy npy: still served
        {"data": good},
    ]
    ctx = MockContext(Path("unused"))
    docs = [json.loads(r) for r in handler.handle(requests, ctx)]
    messages = [docs[i]["error"]["message"] for i in range(3)]
    assert "bytes, got" in messages[0] and "version 9" in messages[1] and "dtype code 3" in messages[2]
    assert ctx.statuses == {i: (400, "BAD_MODEL_INPUT") for i in range(3)}
    np.testing.assert_allclose(docs[3]["probabilities"], docs[4]["probabilities"], atol=1e-6)


def test_answers_are_compact_json(handler: CxrEnsembleHandler) -> None:
    (answer,) = handler.handle([{"data": nih_blobs(1)[0]}], MockContext(Path("unused")))
    document = json.loads(answer)
    assert document["findings"] and answer == json.dumps(document, separators=(",", ":"))  # no padding spaces
    assert len(answer) < len(json.dumps(document))
