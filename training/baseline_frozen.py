"""The simple baseline a fine-tuned ensemble must beat: logistic regression per label on FROZEN ImageNet features.

    python -m training.baseline_frozen --data ../shared/data/nih-cxr14-621 --split SPLIT.json \
        --pretrained ../shared/data/pretrained --out baseline.json [--bootstrap 1000]

For each backbone whose ImageNet weights are obtainable here (MobileNetV3-Small and MobileNetV2 from the files in
--pretrained, EfficientNet-Lite0/1/2 from the pinned pip packages), the pooled features of every image (224 px,
grey repeated to three channels, the weights' own input normalisation, nothing trained) feed one L2-regularised
logistic regression per label, fitted on the train + validation parts (features standardised; the inverse
regularisation strength C chosen per label by 5-fold cross-validated AUROC inside those parts, from 1e-4 to 1),
and scored on the test part. The baseline's headline is the mean probability of the five probes, as in
../shared/data/pretrained/README.md. Mean AUROC over labels with a percentile bootstrap 95% CI over test images.
Research software: NOT FOR CLINICAL USE.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

BACKBONES = ("mobilenet_v3_small", "mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
C_GRID = np.logspace(-4, 0, 9)


def frozen_features(arch: str, images: Any, pretrained: Path, size: int = 224) -> np.ndarray:
    """(N, K) pooled ImageNet features of ``images`` (a LabelledImages), nothing trained."""
    import torch

    from cxr.core.preprocess import PreprocessSpec
    from cxr.models.architectures import build_model
    from training.compare_recipes import init_arguments
    from training.init_weights import load_initial_weights
    from training.torch_data import RadiographDataset, make_loader

    init_args = init_arguments(arch, True, pretrained)
    init = init_args[1]
    norm = init_args[3] if len(init_args) > 3 else "auto"
    spec = PreprocessSpec(size=size)
    model = build_model(arch, 1, hidden=0, input_norm="tf", spec=spec)  # every source here expects [-1, 1]
    load_initial_weights(model, init, norm)
    model.eval()
    loader = make_loader(RadiographDataset(images, spec), list(range(len(images))), 32, 0, torch.device("cpu"))
    out = []
    with torch.inference_mode():
        for x, _ in loader:
            out.append(model.forward_features(x).mean(dim=(2, 3)).numpy())
    return np.concatenate(out).astype(np.float64)


def probe_probabilities(f_fit: np.ndarray, y_fit: np.ndarray, f_test: np.ndarray) -> np.ndarray:
    """One logistic regression per label (C by inner 5-fold CV AUROC) -> (N_test, L) probabilities; a label
    without both classes in the fit part gets its prevalence."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = np.zeros((len(f_test), y_fit.shape[1]))
    for j in range(y_fit.shape[1]):
        known = ~np.isnan(y_fit[:, j])
        y = y_fit[known, j]
        if y.min() == y.max():
            out[:, j] = y.mean()
            continue
        folds = int(min(5, y.sum(), (1 - y).sum()))
        clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=C_GRID, cv=max(folds, 2), scoring="roc_auc",
                                                                   max_iter=5000, class_weight="balanced"))  # fmt: skip
        clf.fit(f_fit[known], y)
        out[:, j] = clf.predict_proba(f_test)[:, 1]
    return out


def run_baseline(data: Path, split: Path, pretrained: Path, n_boot: int) -> dict[str, Any]:
    """Every probe and their mean on the test part of ``split`` -> JSON-ready results."""
    from training.data.load import load_dataset
    from training.metrics import compare_mean_auroc
    from training.splits import Split

    ds = load_dataset(data)
    s = Split.load(split)
    fit_idx = np.sort(np.concatenate([s.indices(ds, "train"), s.indices(ds, "val")]))
    test_idx = s.indices(ds, "test")
    scores = {}
    for arch in BACKBONES:
        feats = frozen_features(arch, ds, pretrained)
        scores[arch] = probe_probabilities(feats[fit_idx], ds.labels[fit_idx], feats[test_idx])
        log.info("probe %s done", arch)
    scores["mean_of_probes"] = np.mean([scores[a] for a in BACKBONES], axis=0)
    table = compare_mean_auroc(ds.labels[test_idx], scores, "mean_of_probes", n_boot, seed=0)
    return {"data": str(data), "split": str(split), "n_fit": len(fit_idx), "n_test": len(test_idx),
            "method": __doc__.split("\n\n")[2].replace("\n", " "), "auroc_mean": table,
            "test_probabilities_mean_of_probes": scores["mean_of_probes"].tolist()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.baseline_frozen", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--split", required=True, type=Path)
    p.add_argument("--pretrained", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="JSON file to write")
    p.add_argument("--bootstrap", type=int, default=1000)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run_baseline(args.data, args.split, args.pretrained, args.bootstrap)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, r in result["auroc_mean"].items():
        sys.stdout.write(f"{name:20s} mean AUROC {r['auroc_mean']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
