"""Compact storage of one image's explanation (numpy only): the value of Redis key ``cxr:job:{job_id}:heatmaps``.

Format: a compressed ``.npz`` (read with ``allow_pickle=False``, so loading never executes code) holding

    format_version ()   int64           FORMAT_VERSION
    labels (L,)         unicode         label names, manifest order
    models (M,)         unicode         model names, manifest order
    grid ()             int64           G
    per_model (M,L,G,G) uint8           each model's Grad-CAM, max-normalised to [0, 1]
    fused (L,G,G)       uint8           mean over models of the normalised maps
    std (L,G,G)         uint8           population std over models (in [0, 0.5], same 1/255 scale)
    spatial_agreement (L,) float32      mean pairwise IoU of the models' top-20% masks
    mean_disagreement (L,) float32      mean over pixels of the (unquantised) std map
    method ()           unicode         how the maps were made (free text, for people)
    explained (L,)      bool            optional: which labels were explained (captum methods explain only a
                                        few; the maps of the others are all zero); absent = all


Every map is quantised as ``round(255 * v)`` for v in [0, 1]: the absolute error is at most 1/510 ~ 0.002.
Map grids are in model-input space: the whole radiograph squashed to a square (``cxr.core.preprocess``), so a
map is stretched back onto the display image's own width and height.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxr.core.errors import InvalidInputError

FORMAT_VERSION = 1
_MAP_FIELDS = ("per_model", "fused", "std")
_FIELDS = ("format_version", "labels", "models", "grid", *_MAP_FIELDS, "spatial_agreement", "mean_disagreement",
           "method")  # fmt: skip


@dataclass(frozen=True, eq=False)
class HeatmapSet:
    """One image's heatmaps; see the module docstring for shapes and scales. Raises ValueError when
    constructed with inconsistent shapes or dtypes."""

    labels: tuple[str, ...]
    models: tuple[str, ...]
    grid: int
    per_model: np.ndarray
    fused: np.ndarray
    std: np.ndarray
    spatial_agreement: np.ndarray
    mean_disagreement: np.ndarray
    method: str
    explained: np.ndarray | None = None

    def __post_init__(self) -> None:
        n_models, n_labels, g = len(self.models), len(self.labels), self.grid
        if n_models < 1 or n_labels < 1 or g < 1:
            raise ValueError(f"need >= 1 model, label and grid cell; got {n_models}, {n_labels}, {g}")
        _check_array("per_model", self.per_model, (n_models, n_labels, g, g), np.uint8)
        _check_array("fused", self.fused, (n_labels, g, g), np.uint8)
        _check_array("std", self.std, (n_labels, g, g), np.uint8)
        _check_array("spatial_agreement", self.spatial_agreement, (n_labels,), np.float32)
        _check_array("mean_disagreement", self.mean_disagreement, (n_labels,), np.float32)
        if self.explained is not None:
            _check_array("explained", self.explained, (n_labels,), np.bool_)

    def label_index(self, label: str) -> int:
        """Position of ``label``; raises KeyError if it is not one of the labels."""
        try:
            return self.labels.index(label)
        except ValueError:
            raise KeyError(label) from None

    def is_explained(self, label: str) -> bool:
        """Whether ``label`` has maps (always, unless a captum method explained only some labels). Raises
        KeyError for an unknown label."""
        j = self.label_index(label)
        return self.explained is None or bool(self.explained[j])

    def fused_map(self, label: str) -> np.ndarray:
        """The fused map of one label as float32 in [0, 1], (G, G). Raises KeyError for an unknown label."""
        return dequantize(self.fused[self.label_index(label)])

    def std_map(self, label: str) -> np.ndarray:
        """The across-model std map of one label as float32 in [0, 0.5], (G, G). Raises KeyError."""
        return dequantize(self.std[self.label_index(label)])


def quantize(values: np.ndarray) -> np.ndarray:
    """Float maps in [0, 1] (values outside are clipped) -> uint8 ``round(255 * v)``."""
    return np.round(np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def dequantize(values: np.ndarray) -> np.ndarray:
    """uint8 maps -> float32 in [0, 1] (inverse of ``quantize`` up to 1/510)."""
    return np.asarray(values, dtype=np.float32) / 255.0


def pack_heatmaps(h: HeatmapSet) -> bytes:
    """HeatmapSet -> compressed npz bytes (see the module docstring), written with zlib's fastest level: for
    14 labels x 3 models on a 64 x 64 grid 3.9 ms and 117 KB instead of np.savez_compressed's 8.0 ms and 108 KB
    (the job's critical path, issue 9). Any npz reader (np.load) reads it."""
    arrays: dict[str, Any] = {
        "format_version": np.int64(FORMAT_VERSION),
        "labels": np.array(h.labels, dtype=np.str_),
        "models": np.array(h.models, dtype=np.str_),
        "grid": np.int64(h.grid),
        "per_model": h.per_model,
        "fused": h.fused,
        "std": h.std,
        "spatial_agreement": h.spatial_agreement,
        "mean_disagreement": h.mean_disagreement,
        "method": np.array(h.method, dtype=np.str_),
    }
    if h.explained is not None:
        arrays["explained"] = h.explained
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, value in arrays.items():
            with archive.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
    return buf.getvalue()


def unpack_heatmaps(blob: bytes) -> HeatmapSet:
    """npz bytes written by ``pack_heatmaps`` -> HeatmapSet.

    Raises InvalidInputError(reason="BAD_HEATMAPS") when the bytes are not such an npz (garbage, truncated, a
    missing or extra field, pickled objects, an unknown format version, inconsistent shapes or dtypes).
    """
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        return _from_arrays(arrays)
    except (ValueError, TypeError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise InvalidInputError(f"not a stored heatmap set: {e}", reason="BAD_HEATMAPS") from e


def _from_arrays(arrays: dict[str, np.ndarray]) -> HeatmapSet:
    if set(arrays) - {"explained"} != set(_FIELDS):
        raise ValueError(f"fields {sorted(arrays)} differ from {sorted(_FIELDS)}")
    if int(arrays["format_version"]) != FORMAT_VERSION:
        raise ValueError(f"format version {arrays['format_version']} is not {FORMAT_VERSION}")
    for name in ("labels", "models", "method"):
        if arrays[name].dtype.kind != "U":
            raise ValueError(f"{name} is not text")
    return HeatmapSet(
        labels=tuple(str(s) for s in arrays["labels"].reshape(-1)),
        models=tuple(str(s) for s in arrays["models"].reshape(-1)),
        grid=int(arrays["grid"]),
        per_model=arrays["per_model"],
        fused=arrays["fused"],
        std=arrays["std"],
        spatial_agreement=arrays["spatial_agreement"],
        mean_disagreement=arrays["mean_disagreement"],
        method=str(arrays["method"]),
        explained=arrays.get("explained"),
    )


def _check_array(name: str, a: object, shape: tuple[int, ...], dtype: type) -> None:
    if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != dtype:
        got = (a.shape, a.dtype) if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{name} must be {np.dtype(dtype).name} of shape {shape}, got {got}")
