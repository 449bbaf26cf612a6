"""Manifest validation / round trip, weights checks, preprocessing and the ingestion -> TorchServe wire format."""

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cxr.core.errors import InvalidInputError, ManifestError
from cxr.core.manifest import Manifest, ModelEntry, checked_weights_path, file_sha256, read_manifest, write_manifest
from cxr.core.preprocess import PreprocessSpec, load_image_file, normalize, prepare_image, resize_square, to_unit_range
from cxr.core.wire import decode_input, encode_input, encode_npy

pytestmark = pytest.mark.unit
NIH = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "nih-cxr14-621" / "images_512"


def _manifest(**kw: object) -> Manifest:
    base: dict = dict(
        name="t", version="1", labels=("a", "b"), thresholds=(0.5, 0.3), models=(ModelEntry("m", "resnet18", "m.pt"),)
    )
    base.update(kw)
    return Manifest(**base)


def test_manifest_round_trip(tmp_path: Path) -> None:
    m = _manifest(preprocess=PreprocessSpec(size=128, mean=0.4, std=0.2))
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"thresholds": (0.5,)}, "1 thresholds for 2 labels"),
        ({"labels": ("a", "a")}, "unique"),
        ({"thresholds": (0.5, 1.5)}, "outside"),
        ({"models": ()}, "at least one model"),
        ({"ensemble_rule": "median"}, "unknown ensemble rule"),
        ({"models": (ModelEntry("m", "x", "a.pt"), ModelEntry("m", "x", "b.pt"))}, "unique"),
    ],
)
def test_manifest_rejects_inconsistent(kw: dict, match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        _manifest(**kw)


def test_read_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"name": "x"}')
    with pytest.raises(ManifestError, match="malformed"):
        read_manifest(tmp_path)


def test_file_sha256_reads_in_chunks_and_equals_the_whole_file_digest(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    data = np.random.default_rng(0).bytes((5 << 20) // 2)  # 2.5 MiB: several 1 MiB chunks and a partial one
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_checked_weights_path_accepts_a_matching_file_and_refuses_missing_or_altered_ones(tmp_path: Path) -> None:
    entry = ModelEntry("m", "resnet18", "m.pt")
    with pytest.raises(ManifestError, match="weights m.pt of model m missing in"):
        checked_weights_path(tmp_path, entry)
    (tmp_path / "m.pt").write_bytes(b"weights")
    assert checked_weights_path(tmp_path, entry) == tmp_path / "m.pt"  # no sha256 in the manifest: not checked
    pinned = replace(entry, sha256=file_sha256(tmp_path / "m.pt"))
    assert checked_weights_path(str(tmp_path), pinned) == tmp_path / "m.pt"
    (tmp_path / "m.pt").write_bytes(b"weights, altered")
    with pytest.raises(ManifestError, match="do not match the manifest's sha256"):
        checked_weights_path(tmp_path, pinned)


def test_to_unit_range_integer_and_float() -> None:
    assert to_unit_range(np.array([[0, 255]], dtype=np.uint8)).tolist() == [[0.0, 1.0]]
    assert to_unit_range(np.array([[0, 65535]], dtype=np.uint16)).tolist() == [[0.0, 1.0]]
    assert np.allclose(to_unit_range(np.array([[2.0, 4.0]])), [[0.0, 1.0]])
    with pytest.raises(InvalidInputError):
        to_unit_range(np.zeros((2, 2, 3), dtype=np.uint8))


def test_prepare_real_radiograph_shape_range_and_orientation() -> None:
    img = load_image_file(sorted(NIH.glob("*.png"))[0])
    assert img.shape == (512, 512) and img.dtype == np.float32 and 0.0 <= img.min() < img.max() <= 1.0
    spec = PreprocessSpec(size=224)
    x = prepare_image(img, spec)
    assert x.shape == (1, 224, 224) and x.dtype == np.float32
    # normalisation is exactly (x - mean) / std of the resized image
    assert np.allclose(x[0] * spec.std + spec.mean, resize_square(img, 224), atol=1e-6)
    # antialiased downsampling keeps the mean brightness
    assert abs(float(resize_square(img, 64).mean()) - float(img.mean())) < 0.01


def test_normalize_rejects_wrong_size() -> None:
    with pytest.raises(InvalidInputError, match="expected 224x224"):
        normalize(np.zeros((10, 10), np.float32), PreprocessSpec(size=224))


def test_sixteen_bit_png_is_scaled_by_full_range(tmp_path: Path) -> None:
    from PIL import Image

    a = np.array([[0, 32768], [65535, 1000]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "x.png")
    got = load_image_file(tmp_path / "x.png")
    assert np.allclose(got, a / 65535.0, atol=1e-6)


def test_wire_round_trip_and_rejections() -> None:
    spec = PreprocessSpec(size=32)
    x = np.random.default_rng(0).normal(size=(1, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(decode_input(encode_input(x), spec), x, rtol=2**-11, atol=0)
    assert np.array_equal(decode_input(encode_npy(x), spec), x)
    with pytest.raises(InvalidInputError, match="neither wire layout"):
        decode_input(b"garbage", spec)
    with pytest.raises(InvalidInputError, match="not a .npy"):
        decode_input(b"\x93NUMPY garbage", spec)
    with pytest.raises(InvalidInputError, match=r"must be \(1, 32, 32\)"):
        decode_input(encode_input(np.zeros((1, 16, 16), np.float32)), spec)
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        decode_input(encode_input(bad), spec)
