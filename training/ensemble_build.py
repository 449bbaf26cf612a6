"""Combine trained runs into the served ensemble bundle, with per-label thresholds tuned on validation.

Calibration first (``training.calibration``): each model's logit offset (log of its training run's positive
weight) and temperature (fitted on the validation split) go into the manifest; every probability below, and every
probability served, is calibrated.

Threshold criterion: for each label, the threshold on the calibrated ensemble (CTP) probability that maximises the
positive-class F1 on the validation split; the value written is the midpoint between the chosen score and the
next lower distinct score (same validation decisions, a margin on both sides). Labels without validation
positives keep 0.5. Optionally each model gets its own thresholds for its vote, by the same criterion on its
own probabilities (PTC rules and the agreement count use them).

The output directory (manifest.json + one float16 state dict per model) is the model_store format TorchServe
serves. Imports nothing beyond torch / numpy / the project's core.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr.core.calibration import calibrated_probabilities
from cxr.core.ensemble import ctp_mean, sigmoid
from cxr.core.errors import InvalidInputError
from cxr.core.manifest import Manifest, ModelEntry
from cxr.core.preprocess import PreprocessSpec
from cxr.models.architectures import CXRNet, build_model
from cxr.models.bundle import save_ensemble
from training.calibration import METHOD as CALIBRATION_METHOD
from training.calibration import Calibration, fit_calibration, offsets_from_pos_weight
from training.data.base import LabelledImages
from training.metrics import expected_calibration_error
from training.torch_data import RadiographDataset, make_loader

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
CRITERION = ("per label: threshold maximising positive-class F1 of the {what} on the validation split "
             "({n} images; midpoint between adjacent scores); labels without validation positives: 0.5")  # fmt: skip


@dataclass(frozen=True)
class Run:
    """One finished training run (RUN_DIR with run.json and best.pt)."""

    run_dir: Path
    record: dict[str, Any]

    @property
    def arch(self) -> str:
        return str(self.record["arch"])

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.record["labels"])

    @property
    def spec(self) -> PreprocessSpec:
        return PreprocessSpec(**self.record["preprocess"])

    @property
    def input_norm(self) -> str:
        return str(self.record.get("input_norm", "spec"))


def read_run(run_dir: str | Path) -> Run:
    """RUN_DIR -> Run. Raises InvalidInputError (reason BAD_RUN_DIR) without a readable run.json and best.pt."""
    root = Path(run_dir)
    try:
        record = json.loads((root / "run.json").read_text())
        _ = record["arch"], record["labels"], record["preprocess"], record["hidden"], record["dropout"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise InvalidInputError(f"{root} is not a finished training run: {e}", reason="BAD_RUN_DIR") from e
    if not (root / "best.pt").is_file():
        raise InvalidInputError(f"{root} has no best.pt", reason="BAD_RUN_DIR")
    return Run(root, record)


def load_run_model(run: Run, device: torch.device, weights: str = "best.pt") -> CXRNet:
    """Build the run's architecture and load ``weights`` (best.pt, final.pt or ema.pt; float32, eval mode)."""
    model = build_model(run.arch, len(run.labels), hidden=int(run.record["hidden"]),
                        dropout=float(run.record["dropout"]), input_norm=run.input_norm, spec=run.spec)  # fmt: skip
    model.load_state_dict(torch.load(run.run_dir / weights, map_location="cpu", weights_only=True))
    return model.to(device).eval()


@torch.no_grad()
def predict_logits(
    models: Sequence[torch.nn.Module],
    images: LabelledImages,
    spec: PreprocessSpec,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 2,
    flip: bool = False,
) -> np.ndarray:
    """Logits of every model on every image (no augmentation, float32) -> (N, M, L). ``flip``: the mean of the
    logits of the image and of its mirror image (test-time augmentation)."""
    loader = make_loader(RadiographDataset(images, spec), list(range(len(images))), batch_size, workers, device)
    out = []
    for x, _ in loader:
        x = x.to(device)
        logits = torch.stack([m(x) for m in models], dim=1)
        if flip:
            logits = 0.5 * (logits + torch.stack([m(torch.flip(x, dims=[3])) for m in models], dim=1))
        out.append(logits.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(models), 0), np.float32)


def predict_probs(
    models: Sequence[torch.nn.Module],
    images: LabelledImages,
    spec: PreprocessSpec,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 2,
) -> np.ndarray:
    """Uncalibrated probabilities (sigmoid of the logits) of every model on every image -> (N, M, L)."""
    return sigmoid(predict_logits(models, images, spec, device, batch_size, workers))


def best_f1_threshold(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """One label: known targets y (n,) 0/1 and scores p (n,) -> (threshold, F1 at it) maximising the
    positive-class F1 of ``p >= threshold``. No positives -> (0.5, nan)."""
    n_pos = int((y == 1).sum())
    if n_pos == 0:
        return DEFAULT_THRESHOLD, float("nan")
    order = np.argsort(-p, kind="mergesort")
    ps, ys = p[order], y[order]
    last = np.flatnonzero(np.r_[ps[1:] != ps[:-1], True])  # last index of each run of equal scores
    tp = np.cumsum(ys)[last]
    fp = (last + 1) - tp
    f1 = 2 * tp / (2 * tp + fp + (n_pos - tp))
    k = int(np.argmax(f1))
    lower = ps[last[k] + 1] if last[k] + 1 < len(ps) else ps[last[k]]
    return float(np.clip((ps[last[k]] + lower) / 2, 0.0, 1.0)), float(f1[k])


def tune_thresholds(targets: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, L) targets with NaN and (N, L) scores -> ((L,) thresholds, (L,) validation F1 at them)."""
    y, s = np.asarray(targets, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    pairs = []
    for j in range(y.shape[1]):
        known = ~np.isnan(y[:, j])
        pairs.append(best_f1_threshold(y[known, j], s[known, j]))
    return np.array([t for t, _ in pairs]), np.array([f for _, f in pairs])


def unique_names(archs: Sequence[str]) -> list[str]:
    """Model names for the manifest: the arch, with -2, -3 ... for repeats."""
    seen: dict[str, int] = {}
    names = []
    for a in archs:
        seen[a] = seen.get(a, 0) + 1
        names.append(a if seen[a] == 1 else f"{a}-{seen[a]}")
    return names


def check_runs(runs: Sequence[Run]) -> tuple[tuple[str, ...], PreprocessSpec]:
    """All runs must share labels and preprocessing -> (labels, spec). Raises InvalidInputError."""
    if not runs:
        raise InvalidInputError("no runs given", reason="BAD_RUN_DIR")
    labels, spec = runs[0].labels, runs[0].spec
    for r in runs[1:]:
        if r.labels != labels or r.spec != spec:
            raise InvalidInputError(f"{r.run_dir} differs from {runs[0].run_dir} in labels or preprocessing",
                                    reason="RUNS_DIFFER")  # fmt: skip
    return labels, spec


def label_columns(data_labels: Sequence[str], wanted: Sequence[str]) -> np.ndarray:
    """Column index in the data of every wanted label. Raises InvalidInputError (LABEL_MISMATCH) if one lacks."""
    missing = [lab for lab in wanted if lab not in data_labels]
    if missing:
        raise InvalidInputError(f"the data lacks the labels {missing}", reason="LABEL_MISMATCH")
    return np.array([list(data_labels).index(lab) for lab in wanted], dtype=np.int64)


def calibrate_run(run: Run, logits: np.ndarray, targets: np.ndarray, enabled: bool = True) -> Calibration:
    """One model's calibration from its validation logits (identity when not ``enabled``): the offset undoes
    weighted BCE's positive weights (only when the run trained with them), the temperatures are fitted."""
    n_labels = logits.shape[1]
    if not enabled:
        return Calibration((0.0,) * n_labels, (1.0,) * n_labels, (False,) * n_labels)
    weighted = run.record.get("loss", "wbce") == "wbce"
    offset = offsets_from_pos_weight(run.record.get("pos_weight") if weighted else None, n_labels)
    return fit_calibration(logits, targets, offset)


def validation_ece(y: np.ndarray, logits: np.ndarray, probs: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Pooled ECE of every model and of CTP before (plain sigmoid) and after calibration."""
    raw = sigmoid(logits)
    out: dict[str, Any] = {}
    for i, n in enumerate(names):
        out[n] = {
            "before": expected_calibration_error(y, raw[:, i]),
            "after": expected_calibration_error(y, probs[:, i]),
        }
    out["ctp"] = {"before": expected_calibration_error(y, ctp_mean(raw)),
                  "after": expected_calibration_error(y, ctp_mean(probs))}  # fmt: skip
    return out


def build_ensemble(
    run_dirs: Sequence[str | Path],
    data: str | Path,
    split_path: str | Path,
    out_dir: str | Path,
    name: str,
    version: str,
    device: torch.device,
    per_model_thresholds: bool = True,
    description: str = "",
    batch_size: int = 64,
    workers: int = 2,
    calibrate: bool = True,
) -> Manifest:
    """Predict the validation part of ``split_path`` with every run, calibrate, tune thresholds, write the bundle.
    -> the manifest written. Raises InvalidInputError (bad runs, label mismatch, empty validation part)."""
    from training.data.load import load_dataset
    from training.splits import Split

    runs = [read_run(r) for r in run_dirs]
    labels, spec = check_runs(runs)
    ds = load_dataset(Path(data))
    val = ds.subset(Split.load(Path(split_path)).indices(ds, "val"))
    if len(val) == 0:
        raise InvalidInputError(f"the split {split_path} has no validation images", reason="EMPTY_SPLIT_PART")
    y = val.labels[:, label_columns(val.label_names, labels)]
    models = [load_run_model(r, device) for r in runs]
    logits = predict_logits(models, val, spec, device, batch_size, workers)
    cals = [calibrate_run(r, logits[:, i], y, calibrate) for i, r in enumerate(runs)]
    probs = calibrated_probabilities(logits, [c.offset for c in cals], [c.temperature for c in cals])
    thresholds, f1 = tune_thresholds(y, ctp_mean(probs))
    names = unique_names([r.arch for r in runs])
    entries = tuple(
        ModelEntry(name=n, arch=r.arch, weights=f"{n}.pt", hidden=int(r.record["hidden"]),
                   dropout=float(r.record["dropout"]), input_norm=r.input_norm,
                   thresholds=tuple(float(t) for t in tune_thresholds(y, probs[:, i])[0])
                   if per_model_thresholds else None,
                   logit_offset=c.offset, temperature=c.temperature)
        for i, (n, r, c) in enumerate(zip(names, runs, cals, strict=True))
    )  # fmt: skip
    manifest = Manifest(
        name=name, version=version, labels=labels, thresholds=tuple(float(t) for t in thresholds), models=entries,
        preprocess=spec, ensemble_rule="ctp",
        threshold_criterion=CRITERION.format(what="calibrated ensemble (CTP) probability", n=len(val))
        + ("; each model's vote threshold: same criterion on its own probability" if per_model_thresholds else ""),
        calibration=f"{CALIBRATION_METHOD}; fitted on {len(val)} validation images" if calibrate else "none",
        description=description or f"Ensemble (CTP) of {', '.join(names)} trained with `cxr train`.",
        trained_on=f"{data}: train part of {split_path} ({runs[0].record.get('n_images', {}).get('train', '?')} "
        f"images); calibration and thresholds on its validation part ({len(val)} images)",
        extra={"validation_f1_positive": [None if np.isnan(v) else float(v) for v in f1],
               "validation_ece": validation_ece(y, logits, probs, names),
               "own_temperature_labels": {n: [lab for lab, own in zip(labels, c.own_temperature, strict=True) if own]
                                          for n, c in zip(names, cals, strict=True)},
               "runs": [str(r.run_dir) for r in runs], "split": str(split_path),
               "initial_weights": {n: r.record.get("init", {"init": "none"}) for n, r in zip(names, runs, strict=True)},
               "recipes": {n: r.record.get("recipe_name", "paper") for n, r in zip(names, runs, strict=True)}},
    )  # fmt: skip
    written = save_ensemble(out_dir, manifest, models)
    log.info("ensemble %s %s written to %s", name, version, out_dir)
    return written
