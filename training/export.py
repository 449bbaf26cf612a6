"""Validate an ensemble directory and publish it where TorchServe's tooling expects it (model_store/NAME), and
optionally build the TorchServe archive (.mar) from it."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from cxr.core.errors import InvalidInputError, ManifestError
from cxr.core.manifest import Manifest

log = logging.getLogger(__name__)


def validate_ensemble(ensemble_dir: str | Path) -> Manifest:
    """Load the ensemble (manifest, weights, sha256) and run one forward on a blank image.
    -> its manifest. Raises ManifestError when anything is off."""
    from cxr.models.bundle import load_ensemble

    manifest, net = load_ensemble(ensemble_dir)
    size = manifest.preprocess.size
    with torch.inference_mode():
        logits = net(torch.zeros(1, 1, size, size))
    expected = (1, len(manifest.models), len(manifest.labels))
    if tuple(logits.shape) != expected or not torch.isfinite(logits).all():
        raise ManifestError(f"forward gave {tuple(logits.shape)} (expected {expected}) or non-finite logits")
    return manifest


def export_ensemble(
    ensemble_dir: str | Path, out_dir: str | Path, mar_dir: str | Path | None = None, force: bool = False
) -> dict[str, str]:
    """Validate ``ensemble_dir``, copy it to ``out_dir`` and, with ``mar_dir``, build the TorchServe archive
    there (model name "cxr"). -> {"model_dir": ..., "mar": ... (when built)}.
    Raises ManifestError (invalid ensemble), InvalidInputError (OUTPUT_EXISTS: ``out_dir`` exists, not empty,
    and ``force`` is off), OSError."""
    src, dst = Path(ensemble_dir).resolve(), Path(out_dir).resolve()
    manifest = validate_ensemble(src)
    if dst != src:
        if dst.exists() and any(dst.iterdir()):
            if not force:
                raise InvalidInputError(f"{dst} exists and is not empty (use --force)", reason="OUTPUT_EXISTS")
            shutil.rmtree(dst)
        shutil.copytree(src, dst, dirs_exist_ok=True)
    result = {"model_dir": str(dst), "name": manifest.name, "version": manifest.version}
    if mar_dir is not None:
        from cxr.serving.archive import build_archive

        result["mar"] = str(build_archive(dst, Path(mar_dir), model_name="cxr"))
    log.info("exported %s %s to %s", manifest.name, manifest.version, dst)
    return result
