"""The wire format of one preprocessed model input between services (ingestion -> TorchServe, ingestion -> Redis
``cxr:job:{id}:input`` -> explanation worker).

Layout version 1 (what ``encode_input`` writes): a 16-byte little-endian header, then the pixels, raw::

    offset  size  field
    0       4     magic b"CXRW"
    4       1     layout version, 1
    5       1     dtype code, 1 = float16 (IEEE 754 half, little-endian); no other code is defined
    6       2     channels C (uint16)
    8       2     height H (uint16)
    10      2     width W (uint16)
    12      4     reserved, zero
    16      C*H*W*2  the normalised model input (what ``cxr.core.preprocess.prepare_image`` returns), C order

The total length is exactly 16 + 2*C*H*W bytes (100,368 for 1 x 224 x 224, half of the float32 npy). float16
keeps ~3 significant digits over the normalised range (about -2.2 .. 2.7): its step there is at most 0.002, ten
times finer than one grey level of an 8-bit radiograph (1/255/std ~ 0.017), so it adds no skew that the
training inputs do not already have (``tests/unit/test_core_wire.py`` bounds the probability change).

Layout 0 (legacy, still accepted by ``decode_input``): a ``.npy`` blob (no pickle) of float32 (1, S, S), what
ingestion sent and stored before layout 1. A blob is told apart by its first bytes (b"CXRW" vs b"\\x93NUMPY").
Every input is validated on arrival against the ensemble's PreprocessSpec.
"""

from __future__ import annotations

import io
import struct

import numpy as np

from cxr.core.errors import InvalidInputError
from cxr.core.preprocess import PreprocessSpec

INPUT_KEY = "data"  # key of the blob in TorchServe's request map / body
MAGIC = b"CXRW"
NPY_MAGIC = b"\x93NUMPY"
LAYOUT_VERSION = 1
DTYPE_FLOAT16 = 1
HEADER = struct.Struct("<4sBBHHHI")  # magic, version, dtype code, C, H, W, reserved
_DTYPES = {DTYPE_FLOAT16: np.dtype("<f2")}
_REASON = "BAD_MODEL_INPUT"


def encode_input(x: np.ndarray) -> bytes:
    """(C, H, W) model input -> layout-1 bytes (float16). Raises ValueError for another rank or a side > 65535."""
    a = np.asarray(x)
    if a.ndim != 3 or max(a.shape) > 0xFFFF:
        raise ValueError(f"model input must be (C, H, W) with sides <= 65535, got shape {a.shape}")
    header = HEADER.pack(MAGIC, LAYOUT_VERSION, DTYPE_FLOAT16, *a.shape, 0)
    return header + np.ascontiguousarray(a, dtype="<f2").tobytes()


def encode_npy(x: np.ndarray) -> bytes:
    """Any array -> legacy layout-0 bytes (float32 npy). For clients of the previous release and tests."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def decode_input(blob: bytes | bytearray | memoryview, spec: PreprocessSpec) -> np.ndarray:
    """Layout-1 or legacy npy bytes -> (1, size, size) float32.

    Raises InvalidInputError (reason BAD_MODEL_INPUT) for an unknown magic, layout version or dtype code, a
    length that does not match the header, a shape other than the spec's, or NaN / infinite values.
    """
    head = bytes(blob[:6])
    if head.startswith(MAGIC):
        x = _decode_layout1(blob)
    elif head.startswith(NPY_MAGIC):
        x = _decode_npy(blob)
    else:
        raise InvalidInputError(f"model input is neither wire layout {LAYOUT_VERSION} nor .npy", reason=_REASON)
    want = (1, spec.size, spec.size)
    if x.shape != want:
        raise InvalidInputError(f"model input must be {want}, got {x.shape}", reason=_REASON)
    if not np.isfinite(x).all():
        raise InvalidInputError("model input has NaN or infinite values", reason=_REASON)
    return x


def _decode_layout1(blob: bytes | bytearray | memoryview) -> np.ndarray:
    if len(blob) < HEADER.size:
        raise InvalidInputError(f"model input is {len(blob)} bytes, shorter than the wire header", reason=_REASON)
    _, version, code, c, h, w, _ = HEADER.unpack_from(blob)
    if version != LAYOUT_VERSION:
        raise InvalidInputError(f"unsupported wire layout version {version} (this server reads 1)", reason=_REASON)
    dtype = _DTYPES.get(code)
    if dtype is None:
        raise InvalidInputError(f"unknown wire dtype code {code} (1 = float16)", reason=_REASON)
    expected = HEADER.size + c * h * w * dtype.itemsize
    if len(blob) != expected:
        raise InvalidInputError(
            f"model input of shape ({c}, {h}, {w}) needs {expected} bytes, got {len(blob)}", reason=_REASON
        )
    pixels = np.frombuffer(blob, dtype=dtype, offset=HEADER.size).reshape(c, h, w)
    return pixels.astype(np.float32)


def _decode_npy(blob: bytes | bytearray | memoryview) -> np.ndarray:
    try:
        x = np.load(io.BytesIO(bytes(blob)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InvalidInputError(f"model input is not a .npy array: {e}", reason=_REASON) from e
    if x.dtype != np.float32:
        raise InvalidInputError(f"a .npy model input must be float32, got {x.dtype}", reason=_REASON)
    return x
