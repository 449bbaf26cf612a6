"""Shared by the inference tests (test_runner.py, test_handler.py): real NIH radiographs preprocessed like the
ingestion service does, and a tiny random two-model ensemble at 64 px (never downloaded weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxr.core.preprocess import PreprocessSpec, load_image_file, prepare_image
from cxr.core.wire import encode_input
from cxr.models.testing import make_random_ensemble

REPO = Path(__file__).resolve().parents[2]
NIH_IMAGES = REPO.parent / "shared" / "data" / "nih-cxr14-621" / "images_512"
SIZE = 64


def nih_inputs(n: int, size: int = SIZE) -> np.ndarray:
    """The first ``n`` real NIH radiographs, preprocessed like the ingestion service does: (n, 1, S, S)."""
    spec = PreprocessSpec(size=size)
    paths = sorted(NIH_IMAGES.glob("*.png"))[:n]
    assert len(paths) == n, f"expected {n} images in {NIH_IMAGES}"
    return np.stack([prepare_image(load_image_file(p), spec) for p in paths])


def nih_blobs(n: int) -> list[bytes]:
    """The first ``n`` real NIH radiographs in the wire format."""
    return [encode_input(x) for x in nih_inputs(n)]


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ensemble")
    make_random_ensemble(out, archs=("resnet18", "mobilenet_v3_large"), size=SIZE)
    return out
