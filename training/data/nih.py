"""NIH ChestX-ray14 in the layout of ``shared/data/nih-cxr14-621``.

``<root>/labels.csv``: one row per image with ``Image Index`` (file name), one 0/1 column per finding named as in
``cxr.core.labels.NIH_CXR14`` (14 findings + ``No_Finding``), ``Patient ID`` and ``View Position``.
``<root>/<image_dir>/<Image Index>``: the images. NIH labels are complete (mined from every report for every
finding): the matrix holds 0/1 only, no NaN.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxr.core.labels import NIH_CXR14
from training.data.base import LabelledImages

LABELS_FILE = "labels.csv"
ID_COLUMNS: tuple[str, ...] = ("Image Index", "Patient ID", "View Position")


def load_nih_folder(root: Path, *, image_dir: str = "images_512") -> LabelledImages:
    """Load ``root/labels.csv`` with images under ``root/image_dir``; labels in ``NIH_CXR14`` order.

    Raises FileNotFoundError when labels.csv, the image folder or any listed image is missing; ValueError when
    a column is missing, a label value is not 0/1, or an image is listed twice.
    """
    root = Path(root)
    table = _read_labels(root / LABELS_FILE)
    images = root / image_dir
    if not images.is_dir():
        raise FileNotFoundError(f"NIH image folder not found: {images}")
    image_ids = tuple(table["Image Index"].astype(str).tolist())
    if len(set(image_ids)) != len(image_ids):
        raise ValueError(f"{root / LABELS_FILE} lists an image more than once")
    paths = tuple(images / i for i in image_ids)
    _check_files_exist(paths, images)
    return LabelledImages(
        image_ids=image_ids,
        paths=paths,
        labels=_label_matrix(table, root / LABELS_FILE),
        label_names=NIH_CXR14,
        patient_ids=tuple(table["Patient ID"].astype(str).tolist()),
        views=tuple(table["View Position"].fillna("").astype(str).tolist()),
    )


def _read_labels(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"NIH labels file not found: {path}")
    table = pd.read_csv(path)
    missing = [c for c in (*ID_COLUMNS, *NIH_CXR14) if c not in table.columns]
    if missing:
        raise ValueError(f"{path} is not an NIH labels table: missing columns {missing}")
    return table


def _label_matrix(table: pd.DataFrame, path: Path) -> np.ndarray:
    """(N, 15) float32 of the finding columns; ValueError unless every value is 0 or 1."""
    values = table[list(NIH_CXR14)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isin(values, (0.0, 1.0))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"{path}: label {NIH_CXR14[col]!r} of row {row + 2} is not 0/1 ({bad.sum()} such values)")
    return values.astype(np.float32)


def _check_files_exist(paths: tuple[Path, ...], folder: Path) -> None:
    present = {p.name for p in folder.iterdir()}
    absent = [p.name for p in paths if p.name not in present]
    if absent:
        raise FileNotFoundError(f"{len(absent)} images listed in labels.csv are missing from {folder}: {absent[:3]}")
