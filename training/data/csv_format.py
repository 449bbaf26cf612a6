"""The plain CSV format: how any hospital's labelled radiographs enter training.

One row per image, UTF-8, with a header. Columns:

``path`` (required)
    the image file; a relative path is resolved against the CSV file's folder.
``labels`` (required)
    ``|``-separated label names present on the image, e.g. ``cardiomegaly|pleural effusion``; empty = none of
    the vocabulary is present. Surrounding whitespace is ignored.
``patient_id`` (required, non-empty)
    groups images for patient-disjoint splits; when every image is its own patient, repeat the image id.
``view`` (optional)
    PA / AP / L / ...; empty or absent = unknown.
``image_id`` (optional)
    unique id of the image; defaults to ``path`` exactly as written.

How "unknown" is written (read as NaN, never as absent):
``?name`` in ``labels`` marks that label as unknown for the image (e.g. ``cardiomegaly|?pneumonia``: cardiomegaly
present, pneumonia not assessable, everything else absent). ``?*`` marks every vocabulary label that the row
does not list as unknown (for partially annotated data: ``effusion|?*`` = effusion present, nothing known about
the rest). A label may not be both present and unknown in one row.

Vocabulary (the label columns, in order): the ``label_names`` argument if given; else the sidecar file
``<csv stem>.labels.txt`` beside the CSV (one label per line, written by :func:`write_csv_dataset`) if present;
else every label the CSV mentions, by descending number of positive images (ties by name). A label outside the
vocabulary is an error, not silently dropped.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from training.data.base import LabelledImages

REQUIRED_COLUMNS: tuple[str, ...] = ("path", "labels", "patient_id")
SEPARATOR = "|"
UNKNOWN = "?"
REST_UNKNOWN = "?*"

Row = tuple[frozenset[str], frozenset[str], bool]  # (present, unknown, rest unknown)


def vocabulary_path(csv_path: Path) -> Path:
    """The sidecar vocabulary file of ``csv_path``: ``<stem>.labels.txt`` in the same folder."""
    return csv_path.with_name(f"{csv_path.stem}.labels.txt")


def load_csv_dataset(csv_path: Path, *, label_names: Sequence[str] | None = None) -> LabelledImages:
    """Read a plain-CSV dataset (format in the module docstring).

    Returns LabelledImages with labels in vocabulary order (1 present, 0 absent, NaN unknown). Raises
    FileNotFoundError for a missing CSV; ValueError for a missing column, an empty path or patient id, a
    duplicate image id, a label outside the vocabulary, a malformed label token, or a duplicate vocabulary entry.
    """
    csv_path = Path(csv_path)
    table = _read_table(csv_path)
    rows = [_parse_labels_cell(cell, line) for line, cell in enumerate(table["labels"].tolist(), start=2)]
    vocabulary = _vocabulary(csv_path, label_names, rows)
    image_ids = tuple(table["image_id"].tolist()) if "image_id" in table.columns else tuple(table["path"].tolist())
    _check_unique(image_ids, csv_path)
    views = tuple(table["view"].tolist()) if "view" in table.columns else ("",) * len(table)
    return LabelledImages(
        image_ids=image_ids,
        paths=tuple(csv_path.parent / p for p in table["path"].tolist()),
        labels=_label_matrix(rows, vocabulary, csv_path),
        label_names=vocabulary,
        patient_ids=tuple(table["patient_id"].tolist()),
        views=views,
    )


def _read_table(csv_path: Path) -> pd.DataFrame:
    """The CSV as strings, whitespace-stripped; ValueError if unreadable, columns are missing or cells empty."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"dataset CSV not found: {csv_path}")
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"{csv_path} is not a readable dataset CSV: {e}") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{csv_path} lacks the column(s) {missing}; required: {list(REQUIRED_COLUMNS)}")
    table = table.apply(lambda column: column.str.strip())
    for column in ("path", "patient_id", *(["image_id"] if "image_id" in table.columns else [])):
        empty = np.flatnonzero((table[column] == "").to_numpy())
        if len(empty):
            raise ValueError(f"{csv_path}: empty {column} on line {empty[0] + 2} ({len(empty)} rows)")
    return table


def _parse_labels_cell(cell: str, line: int) -> Row:
    """``a|?b|?*`` -> ({a}, {b}, True). ValueError for an empty ``?`` or a label both present and unknown."""
    tokens = [t.strip() for t in cell.split(SEPARATOR)]
    tokens = [t for t in tokens if t]
    rest_unknown = REST_UNKNOWN in tokens
    unknown = {t[1:].strip() for t in tokens if t.startswith(UNKNOWN) and t != REST_UNKNOWN}
    present = {t for t in tokens if not t.startswith(UNKNOWN)}
    if "" in unknown:
        raise ValueError(f"line {line}: '{UNKNOWN}' must be followed by a label name (or '*')")
    both = present & unknown
    if both:
        raise ValueError(f"line {line}: label(s) {sorted(both)} both present and unknown")
    return frozenset(present), frozenset(unknown), rest_unknown


def _vocabulary(csv_path: Path, label_names: Sequence[str] | None, rows: list[Row]) -> tuple[str, ...]:
    if label_names is not None:
        names = tuple(label_names)
    elif vocabulary_path(csv_path).is_file():
        text = vocabulary_path(csv_path).read_text(encoding="utf-8")
        names = tuple(line.strip() for line in text.splitlines() if line.strip())
    else:
        positives = Counter(label for present, _, _ in rows for label in present)
        mentioned = positives.keys() | {label for _, unknown, _ in rows for label in unknown}
        names = tuple(sorted(mentioned, key=lambda label: (-positives[label], label)))
    duplicated = sorted(label for label, n in Counter(names).items() if n > 1)
    if duplicated:
        raise ValueError(f"label vocabulary of {csv_path} repeats {duplicated}")
    if not names:
        raise ValueError(f"{csv_path}: empty label vocabulary")
    return names


def _label_matrix(rows: list[Row], vocabulary: tuple[str, ...], csv_path: Path) -> np.ndarray:
    column = {label: j for j, label in enumerate(vocabulary)}
    labels = np.zeros((len(rows), len(vocabulary)), dtype=np.float32)
    for i, (present, unknown, rest_unknown) in enumerate(rows):
        outside = sorted((present | unknown) - column.keys())
        if outside:
            raise ValueError(f"{csv_path} line {i + 2}: label(s) {outside} not in the vocabulary {list(vocabulary)}")
        if rest_unknown:
            labels[i] = np.nan
        labels[i, [column[label] for label in unknown]] = np.nan
        labels[i, [column[label] for label in present]] = 1.0
    return labels


def _check_unique(image_ids: tuple[str, ...], csv_path: Path) -> None:
    repeated = [image_id for image_id, n in Counter(image_ids).items() if n > 1]
    if repeated:
        raise ValueError(f"{csv_path}: {len(repeated)} image ids occur twice, e.g. {repeated[0]!r}")


def write_csv_dataset(ds: LabelledImages, csv_path: Path) -> None:
    """Write ``ds`` as a plain CSV plus its vocabulary sidecar (``<stem>.labels.txt``).

    Paths inside the CSV's folder are written relative to it, others as they are (a relative path is then read
    back relative to the CSV's folder). Unknown labels are written ``?name``. Raises ValueError for a label name
    the format cannot hold (empty, containing ``|`` or a line break, or starting with ``?``) and for label values
    other than 0, 1 and NaN.
    """
    csv_path = Path(csv_path)
    for name in ds.label_names:
        if not name.strip() or name != name.strip() or SEPARATOR in name or "\n" in name or name.startswith(UNKNOWN):
            raise ValueError(f"label name {name!r} cannot be written in the plain CSV format")
    finite = ds.labels[~np.isnan(ds.labels)]
    if not np.isin(finite, (0.0, 1.0)).all():
        raise ValueError("the plain CSV format holds 0 / 1 / unknown labels only; found other values")
    table = pd.DataFrame(
        {
            "image_id": ds.image_ids,
            "path": [_relative_to(p, csv_path.parent) for p in ds.paths],
            "labels": [_labels_cell(row, ds.label_names) for row in ds.labels],
            "patient_id": ds.patient_ids,
            "view": ds.views,
        }
    )
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(csv_path, index=False)
    vocabulary_path(csv_path).write_text("\n".join(ds.label_names) + "\n", encoding="utf-8")


def _labels_cell(row: np.ndarray, names: tuple[str, ...]) -> str:
    """One label row -> ``a|?b``: present labels by name, unknown ones prefixed with ``?``."""
    tokens = []
    for name, value in zip(names, row.tolist(), strict=True):
        if math.isnan(value):
            tokens.append(f"{UNKNOWN}{name}")
        elif value == 1:
            tokens.append(name)
    return SEPARATOR.join(tokens)


def _relative_to(path: Path, folder: Path) -> str:
    try:
        return path.relative_to(folder.resolve() if path.is_absolute() else folder).as_posix()
    except ValueError:
        return str(path)
