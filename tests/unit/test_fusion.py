"""Fusion and agreement maths (cxr.explain.fusion) on hand-made arrays."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxr.explain.fusion import fuse_maps, normalize_maps, resample_maps, spatial_agreement

pytestmark = pytest.mark.unit


def test_normalize_divides_each_map_by_its_own_max() -> None:
    cams = np.array([[[[0.0, 2.0], [1.0, 4.0]], [[3.0, 0.0], [0.0, 0.0]]]])  # (M=1, L=2, 2, 2)
    got = normalize_maps(cams)
    assert got.dtype == np.float32 and got.shape == cams.shape
    assert np.allclose(got[0, 0], [[0.0, 0.5], [0.25, 1.0]])
    assert np.allclose(got[0, 1], [[1.0, 0.0], [0.0, 0.0]])


def test_normalize_keeps_all_zero_maps_zero_and_clips_negatives() -> None:
    cams = np.stack([np.zeros((3, 3)), np.array([[-1.0, 0, 0], [0, 2.0, 0], [0, 0, 0]])])
    got = normalize_maps(cams)
    assert np.array_equal(got[0], np.zeros((3, 3)))
    assert got[1, 0, 0] == 0.0 and got[1, 1, 1] == 1.0


@pytest.mark.parametrize("bad", [np.array([1.0, 2.0]), np.array([[np.nan, 1.0], [0.0, 0.0]])])
def test_normalize_rejects_bad_maps(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        normalize_maps(bad)


@pytest.mark.parametrize(("shape", "grid"), [((3, 2, 7, 5), 16), ((2, 9, 9), 4), ((1, 1, 1), 3), ((4, 6), 6)])
def test_resample_matches_torch_bilinear_half_pixel(shape: tuple[int, ...], grid: int) -> None:
    rng = np.random.default_rng(0)
    cams = rng.random(shape).astype(np.float32)
    got = resample_maps(cams, grid)
    flat = torch.from_numpy(cams.reshape(-1, 1, *shape[-2:]))
    ref = F.interpolate(flat, size=(grid, grid), mode="bilinear", align_corners=False).numpy()
    assert got.shape == (*shape[:-2], grid, grid) and got.dtype == np.float32
    assert np.allclose(got, ref.reshape(got.shape), atol=1e-6)


def test_resample_keeps_a_constant_map_constant_and_rejects_a_zero_grid() -> None:
    assert np.allclose(resample_maps(np.full((7, 7), 0.3), 64), 0.3)
    with pytest.raises(ValueError):
        resample_maps(np.ones((7, 7)), 0)


def test_fuse_is_mean_and_population_std_over_models() -> None:
    a = np.array([[[0.0, 1.0], [0.5, 0.2]]])  # (L=1, 2, 2)
    b = np.array([[[1.0, 1.0], [0.1, 0.0]]])
    mean, std = fuse_maps(np.stack([a, b]))
    assert mean.shape == std.shape == (1, 2, 2)
    assert np.allclose(mean, [[[0.5, 1.0], [0.3, 0.1]]])
    assert np.allclose(std, [[[0.5, 0.0], [0.2, 0.1]]])  # |a - b| / 2 for two models
    mean1, std1 = fuse_maps(a[None])
    assert np.allclose(mean1, a) and not std1.any()


def test_fuse_rejects_a_stack_without_a_model_axis() -> None:
    with pytest.raises(ValueError):
        fuse_maps(np.ones((2, 4, 4)))


def _block(rows: slice, g: int = 10) -> np.ndarray:
    """A g x g map that is 1 on ``rows`` (the hot mask) and 0.1 elsewhere."""
    m = np.full((g, g), 0.1)
    m[rows] = 1.0
    return m


def test_spatial_agreement_is_the_iou_of_top_masks() -> None:
    # 10 x 10 maps, top 20 % = 20 pixels = two rows.
    model_a = [_block(slice(0, 2)), _block(slice(0, 2)), np.zeros((10, 10)), np.zeros((10, 10))]
    model_b = [_block(slice(1, 3)), _block(slice(0, 2)), np.zeros((10, 10)), _block(slice(5, 7))]
    got = spatial_agreement(np.stack([np.stack(model_a), np.stack(model_b)]), top_fraction=0.2)
    # rows 0-1 vs 1-2: 10 shared of 30 -> 1/3; identical -> 1; both all-zero (empty masks) -> 1; empty vs not -> 0
    assert got.dtype == np.float32
    assert np.allclose(got, [1 / 3, 1.0, 1.0, 0.0])


def test_spatial_agreement_averages_pairs_and_is_one_for_a_single_model() -> None:
    maps = np.stack([_block(slice(0, 2)), _block(slice(0, 2)), _block(slice(8, 10))])[:, None]  # (M=3, L=1)
    assert np.allclose(spatial_agreement(maps), [(1.0 + 0.0 + 0.0) / 3])
    assert np.array_equal(spatial_agreement(maps[:1]), [1.0])


def test_spatial_agreement_top_fraction_changes_the_masks() -> None:
    ramp = np.tile(np.arange(10, dtype=float), (10, 1))  # columns 0..9
    maps = np.stack([ramp, ramp[:, ::-1]])[:, None]  # mirror images: hot on opposite sides
    assert spatial_agreement(maps, top_fraction=0.2)[0] == 0.0
    assert spatial_agreement(maps, top_fraction=1.0)[0] == pytest.approx(0.8)  # zero columns drop out: 80 / 100


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_spatial_agreement_rejects_a_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError):
        spatial_agreement(np.ones((2, 1, 4, 4)), top_fraction=fraction)
