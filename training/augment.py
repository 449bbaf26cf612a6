"""The paper's augmentation, in torch, on [0, 1] greyscale squares (between ``resize_square`` and ``normalize``).

Paper: rotation up to 45 deg, shear 0.1, zoom 0.1, width/height shift 0.1, horizontal flip, brightness 0.7-1.1,
channel shift 0.05 (Keras ``ImageDataGenerator`` names). How each is read here (Keras semantics where they are
unambiguous, documented choices where not):

- rotation: angle uniform in [-45, 45] degrees.
- shear: shear *factor* uniform in [-0.1, 0.1] (tan of the shear angle, about +-5.7 deg). Keras' ``shear_range``
  changed from radians to degrees between versions; 0.1 degree would be a no-op, so we read it as radians.
- zoom: independent x / y scale uniform in [0.9, 1.1] (Keras draws zx and zy independently).
- shift: translation uniform in [-0.1, 0.1] of the width / height.
- horizontal flip with probability 0.5.
- brightness: multiply by a factor uniform in [0.7, 1.1].
- channel shift: add one offset uniform in [-0.05, 0.05] (images are in [0, 1], one channel).
- resampling is bilinear; pixels from outside the image repeat the border (Keras' default ``fill_mode="nearest"``).
The result is clamped to [0, 1].

Everything is batched ((N, 1, S, S) on any device) and seeded by a ``torch.Generator``; random parameters are
drawn on the CPU so that a seed gives the same augmentation on CPU and GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms (defaults: the paper's)."""

    rotation_deg: float = 45.0
    shear: float = 0.1
    zoom: float = 0.1
    shift: float = 0.1
    hflip: bool = True
    brightness: tuple[float, float] = (0.7, 1.1)
    channel_shift: float = 0.05


PAPER_AUGMENT = AugmentConfig()
# Milder settings for small data (the recipe comparison in docs/RECIPES.md chooses among them).
MODERATE_AUGMENT = AugmentConfig(rotation_deg=20.0, shear=0.0, zoom=0.1, shift=0.1, brightness=(0.7, 1.1))
LIGHT_AUGMENT = AugmentConfig(rotation_deg=10.0, shear=0.0, zoom=0.1, shift=0.06, brightness=(0.8, 1.1),
                              channel_shift=0.03)  # fmt: skip
AUGMENT_PRESETS: dict[str, AugmentConfig | None] = {
    "paper": PAPER_AUGMENT,
    "moderate": MODERATE_AUGMENT,
    "light": LIGHT_AUGMENT,
    "none": None,
}


def augment_preset(name: str) -> AugmentConfig | None:
    """A named augmentation strength (None for ``none``). Raises ValueError for an unknown name."""
    if name not in AUGMENT_PRESETS:
        raise ValueError(f"unknown augmentation {name!r}; known: {sorted(AUGMENT_PRESETS)}")
    return AUGMENT_PRESETS[name]


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def sample_affine(n: int, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``n`` random affine maps -> (n, 2, 3) float64 ``theta`` for ``F.affine_grid``.

    theta maps output coordinates to input coordinates in normalised [-1, 1] units:
    rotation @ shear @ zoom, with the flip folded into the x column and the shift as translation.
    """
    a = torch.deg2rad(_uniform(n, -cfg.rotation_deg, cfg.rotation_deg, generator))
    sh = _uniform(n, -cfg.shear, cfg.shear, generator)
    zx = _uniform(n, 1.0 - cfg.zoom, 1.0 + cfg.zoom, generator)
    zy = _uniform(n, 1.0 - cfg.zoom, 1.0 + cfg.zoom, generator)
    tx = 2.0 * _uniform(n, -cfg.shift, cfg.shift, generator)  # normalised units span 2 per image width
    ty = 2.0 * _uniform(n, -cfg.shift, cfg.shift, generator)
    flip = (
        torch.rand(n, generator=generator, dtype=torch.float64) < 0.5 if cfg.hflip else torch.zeros(n, dtype=torch.bool)
    )
    c, s = torch.cos(a), torch.sin(a)
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # (n, 2, 2)
    shear = torch.zeros(n, 2, 2, dtype=torch.float64)
    shear[:, 0, 0], shear[:, 0, 1], shear[:, 1, 1] = 1.0, sh, 1.0
    zoom = torch.diag_embed(torch.stack([zx, zy], -1))
    lin = rot @ shear @ zoom
    lin[:, :, 0] *= torch.where(flip, -1.0, 1.0)[:, None]
    return torch.cat([lin, torch.stack([tx, ty], -1)[:, :, None]], dim=2)


def sample_intensity(
    n: int, cfg: AugmentConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` (brightness factor, additive shift) pairs -> two (n,) float64 tensors."""
    factor = _uniform(n, cfg.brightness[0], cfg.brightness[1], generator)
    shift = _uniform(n, -cfg.channel_shift, cfg.channel_shift, generator)
    return factor, shift


def augment_batch(
    x: torch.Tensor, cfg: AugmentConfig = PAPER_AUGMENT, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Augment a batch of [0, 1] images.

    In: ``x`` (N, 1, S, S) floating tensor in [0, 1] on any device; ``generator`` a CPU generator (None: global RNG).
    Out: tensor of the same shape, dtype and device, clamped to [0, 1].
    Raises ValueError for a tensor that is not (N, 1, H, W) floating point.
    """
    if x.ndim != 4 or x.shape[1] != 1 or not x.is_floating_point():
        raise ValueError(f"expected a floating (N, 1, H, W) tensor, got {tuple(x.shape)} {x.dtype}")
    n = x.shape[0]
    theta = sample_affine(n, cfg, generator)
    factor, shift = sample_intensity(n, cfg, generator)
    work = x.float()
    grid = F.affine_grid(theta.to(device=x.device, dtype=torch.float32), list(work.shape), align_corners=False)
    out = F.grid_sample(work, grid, mode="bilinear", padding_mode="border", align_corners=False)
    f = factor.to(device=x.device, dtype=torch.float32).view(n, 1, 1, 1)
    b = shift.to(device=x.device, dtype=torch.float32).view(n, 1, 1, 1)
    return (out * f + b).clamp_(0.0, 1.0).to(x.dtype)


def augment_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed that depends only on (run seed, epoch, sample index): augmentation is reproducible
    whatever the number of DataLoader workers or processes."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_647 + index) & 0x7FFF_FFFF_FFFF_FFFF


def augment_square(square01: np.ndarray, seed: int, cfg: AugmentConfig = PAPER_AUGMENT) -> np.ndarray:
    """Augment one (S, S) [0, 1] image with its own seed -> (S, S) float32 in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(square01, dtype=np.float32))[None, None]
    return augment_batch(x, cfg, g)[0, 0].numpy()
