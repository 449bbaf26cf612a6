"""NIH folder reader, plain CSV format (read / write / unknowns / errors) and load_dataset's format detection."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr.core.labels import NIH_CXR14
from training.data.base import LabelledImages
from training.data.csv_format import load_csv_dataset, vocabulary_path, write_csv_dataset
from training.data.load import load_dataset
from training.data.nih import load_nih_folder

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
NIH = DATA / "nih-cxr14-621"
PADCHEST_INDEX = DATA / "padchest" / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
NIH_COUNTS = {  # from shared/data/README.md
    "Infiltration": 103, "No_Finding": 80, "Atelectasis": 74, "Nodule": 70, "Consolidation": 65, "Effusion": 63,
    "Mass": 54, "Pleural_Thickening": 54, "Cardiomegaly": 45, "Fibrosis": 45, "Pneumothorax": 35, "Emphysema": 33,
    "Pneumonia": 25, "Hernia": 15, "Edema": 14,
}  # fmt: skip


@pytest.fixture(scope="module")
def nih() -> LabelledImages:
    return load_nih_folder(NIH)


def nih_copy(tmp_path: Path, edit=None, n_images: int = 5) -> Path:
    """A small NIH-layout folder: the first ``n_images`` real rows and images, labels.csv passed through ``edit``."""
    table = pd.read_csv(NIH / "labels.csv").head(n_images)
    (tmp_path / "images_512").mkdir()
    for name in table["Image Index"]:
        shutil.copy(NIH / "images_512" / name, tmp_path / "images_512" / name)
    (edit(table) if edit else table).to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- NIH ---------------------------------------------------------------------------------------------------------


def test_nih_real_folder(nih: LabelledImages) -> None:
    assert len(nih) == 500
    assert nih.label_names == NIH_CXR14
    assert dict(zip(nih.label_names, nih.positives().tolist(), strict=True)) == NIH_COUNTS
    assert nih.views.count("PA") == 417 and nih.views.count("AP") == 83
    assert len(set(nih.patient_ids)) == 500
    assert all(p.is_file() for p in nih.paths[:20])
    assert not np.isnan(nih.labels).any()


def test_nih_row_matches_its_finding_string(nih: LabelledImages) -> None:
    table = pd.read_csv(NIH / "labels.csv")
    for i in range(0, 500, 50):
        findings = set(table["Finding Labels"][i].replace("No Finding", "No_Finding").split("|"))
        assert {nih.label_names[j] for j in np.flatnonzero(nih.labels[i])} == findings


def test_nih_missing_folder_or_images(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="labels file"):
        load_nih_folder(tmp_path)
    root = nih_copy(tmp_path)
    with pytest.raises(FileNotFoundError, match="image folder"):
        load_nih_folder(root, image_dir="images_1024")
    next((root / "images_512").iterdir()).unlink()
    with pytest.raises(FileNotFoundError, match="1 images listed"):
        load_nih_folder(root)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.drop(columns=["Hernia"]), "missing columns"),
        (lambda t: t.assign(Edema=[0, 2, 0, 0, 0]), "not 0/1"),
        (lambda t: t.assign(Mass=["0", "yes", "0", "0", "0"]), "not 0/1"),
        (lambda t: pd.concat([t, t.head(1)]), "more than once"),
    ],
)
def test_nih_bad_tables(edit, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        load_nih_folder(nih_copy(tmp_path, edit))


# --- plain CSV ---------------------------------------------------------------------------------------------------


def test_csv_round_trip_keeps_everything(nih: LabelledImages, tmp_path: Path) -> None:
    ds = nih.subset(range(40))
    labels = ds.labels.copy()
    labels[3, 2] = np.nan
    labels[7, :] = np.nan
    ds = LabelledImages(ds.image_ids, ds.paths, labels, ds.label_names, ds.patient_ids, ds.views)
    write_csv_dataset(ds, tmp_path / "data.csv")
    back = load_csv_dataset(tmp_path / "data.csv")
    assert back.label_names == ds.label_names  # from the sidecar, zero-positive labels included
    np.testing.assert_array_equal(back.labels, ds.labels)  # NaN compare equal here
    assert (back.image_ids, back.paths) == (ds.image_ids, ds.paths)
    assert (back.patient_ids, back.views) == (ds.patient_ids, ds.views)


def test_csv_paths_inside_the_folder_are_written_relative(nih: LabelledImages, tmp_path: Path) -> None:
    ds = nih.subset([0, 1])
    moved = tuple(tmp_path / "img" / p.name for p in ds.paths)
    ds = LabelledImages(ds.image_ids, moved, ds.labels, ds.label_names, ds.patient_ids, ds.views)
    write_csv_dataset(ds, tmp_path / "data.csv")
    assert pd.read_csv(tmp_path / "data.csv")["path"].tolist() == [f"img/{p.name}" for p in moved]
    assert load_csv_dataset(tmp_path / "data.csv").paths == moved


def test_csv_hand_written_with_unknowns(tmp_path: Path) -> None:
    csv = write_text(
        tmp_path / "hospital.csv",
        "path,labels,patient_id,view\n"
        "img/a.png,cardiomegaly|?pneumonia,p1,PA\n"
        "img/b.png,,p1,AP\n"
        "/abs/c.png, effusion | ?* ,p2,\n"
        "img/d.png,cardiomegaly,p3,PA\n",
    )
    ds = load_csv_dataset(csv)
    assert ds.label_names == ("cardiomegaly", "effusion", "pneumonia")  # by positives, then name
    nan = np.nan
    expected = [[1, 0, nan], [0, 0, 0], [nan, 1, nan], [1, 0, 0]]
    np.testing.assert_array_equal(ds.labels, np.array(expected, dtype=np.float32))
    assert ds.paths == (tmp_path / "img/a.png", tmp_path / "img/b.png", Path("/abs/c.png"), tmp_path / "img/d.png")
    assert ds.image_ids == ("img/a.png", "img/b.png", "/abs/c.png", "img/d.png")
    assert ds.views == ("PA", "AP", "", "PA")
    assert ds.patient_ids == ("p1", "p1", "p2", "p3")


def test_csv_vocabulary_argument_orders_columns(tmp_path: Path) -> None:
    csv = write_text(tmp_path / "d.csv", "path,labels,patient_id\na.png,b,1\nc.png,a|?c,2\n")
    ds = load_csv_dataset(csv, label_names=["c", "b", "a", "z"])
    assert ds.label_names == ("c", "b", "a", "z")
    np.testing.assert_array_equal(ds.labels, np.array([[0, 1, 0, 0], [np.nan, 0, 1, 0]], dtype=np.float32))
    assert ds.views == ("", "")


def test_csv_sidecar_vocabulary(tmp_path: Path) -> None:
    csv = write_text(tmp_path / "d.csv", "path,labels,patient_id\na.png,b,1\n")
    write_text(vocabulary_path(csv), "zeta\nb\n")
    assert load_csv_dataset(csv).label_names == ("zeta", "b")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("path,patient_id\na.png,1\n", r"lacks the column\(s\) \['labels'\]"),
        ("path,labels,patient_id\na.png,x,\n", "empty patient_id on line 2"),
        ("path,labels,patient_id\n,x,1\n", "empty path on line 2"),
        ("path,labels,patient_id\na.png,x,1\na.png,y,2\n", "occur twice"),
        ("path,labels,patient_id,image_id\na.png,x,1,i\nb.png,y,2,i\n", "occur twice"),
        ("path,labels,patient_id\na.png,x|?,1\n", "must be followed by a label"),
        ("path,labels,patient_id\na.png,x|?x,1\n", "both present and unknown"),
        ("", "not a readable dataset CSV"),
    ],
)
def test_csv_bad_files(text: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        load_csv_dataset(write_text(tmp_path / "d.csv", text))


def test_csv_label_outside_vocabulary(tmp_path: Path) -> None:
    csv = write_text(tmp_path / "d.csv", "path,labels,patient_id\na.png,cardiomegaly|typo,1\n")
    with pytest.raises(ValueError, match=r"\['typo'\] not in the vocabulary"):
        load_csv_dataset(csv, label_names=["cardiomegaly"])


def test_csv_repeated_vocabulary(tmp_path: Path) -> None:
    csv = write_text(tmp_path / "d.csv", "path,labels,patient_id\na.png,b,1\n")
    with pytest.raises(ValueError, match="repeats"):
        load_csv_dataset(csv, label_names=["b", "b"])
    write_text(vocabulary_path(csv), "b\nb\n")
    with pytest.raises(ValueError, match="repeats"):
        load_csv_dataset(csv)


def test_csv_without_any_label(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty label vocabulary"):
        load_csv_dataset(write_text(tmp_path / "d.csv", "path,labels,patient_id\na.png,,1\n"))


def test_csv_binary_file_and_missing_file(tmp_path: Path) -> None:
    png = tmp_path / "d.csv"
    png.write_bytes(next((NIH / "images_512").iterdir()).read_bytes())
    with pytest.raises(ValueError, match="not a readable dataset CSV"):
        load_csv_dataset(png)
    with pytest.raises(FileNotFoundError):
        load_csv_dataset(tmp_path / "absent.csv")


@pytest.mark.parametrize("name", ["a|b", "?a", "", " padded", "two\nlines"])
def test_csv_write_rejects_unwritable_label_names(name: str, nih: LabelledImages, tmp_path: Path) -> None:
    ds = nih.subset([0])
    ds = LabelledImages(ds.image_ids, ds.paths, ds.labels[:, :1], (name,), ds.patient_ids, ds.views)
    with pytest.raises(ValueError, match="cannot be written"):
        write_csv_dataset(ds, tmp_path / "d.csv")


def test_csv_write_rejects_soft_labels(nih: LabelledImages, tmp_path: Path) -> None:
    ds = nih.subset([0, 1])
    soft = LabelledImages(ds.image_ids, ds.paths, ds.labels * 0.5, ds.label_names, ds.patient_ids, ds.views)
    with pytest.raises(ValueError, match="0 / 1 / unknown"):
        write_csv_dataset(soft, tmp_path / "d.csv")


# --- load_dataset ---------------------------------------------------------------------------------------------


def test_load_dataset_detects_nih(nih: LabelledImages) -> None:
    ds = load_dataset(NIH)
    assert ds.image_ids == nih.image_ids and ds.label_names == NIH_CXR14


@pytest.mark.parametrize("where", ["file", "dataset.csv", "selection.csv"])
def test_load_dataset_detects_plain_csv(where: str, nih: LabelledImages, tmp_path: Path) -> None:
    ds = nih.subset(range(10))
    csv = tmp_path / ("custom.csv" if where == "file" else where)
    write_csv_dataset(ds, csv)
    back = load_dataset(csv if where == "file" else tmp_path)
    assert back.image_ids == ds.image_ids
    np.testing.assert_array_equal(back.labels, ds.labels)


def test_load_dataset_rejects_unknown_layouts(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "absent")
    with pytest.raises(ValueError, match="not a dataset folder"):
        load_dataset(tmp_path)
    with pytest.raises(ValueError, match="unknown dataset format"):
        load_dataset(write_text(tmp_path / "notes.txt", "hello"))
    with pytest.raises(ValueError, match="raw PadChest index"):
        load_dataset(PADCHEST_INDEX)
    png = tmp_path / "x.csv"
    png.write_bytes(next((NIH / "images_512").iterdir()).read_bytes())
    with pytest.raises(ValueError, match="not a readable"):
        load_dataset(png)
