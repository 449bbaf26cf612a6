"""Packing heatmaps for Redis (cxr.explain.heatmap_store): round trip, quantisation error, garbage -> typed error."""

import io
from dataclasses import replace

import numpy as np
import pytest

from cxr.core.errors import InvalidInputError
from cxr.explain.heatmap_store import (
    HeatmapSet,
    dequantize,
    pack_heatmaps,
    quantize,
    unpack_heatmaps,
)

pytestmark = pytest.mark.unit

LABELS = ("Atelectasis", "Pleural_Thickening", "épanchement pleural")
MODELS = ("densenet121", "efficientnet_b0")


def _heatmaps(grid: int = 8, seed: int = 0) -> HeatmapSet:
    rng = np.random.default_rng(seed)
    m, n = len(MODELS), len(LABELS)
    return HeatmapSet(
        labels=LABELS,
        models=MODELS,
        grid=grid,
        per_model=rng.integers(0, 256, (m, n, grid, grid), dtype=np.uint8),
        fused=rng.integers(0, 256, (n, grid, grid), dtype=np.uint8),
        std=rng.integers(0, 128, (n, grid, grid), dtype=np.uint8),
        spatial_agreement=rng.random(n).astype(np.float32),
        mean_disagreement=rng.random(n).astype(np.float32) / 2,
        method="test maps",
    )


def _assert_same(a: HeatmapSet, b: HeatmapSet) -> None:
    assert (a.labels, a.models, a.grid, a.method) == (b.labels, b.models, b.grid, b.method)
    for name in ("per_model", "fused", "std", "spatial_agreement", "mean_disagreement"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name


def test_pack_unpack_round_trip_is_exact() -> None:
    original = _heatmaps()
    blob = pack_heatmaps(original)
    assert isinstance(blob, bytes) and blob[:2] == b"PK"  # a zip archive
    _assert_same(unpack_heatmaps(blob), original)


def test_pack_is_compact_for_smooth_maps() -> None:
    g = 64
    ramp = np.tile(np.linspace(0, 255, g).astype(np.uint8), (g, 1))
    smooth = replace(
        _heatmaps(grid=g),
        per_model=np.broadcast_to(ramp, (2, 3, g, g)).copy(),
        fused=np.broadcast_to(ramp, (3, g, g)).copy(),
        std=np.zeros((3, g, g), np.uint8),
    )
    raw = 2 * 3 * g * g + 2 * 3 * g * g
    assert len(pack_heatmaps(smooth)) < raw / 10


def test_quantisation_error_is_at_most_half_a_step() -> None:
    v = np.random.default_rng(1).random((5, 64, 64)).astype(np.float32)
    q = quantize(v)
    assert q.dtype == np.uint8
    assert np.abs(dequantize(q) - v).max() <= 0.5 / 255 + 1e-7
    assert quantize(np.array([-0.2, 0.0, 1.0, 1.7])).tolist() == [0, 0, 255, 255]


def test_map_accessors_dequantize_and_reject_unknown_labels() -> None:
    h = _heatmaps()
    assert np.array_equal(h.fused_map("Pleural_Thickening"), h.fused[1] / np.float32(255))
    assert h.std_map("Atelectasis").max() <= 0.5
    with pytest.raises(KeyError):
        h.fused_map("Not a label")


@pytest.mark.parametrize(
    "change",
    [
        {"fused": np.zeros((3, 8, 8), np.float32)},  # wrong dtype
        {"std": np.zeros((3, 4, 4), np.uint8)},  # wrong grid
        {"per_model": np.zeros((1, 3, 8, 8), np.uint8)},  # wrong model count
        {"spatial_agreement": np.zeros(2, np.float32)},  # wrong label count
        {"labels": ()},
    ],
)
def test_inconsistent_heatmap_sets_are_rejected(change: dict) -> None:
    with pytest.raises(ValueError):
        replace(_heatmaps(), **change)


def _npz(**arrays: object) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _fields(h: HeatmapSet) -> dict[str, object]:
    with np.load(io.BytesIO(pack_heatmaps(h))) as npz:
        return {k: npz[k] for k in npz.files}


def _garbage() -> dict[str, bytes]:
    good = _fields(_heatmaps())
    blob = pack_heatmaps(_heatmaps())
    return {
        "text": b"this is not an npz archive",
        "empty": b"",
        "truncated": blob[: len(blob) // 2],
        "png": b"\x89PNG\r\n\x1a\n" + bytes(100),
        "pickled objects": _npz(**{**good, "labels": np.array([{"a": 1}], dtype=object)}),
        "missing field": _npz(**{k: v for k, v in good.items() if k != "std"}),
        "extra field": _npz(**good, surprise=np.zeros(1)),
        "other version": _npz(**{**good, "format_version": np.int64(99)}),
        "shape mismatch": _npz(**{**good, "fused": np.zeros((3, 4, 4), np.uint8)}),
        "numeric labels": _npz(**{**good, "labels": np.arange(3)}),
    }


@pytest.mark.parametrize("case", sorted(_garbage()))
def test_garbage_bytes_raise_bad_heatmaps(case: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        unpack_heatmaps(_garbage()[case])
    assert info.value.reason == "BAD_HEATMAPS"
