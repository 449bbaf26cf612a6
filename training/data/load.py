"""One entry point for every dataset format: look at a path, pick the reader."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from training.data.base import LabelledImages
from training.data.csv_format import REQUIRED_COLUMNS, load_csv_dataset
from training.data.nih import LABELS_FILE, load_nih_folder
from training.data.padchest import INDEX_COLUMNS

DATASET_CSVS: tuple[str, ...] = ("dataset.csv", "selection.csv")  # selection.csv: written by `cxr padchest-index`


def load_dataset(path: Path) -> LabelledImages:
    """Load the dataset at ``path``.

    - a folder with ``labels.csv`` (NIH layout, like ``shared/data/nih-cxr14-621``) -> :func:`load_nih_folder`;
    - a ``.csv`` file, or a folder holding ``dataset.csv`` (or ``selection.csv``, the output of
      ``cxr padchest-index``) -> :func:`load_csv_dataset` (plain CSV format).

    Raises FileNotFoundError when ``path`` does not exist; ValueError when it is none of the above (a PadChest
    index gets a hint to run ``cxr padchest-index`` first); the readers' own errors pass through.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    if path.is_dir():
        if (path / LABELS_FILE).is_file():
            return load_nih_folder(path)
        for name in DATASET_CSVS:
            if (path / name).is_file():
                return load_csv_dataset(path / name)
        raise ValueError(
            f"{path}: not a dataset folder (expected {LABELS_FILE} of the NIH layout or {DATASET_CSVS[0]})"
        )
    if path.name.endswith((".csv", ".csv.gz")):
        _reject_padchest_index(path)
        return load_csv_dataset(path)
    raise ValueError(f"{path}: unknown dataset format (expected a .csv file or a dataset folder)")


def _reject_padchest_index(path: Path) -> None:
    """ValueError with a hint when ``path`` is a raw PadChest index rather than a plain-CSV dataset."""
    try:
        columns = set(pd.read_csv(path, nrows=0).columns)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError) as e:
        raise ValueError(f"{path} is not a readable CSV: {e}") from e
    if set(INDEX_COLUMNS) <= columns and not set(REQUIRED_COLUMNS) <= columns:
        raise ValueError(
            f"{path} is a raw PadChest index: run `cxr padchest-index --csv {path} --out DIR` and train on DIR"
        )
