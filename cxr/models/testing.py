"""Small randomly initialised ensembles for tests and benchmarks of the plumbing (never for predictions)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from cxr.core.labels import NIH_CXR14
from cxr.core.manifest import Manifest, ModelEntry
from cxr.core.preprocess import PreprocessSpec
from cxr.models.architectures import build_model
from cxr.models.bundle import save_ensemble


def make_random_ensemble(
    out_dir: str | Path,
    archs: Sequence[str] = ("resnet18", "mobilenet_v3_large"),
    labels: Sequence[str] = NIH_CXR14,
    size: int = 64,
    seed: int = 0,
    hidden: int = 64,
    name: str = "cxr-random-test",
    version: str = "0.0.0-random",
) -> Manifest:
    """Write an ensemble of untrained models (seeded) to ``out_dir`` and return its manifest."""
    torch.manual_seed(seed)
    members = [build_model(a, len(labels), hidden=hidden) for a in archs]
    entries = tuple(ModelEntry(name=f"{a}", arch=a, weights=f"{a}.pt", hidden=hidden) for a in archs)
    manifest = Manifest(
        name=name,
        version=version,
        labels=tuple(labels),
        thresholds=tuple(0.5 for _ in labels),
        models=entries,
        preprocess=PreprocessSpec(size=size),
        description="Randomly initialised, for tests only. Predictions are meaningless.",
        trained_on="nothing (random weights)",
    )
    return save_ensemble(out_dir, manifest, members)
