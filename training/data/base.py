"""The in-memory form of any labelled radiograph collection, whatever its source format."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class LabelledImages:
    """N images with an (N, L) label matrix aligned with ``label_names``.

    ``labels`` is float32: 1 = present, 0 = absent, NaN = unknown (losses and metrics mask NaN; never read it
    as absent). ``patient_ids`` groups images for patient-disjoint splits. ``views`` holds PA / AP / L / ...
    (empty string when unknown).
    """

    image_ids: tuple[str, ...]
    paths: tuple[Path, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]
    patient_ids: tuple[str, ...]
    views: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.image_ids)
        if self.labels.shape != (n, len(self.label_names)):
            raise ValueError(f"labels {self.labels.shape} do not match {n} images x {len(self.label_names)} labels")
        if not (len(self.paths) == len(self.patient_ids) == len(self.views) == n):
            raise ValueError("image_ids, paths, patient_ids and views must have the same length")

    def __len__(self) -> int:
        return len(self.image_ids)

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabelledImages:
        idx = np.asarray(indices, dtype=np.int64)
        return LabelledImages(
            image_ids=tuple(self.image_ids[i] for i in idx),
            paths=tuple(self.paths[i] for i in idx),
            labels=self.labels[idx],
            label_names=self.label_names,
            patient_ids=tuple(self.patient_ids[i] for i in idx),
            views=tuple(self.views[i] for i in idx),
        )

    def positives(self) -> np.ndarray:
        """(L,) number of known-positive images per label."""
        return np.nansum(self.labels, axis=0).astype(np.int64)
