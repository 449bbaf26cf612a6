"""The wire format of one preprocessed model input between services (ingestion -> TorchServe).

A ``.npy`` blob (numpy's self-describing format: dtype and shape in the header, no pickle) of a float32 array
of shape (1, size, size). It is validated on arrival against the ensemble's PreprocessSpec.
"""

from __future__ import annotations

import io

import numpy as np

from cxr.core.errors import InvalidInputError
from cxr.core.preprocess import PreprocessSpec

INPUT_KEY = "data"  # key of the blob in TorchServe's request map / body


def encode_input(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def decode_input(blob: bytes | bytearray, spec: PreprocessSpec) -> np.ndarray:
    """Bytes -> (1, size, size) float32. Raises InvalidInputError with reason BAD_MODEL_INPUT."""
    try:
        x = np.load(io.BytesIO(bytes(blob)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InvalidInputError(f"model input is not a .npy array: {e}", reason="BAD_MODEL_INPUT") from e
    want = (1, spec.size, spec.size)
    if x.dtype != np.float32 or x.shape != want:
        raise InvalidInputError(
            f"model input must be float32 {want}, got {x.dtype} {x.shape}", reason="BAD_MODEL_INPUT"
        )
    if not np.isfinite(x).all():
        raise InvalidInputError("model input has NaN or infinite values", reason="BAD_MODEL_INPUT")
    return x
