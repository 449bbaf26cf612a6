"""Named training recipes: every setting of ``cxr train`` that decides *how* a CNN learns, under one name.

- ``paper``: Liz et al. as published (Adam 1e-4, batch 32, up to 350 epochs, early stopping on validation loss
  with patience 25, two 512-unit dense layers with dropout 0.2, the first 10% of convolutions frozen, BatchNorm
  in training mode, the paper's strong augmentation). Meant for ImageNet-initialised backbones and ~60,000 images.
- ``small-data``: for a few hundred images and an ImageNet-initialised backbone. Every setting was chosen by
  patient-disjoint 5-fold cross-validation on the 500 NIH images (``python -m training.compare_recipes``; the
  table and the reasons are in docs/RECIPES.md).

A recipe only supplies defaults: any option given on the command line wins, and the run records the resolved
settings (run.json) so that a run can be reproduced without knowing which recipe it started from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class Recipe:
    """How to train one CNN (defaults: the paper's settings)."""

    epochs: int = 350
    batch_size: int = 32
    image_size: int = 224
    optimizer: str = "adam"  # adam | adamw
    lr: float = 1e-4  # the head's learning rate (peak, with a schedule)
    backbone_lr_factor: float = 1.0  # backbone lr = lr * factor
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | onecycle | cosine
    warmup_fraction: float = 0.2  # onecycle / cosine: share of the steps spent warming up
    hidden: int = 512  # head: two dense layers of this width; 0 = linear head
    dropout: float = 0.2
    freeze_fraction: float = 0.1  # share of convolutions frozen, from the input side
    bn: str = "train"  # train | frozen (BatchNorm statistics kept from the initial weights)
    augment: str = "paper"  # training.augment.AUGMENT_PRESETS
    loss: str = "wbce"
    sampler: str = "none"
    patience: int = 25
    min_delta: float = 0.001
    checkpoint: str = "best"  # best (lowest validation loss) | last (the final epoch's weights)
    ema_decay: float = 0.0  # exponential moving average of the weights per step; 0 = off


PAPER = Recipe()

SMALL_DATA = Recipe(
    epochs=12,
    batch_size=32,
    image_size=224,
    optimizer="adamw",
    lr=1e-3,
    backbone_lr_factor=0.1,
    weight_decay=1e-4,
    schedule="onecycle",
    warmup_fraction=0.2,
    hidden=0,
    dropout=0.2,
    freeze_fraction=0.0,
    bn="frozen",
    augment="light",
    patience=1000,
    checkpoint="last",
    ema_decay=0.0,
)

RECIPES: dict[str, Recipe] = {"paper": PAPER, "small-data": SMALL_DATA}

CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("adam", "adamw"),
    "schedule": ("constant", "onecycle", "cosine"),
    "bn": ("train", "frozen"),
    "augment": ("paper", "moderate", "light", "none"),
    "checkpoint": ("best", "last"),
    "loss": ("wbce", "focal", "asl"),
    "sampler": ("none", "class_aware"),
}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``. Raises ValueError for an unknown one."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    return RECIPES[name]


def resolve(name: str, overrides: dict[str, Any]) -> Recipe:
    """The named recipe with every non-None override applied. Raises ValueError for an unknown recipe, field or
    choice."""
    known = {f.name for f in fields(Recipe)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"not recipe settings: {sorted(unknown)}")
    recipe = replace(get_recipe(name), **{k: v for k, v in overrides.items() if v is not None})
    for field_name, allowed in CHOICES.items():
        if getattr(recipe, field_name) not in allowed:
            raise ValueError(f"{field_name} {getattr(recipe, field_name)!r} not one of {allowed}")
    return recipe


def recipe_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(Recipe))


def as_dict(recipe: Recipe) -> dict[str, Any]:
    return asdict(recipe)
