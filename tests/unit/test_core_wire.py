"""cxr.core.wire layout 1 (raw float16 + 16-byte header) and the legacy npy layout, on real NIH radiographs."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from serving_fixtures import SIZE, nih_inputs

from cxr.core.errors import InvalidInputError
from cxr.core.preprocess import PreprocessSpec
from cxr.core.wire import HEADER, MAGIC, decode_input, encode_input, encode_npy

pytestmark = pytest.mark.unit

SPEC = PreprocessSpec(size=SIZE)


def test_layout_1_is_header_plus_raw_float16() -> None:
    x = nih_inputs(1)[0]
    blob = encode_input(x)
    assert len(blob) == 16 + 2 * SIZE * SIZE and HEADER.size == 16
    assert struct.unpack_from("<4sBBHHHI", blob) == (MAGIC, 1, 1, 1, SIZE, SIZE, 0)
    pixels = np.frombuffer(blob, dtype="<f2", offset=16).reshape(1, SIZE, SIZE)
    np.testing.assert_array_equal(pixels, x.astype(np.float16))
    assert len(blob) < len(encode_npy(x)) / 1.9  # half the float32 npy


def test_float16_error_is_far_below_one_grey_level() -> None:
    x = nih_inputs(4)
    back = np.stack([decode_input(encode_input(a), SPEC) for a in x])
    grey_level = 1.0 / 255.0 / SPEC.std  # one step of an 8-bit radiograph, in normalised units
    assert np.abs(back - x).max() < grey_level / 4


def test_legacy_npy_is_still_read_exactly() -> None:
    x = nih_inputs(1)[0]
    np.testing.assert_array_equal(decode_input(encode_npy(x), SPEC), x)


def _with_header(blob: bytes, **fields: int) -> bytes:
    magic, version, code, c, h, w, reserved = HEADER.unpack_from(blob)
    values = {"version": version, "code": code, "c": c, "h": h, "w": w} | fields
    header = HEADER.pack(magic, values["version"], values["code"], values["c"], values["h"], values["w"], reserved)
    return header + blob[HEADER.size :]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:-2], "needs 8208 bytes, got 8206"),  # one pixel short
        (lambda b: b + b"\0\0", "needs 8208 bytes, got 8210"),  # one pixel too many
        (lambda b: b[:10], "shorter than the wire header"),
        (lambda b: _with_header(b, version=2), "unsupported wire layout version 2"),
        (lambda b: _with_header(b, code=7), "unknown wire dtype code 7"),
        (lambda b: _with_header(b, h=SIZE // 2, w=SIZE * 2), r"must be \(1, 64, 64\)"),  # consistent, wrong shape
        (lambda b: b"XXXX" + b[4:], "neither wire layout 1 nor .npy"),
    ],
    ids=["short", "long", "header-only", "version", "dtype", "shape", "magic"],
)
def test_bad_blobs_get_a_typed_error(mutate: object, message: str) -> None:
    blob = encode_input(nih_inputs(1)[0])
    with pytest.raises(InvalidInputError, match=message) as info:
        decode_input(mutate(blob), SPEC)  # type: ignore[operator]
    assert info.value.reason == "BAD_MODEL_INPUT"


def test_non_finite_values_are_rejected() -> None:
    x = nih_inputs(1)[0].copy()
    x[0, 3, 3] = np.inf
    with pytest.raises(InvalidInputError, match="NaN or infinite"):
        decode_input(encode_input(x), SPEC)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        encode_input(x[0])
