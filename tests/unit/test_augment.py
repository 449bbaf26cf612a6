"""The paper's augmentation: range, shape, seeding, each transform's effect; and the training dataset that
applies it between the core's resize and normalise."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr.core.preprocess import PreprocessSpec, load_image_file, normalize, resize_square
from training.augment import (
    PAPER_AUGMENT,
    AugmentConfig,
    augment_batch,
    augment_seed,
    augment_square,
    sample_affine,
)
from training.data.base import LabelledImages
from training.torch_data import RadiographDataset, build_square_cache, cache_fits

pytestmark = pytest.mark.unit
NIH = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "nih-cxr14-621" / "images_512"
IDENTITY = AugmentConfig(rotation_deg=0, shear=0, zoom=0, shift=0, hflip=False, brightness=(1, 1), channel_shift=0)


def _real_batch(n: int = 4, size: int = 64) -> torch.Tensor:
    paths = sorted(NIH.glob("*.png"))[:n]
    return torch.stack([torch.from_numpy(resize_square(load_image_file(p), size)) for p in paths])[:, None]


def test_output_keeps_shape_dtype_and_range() -> None:
    x = _real_batch()
    out = augment_batch(x, PAPER_AUGMENT, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not torch.allclose(out, x)


def test_same_seed_same_result_other_seed_other_result() -> None:
    x = _real_batch()
    a = augment_batch(x, PAPER_AUGMENT, torch.Generator().manual_seed(3))
    b = augment_batch(x, PAPER_AUGMENT, torch.Generator().manual_seed(3))
    c = augment_batch(x, PAPER_AUGMENT, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_identity_config_returns_the_image() -> None:
    x = _real_batch()
    assert torch.allclose(augment_batch(x, IDENTITY, torch.Generator().manual_seed(0)), x, atol=1e-5)


def test_flip_only_mirrors_some_images() -> None:
    x = _real_batch(8)
    out = augment_batch(x, replace(IDENTITY, hflip=True), torch.Generator().manual_seed(1))
    flipped = [bool(torch.allclose(o, xi.flip(-1), atol=1e-5)) for o, xi in zip(out, x, strict=True)]
    kept = [bool(torch.allclose(o, xi, atol=1e-5)) for o, xi in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and any(flipped) and any(kept)


def test_brightness_and_channel_shift_stay_in_their_ranges() -> None:
    x = torch.full((64, 1, 8, 8), 0.5)
    out = augment_batch(x, replace(IDENTITY, brightness=(0.7, 1.1), channel_shift=0.05), torch.Generator())
    values = out[:, 0, 0, 0]
    assert values.min() >= 0.5 * 0.7 - 0.05 - 1e-6 and values.max() <= 0.5 * 1.1 + 0.05 + 1e-6
    assert values.std() > 0.02  # really random per image
    assert torch.allclose(out, values[:, None, None, None].expand_as(out))  # one factor per image


def test_affine_parameters_respect_the_paper_ranges() -> None:
    theta = sample_affine(2000, replace(PAPER_AUGMENT, hflip=False), torch.Generator().manual_seed(0))
    lin, shift = theta[:, :, :2], theta[:, :, 2]
    assert shift.abs().max() <= 0.2 + 1e-9  # 0.1 of the width in [-1, 1] units
    det = torch.linalg.det(lin)  # rotation: 1, shear: 1, zoom: zx * zy in [0.81, 1.21]
    assert det.min() >= 0.81 - 1e-9 and det.max() <= 1.21 + 1e-9
    angle = torch.rad2deg(torch.atan2(lin[:, 1, 0], lin[:, 0, 0]))
    assert angle.abs().max() <= 45.5 and angle.abs().max() > 40


def test_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        augment_batch(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        augment_batch(torch.zeros(8, 8))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        augment_batch(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))


def test_augment_square_and_per_sample_seed() -> None:
    sq = _real_batch(1)[0, 0].numpy()
    a = augment_square(sq, augment_seed(0, 1, 5))
    assert a.shape == sq.shape and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert np.array_equal(a, augment_square(sq, augment_seed(0, 1, 5)))
    assert len({augment_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}) == 450


def _images(n: int = 3) -> LabelledImages:
    paths = tuple(sorted(NIH.glob("*.png"))[:n])
    labels = np.array([[1, 0], [0, np.nan], [0, 1]], dtype=np.float32)[:n]
    return LabelledImages(
        tuple(p.name for p in paths), paths, labels, ("a", "b"), tuple(str(i) for i in range(n)), ("PA",) * n
    )


def test_dataset_goes_through_the_core_and_augments_only_when_asked() -> None:
    images, spec = _images(), PreprocessSpec(size=32)
    plain = RadiographDataset(images, spec)
    x, y = plain[1]
    expected = normalize(resize_square(load_image_file(images.paths[1]), 32), spec)
    assert x.shape == (1, 32, 32) and torch.allclose(x, torch.from_numpy(expected))
    assert torch.isnan(y[1]) and y[0] == 0
    aug = RadiographDataset(images, spec, PAPER_AUGMENT, seed=0)
    xa, _ = aug[(1, 2)]
    assert not torch.allclose(xa, x)
    assert torch.equal(xa, aug[(1, 2)][0]) and not torch.equal(xa, aug[(1, 3)][0])  # seeded by (seed, epoch, i)


def test_float16_cache_is_close_to_decoding() -> None:
    images, spec = _images(), PreprocessSpec(size=32)
    cache = build_square_cache(images.paths, 32, workers=0)
    assert cache.dtype == np.float16 and cache.shape == (3, 32, 32)
    cached, direct = RadiographDataset(images, spec, cache=cache)[2][0], RadiographDataset(images, spec)[2][0]
    assert torch.allclose(cached, direct, atol=1e-3 / spec.std)
    assert cache_fits(10, 224) and not cache_fits(10**6, 224)
    with pytest.raises(ValueError, match="cache"):
        RadiographDataset(images, spec, cache=cache[:2])
