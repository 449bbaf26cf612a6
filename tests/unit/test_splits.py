"""Patient-disjoint multilabel-stratified splits: on the real PadChest selection, on NIH, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

from training.data.base import LabelledImages
from training.data.nih import load_nih_folder
from training.data.padchest import read_padchest_index, select_padchest
from training.splits import PARTS, Split, make_split

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
INDEX = DATA / "padchest" / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
FRACTIONS = (0.7, 0.1, 0.2)
PAPER_SPLIT = {"train": 59_753, "val": 8_532, "test": 17_082}


@pytest.fixture(scope="module")
def padchest() -> LabelledImages:
    df, _ = read_padchest_index(INDEX)
    return select_padchest(df).dataset


@pytest.fixture(scope="module")
def split0(padchest: LabelledImages) -> Split:
    return make_split(padchest, FRACTIONS, seed=0)


@pytest.fixture(scope="module")
def nih() -> LabelledImages:
    return load_nih_folder(DATA / "nih-cxr14-621")


def worst_relative_deviation(ds: LabelledImages, idx: np.ndarray) -> float:
    """Largest |prevalence in the part / overall prevalence - 1| over the labels."""
    overall = np.nanmean(ds.labels, axis=0)
    return float(np.max(np.abs(np.nanmean(ds.labels[idx], axis=0) / overall - 1)))


def with_labels(ds: LabelledImages, labels: np.ndarray) -> LabelledImages:
    return LabelledImages(ds.image_ids, ds.paths, labels, ds.label_names, ds.patient_ids, ds.views)


# --- the real PadChest selection -------------------------------------------------------------------------------


def test_padchest_sizes_match_fractions_and_paper(padchest: LabelledImages, split0: Split) -> None:
    sizes = {part: len(split0.part(part)) for part in PARTS}
    assert sum(sizes.values()) == len(padchest)
    for part, fraction in zip(PARTS, FRACTIONS, strict=True):
        assert abs(sizes[part] / len(padchest) - fraction) < 0.01 * fraction
        assert abs(sizes[part] - PAPER_SPLIT[part]) / PAPER_SPLIT[part] < 0.01


def test_padchest_every_image_once_and_patients_disjoint(padchest: LabelledImages, split0: Split) -> None:
    ids = [i for part in PARTS for i in split0.part(part)]
    assert sorted(ids) == sorted(padchest.image_ids)
    assert split0.patients_in_two_splits(padchest) == 0
    patients = [{padchest.patient_ids[i] for i in split0.indices(padchest, part)} for part in PARTS]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])


def test_padchest_every_label_keeps_its_prevalence(padchest: LabelledImages, split0: Split) -> None:
    for part, tolerance in zip(PARTS, (0.01, 0.05, 0.02), strict=True):
        assert worst_relative_deviation(padchest, split0.indices(padchest, part)) < tolerance, part


def test_padchest_stratifies_better_than_iterstrat_at_patient_level(padchest: LabelledImages, split0: Split) -> None:
    """The textbook route (iterstrat twice, one any-positive row per patient) as the bar to clear."""
    codes = np.unique(np.asarray(padchest.patient_ids), return_inverse=True)[1]
    y = np.zeros((codes.max() + 1, padchest.labels.shape[1]), dtype=np.int64)
    np.maximum.at(y, codes, padchest.labels.astype(np.int64))
    rest, test = next(MultilabelStratifiedShuffleSplit(1, test_size=0.2, random_state=0).split(y, y))
    train, val = next(MultilabelStratifiedShuffleSplit(1, test_size=0.125, random_state=0).split(y[rest], y[rest]))
    for part, chosen in (("val", rest[val]), ("test", test)):
        theirs = worst_relative_deviation(padchest, np.flatnonzero(np.isin(codes, chosen)))
        ours = worst_relative_deviation(padchest, split0.indices(padchest, part))
        assert ours < theirs, part


def test_padchest_deterministic_and_seeded(padchest: LabelledImages, split0: Split) -> None:
    assert make_split(padchest, FRACTIONS, seed=0) == split0
    other = make_split(padchest, FRACTIONS, seed=1)
    assert other != split0 and other.patients_in_two_splits(padchest) == 0
    assert worst_relative_deviation(padchest, other.indices(padchest, "val")) < 0.05


def test_split_ignores_row_order(padchest: LabelledImages, split0: Split) -> None:
    reordered = padchest.subset(np.random.default_rng(7).permutation(len(padchest))[:20_000])
    a = make_split(reordered, FRACTIONS, seed=5)
    b = make_split(reordered.subset(np.arange(len(reordered))[::-1]), FRACTIONS, seed=5)
    assert all(set(a.part(p)) == set(b.part(p)) for p in PARTS)


# --- NIH, unknown labels, zero fractions ---------------------------------------------------------------------


def test_nih_split_sizes(nih: LabelledImages) -> None:
    split = make_split(nih, seed=0)
    assert [len(split.part(p)) for p in PARTS] == [350, 50, 100]
    assert split.patients_in_two_splits(nih) == 0
    for part in PARTS:
        positives = nih.labels[split.indices(nih, part)].sum(axis=0)
        assert np.all(positives >= np.floor(nih.positives() * FRACTIONS[PARTS.index(part)]) - 2), part


def test_unknown_labels_count_as_not_positive(nih: LabelledImages) -> None:
    labels = nih.labels.copy()
    labels[::3, :5] = np.nan
    split = make_split(with_labels(nih, labels), seed=0)
    assert sum(len(split.part(p)) for p in PARTS) == 500
    assert abs(len(split.part("test")) - 100) <= 2


def test_zero_fraction_part_stays_empty(nih: LabelledImages) -> None:
    split = make_split(nih, (0.8, 0.0, 0.2), seed=0)
    assert split.val == ()
    assert len(split.train) == 400 and len(split.test) == 100


# --- persistence and lookup ---------------------------------------------------------------------------------


def test_save_load_round_trip(nih: LabelledImages, tmp_path: Path) -> None:
    split = make_split(nih, seed=4)
    split.save(tmp_path / "split.json")
    assert Split.load(tmp_path / "split.json") == split


def test_indices_follow_dataset_order(nih: LabelledImages) -> None:
    split = make_split(nih, seed=0)
    idx = split.indices(nih, "val")
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
    assert [nih.image_ids[i] for i in idx] == list(split.val)


def test_indices_errors(nih: LabelledImages) -> None:
    split = make_split(nih, seed=0)
    with pytest.raises(ValueError, match="unknown split part"):
        split.indices(nih, "validation")
    with pytest.raises(ValueError, match="not in the dataset"):
        split.indices(nih.subset(range(100)), "train")


def test_patients_in_two_splits_counts_a_shared_patient(nih: LabelledImages) -> None:
    split = make_split(nih, seed=0)
    train_idx, test_idx = split.indices(nih, "train")[0], split.indices(nih, "test")[0]
    patients = list(nih.patient_ids)
    patients[test_idx] = patients[train_idx]
    shared = LabelledImages(nih.image_ids, nih.paths, nih.labels, nih.label_names, tuple(patients), nih.views)
    assert split.patients_in_two_splits(shared) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"seed": 0}), "format"),
        (json.dumps({"format": "cxr-split/1", "seed": 0, "fractions": [0.7, 0.1, 0.2]}), "not a valid split"),
        (
            json.dumps(
                {"format": "cxr-split/1", "seed": 0, "fractions": [0.7, 0.3], "train": [], "val": [], "test": []}
            ),
            "three fractions",
        ),
    ],
)
def test_load_bad_split_files(content: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "split.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        Split.load(path)


def test_load_missing_split_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Split.load(tmp_path / "absent.json")


@pytest.mark.parametrize(
    ("fractions", "message"),
    [
        ((0.7, 0.3), "three fractions"),
        ((0.7, 0.5, -0.2), ">= 0"),
        ((0.0, 0.5, 0.5), "train > 0"),
        ((0.7, 0.1, 0.1), "sum to 1"),
        ((float("nan"), 0.5, 0.5), "finite"),
    ],
)
def test_make_split_bad_fractions(fractions: tuple[float, ...], message: str, nih: LabelledImages) -> None:
    with pytest.raises(ValueError, match=message):
        make_split(nih, fractions)


def test_make_split_empty_dataset(nih: LabelledImages) -> None:
    with pytest.raises(ValueError, match="empty dataset"):
        make_split(nih.subset([]))


def test_kfold_puts_every_nih_image_in_exactly_one_test_fold_patient_disjoint(nih: LabelledImages) -> None:
    from training.splits import kfold_splits

    folds = kfold_splits(nih, 5, val_fraction=0.1, seed=0)
    tests = [set(f.test) for f in folds]
    assert sum(len(t) for t in tests) == len(nih) and set().union(*tests) == set(nih.image_ids)
    for f in folds:
        assert f.patients_in_two_splits(nih) == 0
        assert len(f.test) == 100 and len(f.val) == 40 and len(f.train) == 360
        assert (nih.labels[f.indices(nih, "test")] == 1).sum(axis=0).min() >= 2  # every label in every fold
    assert folds == kfold_splits(nih, 5, val_fraction=0.1, seed=0)  # deterministic
    with pytest.raises(ValueError, match="k >= 2"):
        kfold_splits(nih, 1)
