"""PadChest: read the official index and select images and labels as the paper did.

Input: ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz)`` (one row per image). The columns used are
``ImageID``, ``ImageDir``, ``PatientID``, ``Projection`` and ``Labels`` (a Python-literal list of strings).

Counting rule (reproduces the paper's published numbers on the real index; checked by tests/unit/test_padchest.py):

1. ``Labels`` is parsed with :func:`ast.literal_eval`; a row whose value is missing or is not a list of strings
   is *malformed*: counted, logged and skipped, never fatal. The real index has 103 such rows (their cell holds
   the text ``nan``), 65 of them PA.
2. Projection filter on the ``Projection`` column: ``PA`` keeps **91,728** rows, malformed ones included (the
   paper's count).
3. Each label string is stripped of surrounding whitespace (the index holds e.g. ``' pneumonia'`` next to
   ``'pneumonia'``), empty strings are dropped (``''`` is the 29th most frequent "label" otherwise) and duplicates
   inside one row collapse: a label counts **once per image**.
4. Label frequency = number of projection images carrying it. ``normal`` is a label like any other and counts.
   Labels are ranked by frequency (ties by name); the top 35 are exactly the paper's 35, in the paper's order
   (``cxr.core.labels.PADCHEST_PAPER_35``): the 35th, supra aortic elongation, has 1,046 PA images, the 36th,
   consolidation, 930. Without stripping, supra aortic elongation has only 201 images, which is the "200 for the
   rarest kept label" in the paper's imbalance remark: that remark used unstripped strings, the selection did not.
5. Images with at least one selected label are kept: **85,455** with this rule. The paper reports 85,367
   (88 fewer, 0.10 %). No rule visible in the index explains the 88: we tried dropping pediatric rows (49),
   patients under 10 years (torchxrayvision's filter), torchxrayvision's list of missing images (4 of them
   here), rows labelled ``exclude`` (12) or ``suboptimal study`` (355), rows without a report, labels taken
   per sentence, and not stripping (84,223). The most plausible cause is images the authors could not read
   from their download, which the index cannot show. We keep the documented rule.

Label matrix: 1 present / 0 absent, no NaN. PadChest labels are complete for the selected vocabulary: every
report was labelled (by physicians or by their trained labeller) against the full term list, so a label missing
from a row means the finding was not reported, i.e. absent.

Images are 16-bit PNG files the user brings: ``paths`` = ``image_root / ImageDir / ImageID`` (just ``ImageID``
when no root is given).
"""

from __future__ import annotations

import ast
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from training.data.base import LabelledImages

log = logging.getLogger(__name__)

INDEX_COLUMNS: tuple[str, ...] = ("ImageID", "ImageDir", "PatientID", "Projection", "Labels")
FINDINGS = "findings"  # column added by read_padchest_index: tuple of clean labels, None when malformed


@dataclass(frozen=True)
class PadChestSelection:
    """The outcome of :func:`select_padchest`.

    ``pa_images``: rows of the chosen projection (malformed ones included); ``labels``: the selected vocabulary
    in frequency order; ``label_counts``: images per selected label; ``images``: images with at least one
    selected label (= ``len(dataset)``); ``malformed_rows``: projection rows skipped because ``Labels`` did not
    parse.
    """

    pa_images: int
    labels: tuple[str, ...]
    label_counts: dict[str, int]
    images: int
    malformed_rows: int
    dataset: LabelledImages


def parse_labels(raw: object) -> tuple[str, ...] | None:
    """One ``Labels`` cell -> stripped, non-empty, de-duplicated labels in first-seen order; None if malformed."""
    if not isinstance(raw, str):
        return None
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if not isinstance(value, list | tuple) or not all(isinstance(x, str) for x in value):
        return None
    return tuple(dict.fromkeys(s for s in (x.strip() for x in value) if s))


def read_padchest_index(csv_path: Path) -> tuple[pd.DataFrame, int]:
    """Read a PadChest index (csv or csv.gz).

    Returns ``(df, malformed)``: ``df`` has the columns of ``INDEX_COLUMNS`` as strings plus ``findings``
    (tuple of labels, see the module docstring; None on malformed rows, which stay in ``df`` so projection counts
    include them and are skipped by :func:`select_padchest`); ``malformed`` = number of rows whose ``Labels``
    do not parse. Raises FileNotFoundError if the file is missing, ValueError if it is not a PadChest index.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"PadChest index not found: {path}")
    df = _read_columns(path)
    df[FINDINGS] = [parse_labels(raw) for raw in df["Labels"].tolist()]
    malformed = int(df[FINDINGS].isna().sum())
    if malformed:
        log.warning("PadChest index %s: %d rows with unparsable Labels are skipped", path.name, malformed)
    return df, malformed


def _read_columns(path: Path) -> pd.DataFrame:
    """The index columns of ``path`` as strings (Labels keeps NaN for empty cells)."""
    try:
        header = pd.read_csv(path, nrows=0)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError) as e:
        raise ValueError(f"{path} is not a readable PadChest index (CSV): {e}") from e
    missing = [c for c in INDEX_COLUMNS if c not in header.columns]
    if missing:
        raise ValueError(f"{path} is not a PadChest index: missing columns {missing}")
    try:
        df = pd.read_csv(
            path, usecols=list(INDEX_COLUMNS), dtype=str, keep_default_na=False, na_values={"Labels": [""]}
        )
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as e:
        raise ValueError(f"{path} is not a readable PadChest index (CSV): {e}") from e
    return df


def select_padchest(
    df: pd.DataFrame,
    *,
    projection: str = "PA",
    top_k: int | None = 35,
    min_count: int | None = None,
    image_root: Path | None = None,
) -> PadChestSelection:
    """Select one projection, its most frequent labels and the images carrying at least one of them.

    ``df`` comes from :func:`read_padchest_index`. Vocabulary: labels ranked by image count (ties by name),
    keeping those with ``count >= min_count`` (when given) and then the first ``top_k`` (when given); neither
    given keeps every label. Raises ValueError for top_k / min_count < 1, a frame without the index columns,
    or a selection that keeps no label or no image.
    """
    _check_selection_args(df, top_k, min_count)
    rows = df[df["Projection"] == projection]
    malformed = int(rows[FINDINGS].isna().sum())
    valid = rows[rows[FINDINGS].notna()]
    counts = Counter(label for findings in valid[FINDINGS] for label in findings)
    vocabulary = rank_labels(counts, top_k=top_k, min_count=min_count)
    if not vocabulary:
        raise ValueError(f"no label of projection {projection!r} passes top_k={top_k}, min_count={min_count}")
    dataset = _build_dataset(valid, vocabulary, projection, image_root)
    log.info(
        "PadChest %s: %d images, %d labels, %d images selected", projection, len(rows), len(vocabulary), len(dataset)
    )
    return PadChestSelection(
        pa_images=len(rows),
        labels=vocabulary,
        label_counts={label: counts[label] for label in vocabulary},
        images=len(dataset),
        malformed_rows=malformed,
        dataset=dataset,
    )


def _check_selection_args(df: pd.DataFrame, top_k: int | None, min_count: int | None) -> None:
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if min_count is not None and min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    missing = [c for c in (*INDEX_COLUMNS, FINDINGS) if c not in df.columns]
    if missing:
        raise ValueError(f"not a frame from read_padchest_index: missing columns {missing}")


def rank_labels(counts: Counter[str], *, top_k: int | None, min_count: int | None) -> tuple[str, ...]:
    """Labels by descending count (ties by name), filtered by ``min_count`` then cut to ``top_k``."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    kept = [label for label, n in ranked if min_count is None or n >= min_count]
    return tuple(kept if top_k is None else kept[:top_k])


def _build_dataset(
    rows: pd.DataFrame, vocabulary: tuple[str, ...], projection: str, image_root: Path | None
) -> LabelledImages:
    """Label matrix of the rows carrying >= 1 vocabulary label; raises ValueError if none does."""
    column = {label: j for j, label in enumerate(vocabulary)}
    hits = [[column[x] for x in findings if x in column] for findings in rows[FINDINGS]]
    keep = np.fromiter((bool(h) for h in hits), dtype=bool, count=len(hits))
    if not keep.any():
        raise ValueError("no image carries any selected label")
    labels = np.zeros((int(keep.sum()), len(vocabulary)), dtype=np.float32)
    kept_hits = [h for h, k in zip(hits, keep, strict=True) if k]
    row_idx = np.repeat(np.arange(len(kept_hits)), [len(h) for h in kept_hits])
    labels[row_idx, np.concatenate(kept_hits)] = 1.0
    kept = rows[keep]
    image_ids = tuple(kept["ImageID"].tolist())
    return LabelledImages(
        image_ids=image_ids,
        paths=_image_paths(image_ids, tuple(kept["ImageDir"].tolist()), image_root),
        labels=labels,
        label_names=vocabulary,
        patient_ids=tuple(kept["PatientID"].tolist()),
        views=(projection,) * len(image_ids),
    )


def _image_paths(image_ids: tuple[str, ...], image_dirs: tuple[str, ...], root: Path | None) -> tuple[Path, ...]:
    if root is None:
        return tuple(Path(i) for i in image_ids)
    return tuple(root / d / i for d, i in zip(image_dirs, image_ids, strict=True))
