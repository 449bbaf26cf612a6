"""Evaluate an ensemble directory on labelled data: every model alone and every ensemble rule of the paper.

- model alone: its probability; decisions against its own vote thresholds (the ensemble's when it has none);
- ``ctp``: mean probability, ensemble thresholds;
- ``ptc_lw`` / ``ptc_mode``: decisions from ``cxr.core.ensemble``; their AUROC / AUPRC / ECE use
  ``cxr.core.ensemble.ensemble_scores`` (vote fraction / 0-1 label set), which is all the ranking they keep.

Labels are matched to the ensemble's labels by name; ensemble labels the data lacks are skipped and reported.
Imports nothing beyond torch / numpy / the project's core (matplotlib lazily, for the figures).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxr import NOT_FOR_CLINICAL_USE
from cxr.core import ensemble as ens
from cxr.core.errors import InvalidInputError
from cxr.core.manifest import Manifest
from training.metrics import evaluate_predictions

log = logging.getLogger(__name__)

RULES = ("ctp", "ptc_lw", "ptc_mode")


def match_labels(data_labels: Sequence[str], model_labels: Sequence[str]) -> tuple[list[int], list[int], list[str]]:
    """-> (ensemble label indices, data column indices, ensemble labels the data lacks). Raises InvalidInputError
    (NO_LABELS_IN_COMMON) when nothing matches."""
    model_idx, data_idx, skipped = [], [], []
    for j, lab in enumerate(model_labels):
        if lab in data_labels:
            model_idx.append(j)
            data_idx.append(list(data_labels).index(lab))
        else:
            skipped.append(lab)
    if not model_idx:
        raise InvalidInputError(f"the data has none of the ensemble's labels {list(model_labels)}",
                                reason="NO_LABELS_IN_COMMON")  # fmt: skip
    return model_idx, data_idx, skipped


def rule_outputs(
    probs: np.ndarray, rule: str, thresholds: np.ndarray, model_thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(N, M, L) probabilities -> (scores (N, L), decisions (N, L) bool) of one ensemble rule."""
    scores = ens.ensemble_scores(probs, rule, model_thresholds)
    if rule == "ctp":
        return scores, ens.binarize(scores, thresholds)
    if rule == "ptc_lw":
        return scores, ens.ptc_label_wise(probs, model_thresholds)
    return scores, ens.ptc_mode(probs, model_thresholds)


def score_all(
    y: np.ndarray, probs: np.ndarray, manifest: Manifest, label_idx: Sequence[int], n_boot: int, seed: int
) -> dict[str, Any]:
    """Metrics of every model and every rule -> {"models": {name: metrics}, "ensembles": {rule: metrics}}."""
    labels = [manifest.labels[j] for j in label_idx]
    thresholds = np.asarray(manifest.thresholds, dtype=np.float32)[label_idx]
    mt = np.array([manifest.model_thresholds(n) for n in manifest.model_names], dtype=np.float32)[:, label_idx]
    models = {}
    for i, name in enumerate(manifest.model_names):
        p = probs[:, i]
        models[name] = evaluate_predictions(y, p, p >= mt[i], labels, n_boot, seed)
    ensembles = {}
    for rule in RULES:
        scores, decisions = rule_outputs(probs, rule, thresholds, mt)
        ensembles[rule] = evaluate_predictions(y, scores, decisions, labels, n_boot, seed)
    return {"models": models, "ensembles": ensembles}


def calibration_effect(y: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, manifest: Manifest) -> dict[str, Any]:
    """Pooled ECE of every model and of CTP with plain sigmoid probabilities (``before``) and with the manifest's
    calibration (``after``, what is served and what every other metric of the report uses)."""
    from training.metrics import expected_calibration_error

    pairs = {n: (raw[:, i], calibrated[:, i]) for i, n in enumerate(manifest.model_names)}
    pairs["ctp"] = (ens.ctp_mean(raw), ens.ctp_mean(calibrated))
    ece = {n: {"before": expected_calibration_error(y, b), "after": expected_calibration_error(y, a)}
           for n, (b, a) in pairs.items()}  # fmt: skip
    return {"method": manifest.calibration, "ece": ece}


def evaluate_ensemble(
    model_dir: str | Path,
    data: str | Path,
    split: str | Path | None = None,
    part: str = "test",
    out_dir: str | Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 64,
    workers: int = 2,
) -> dict[str, Any]:
    """Evaluate ``model_dir`` on ``data`` (optionally one part of a split) -> report dict (JSON-ready); with
    ``out_dir``, also report.json, report.md and ROC / PR / reliability PNGs there.
    Raises ManifestError (bad ensemble), InvalidInputError (no common labels, empty data), OSError."""
    from cxr.models.bundle import load_ensemble, logits_to_probabilities
    from training.data.load import load_dataset
    from training.distributed import pick_device
    from training.ensemble_build import predict_logits

    dev = pick_device(device)
    manifest, net = load_ensemble(model_dir, dev)
    ds = load_dataset(Path(data))
    if split is not None:
        from training.splits import Split

        ds = ds.subset(Split.load(Path(split)).indices(ds, part))
    if len(ds) == 0:
        raise InvalidInputError(f"no images to evaluate in {data} ({part} part)", reason="EMPTY_SPLIT_PART")
    model_idx, data_idx, skipped = match_labels(ds.label_names, manifest.labels)
    logits = predict_logits(list(net.members), ds, manifest.preprocess, dev, batch_size, workers)
    probs = logits_to_probabilities(manifest, logits)[:, :, model_idx]
    y = ds.labels[:, data_idx]
    report: dict[str, Any] = {
        "n_images": len(ds), "labels": [manifest.labels[j] for j in model_idx], "skipped_labels": skipped,
        **score_all(y, probs, manifest, model_idx, n_boot, seed),
        "model": {"name": manifest.name, "version": manifest.version, "dir": str(model_dir),
                  "threshold_criterion": manifest.threshold_criterion},
        "data": {"path": str(data), "split": None if split is None else str(split),
                 "part": part if split is not None else "all"},
        "n_boot": n_boot, "intended_use": NOT_FOR_CLINICAL_USE,
        "calibration": calibration_effect(y, ens.sigmoid(logits)[:, :, model_idx], probs, manifest),
    }  # fmt: skip
    if out_dir is not None:
        from training.report import write_report

        write_report(report, y, probs, manifest.model_names, out_dir)
    return report
