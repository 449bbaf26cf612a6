"""The whole training pipeline on real NIH radiographs, small enough for a 2-core CPU: train (and resume),
build the ensemble with tuned thresholds, evaluate it (the --json contract), export it. Real commands, real files.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cxr.core.errors import ManifestError
from cxr.core.labels import NIH_CXR14
from cxr.core.manifest import read_manifest
from cxr.models.architectures import build_model
from cxr.models.bundle import load_ensemble
from training.data.base import LabelledImages
from training.data.csv_format import write_csv_dataset
from training.data.load import load_dataset
from training.losses import pos_weight_from_labels
from training.splits import Split, make_split
from training.train import cap_parts
from training.trainer import METRICS_COLUMNS

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
NIH = REPO.parent / "shared" / "data" / "nih-cxr14-621"
V3_SMALL = REPO.parent / "shared" / "data" / "pretrained" / "mobilenet_v3_small_imagenet_torchvision.pth"
TINY = ["--image-size", "64", "--batch-size", "8", "--max-images", "48", "--hidden", "16", "--device", "cpu"]


def _cxr(*args: str, module: str = "cxr.cli.main") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MPLCONFIGDIR": os.environ.get("MPLCONFIGDIR", "/tmp/mpl-cxr-tests")}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env=env)  # fmt: skip


def _train(out: Path, split: Path, *extra: str) -> int:
    from training.train import main

    return main(["--data", str(NIH), "--split", str(split), "--out", str(out), *TINY, *extra])


def _metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One split, three training runs (two identical resnet18 runs, one interrupted and resumed), one
    mobilenet run with worker processes, one small-data run from ImageNet weights through `cxr train`, and the
    ensemble built by `cxr ensemble`."""
    root = tmp_path_factory.mktemp("training")
    ds = load_dataset(NIH)
    split_path = root / "split.json"
    make_split(ds, seed=0).save(split_path)
    a, b, m = root / "resnet_a", root / "resnet_b", root / "mobilenet"
    assert _train(a, split_path, "--arch", "resnet18", "--epochs", "2", "--workers", "0") == 0
    assert _train(b, split_path, "--arch", "resnet18", "--epochs", "1", "--workers", "0") == 0
    assert _train(b, split_path, "--arch", "resnet18", "--epochs", "2", "--workers", "0", "--resume") == 0
    assert _train(m, split_path, "--arch", "mobilenet_v3_large", "--epochs", "1", "--workers", "2") == 0
    s = root / "small"
    done = _cxr("train", "--data", str(NIH), "--split", str(split_path), "--out", str(s), *TINY, "--arch",
                "mobilenet_v3_small", "--recipe", "small-data", "--init", str(V3_SMALL), "--input-norm", "tf",
                "--epochs", "2", "--hidden", "0", "--ema-decay", "0.9", "--workers", "0")  # fmt: skip
    assert done.returncode == 0 and "small-data recipe" in done.stdout, done.stderr
    ens = root / "ensemble"
    done = _cxr("ensemble", "--runs", str(a), str(m), str(s), "--data", str(NIH), "--split", str(split_path),
                "--out", str(ens), "--name", "cxr-test", "--version", "0.0.1", "--workers", "0",
                "--device", "cpu")  # fmt: skip
    assert done.returncode == 0, done.stderr
    return {"root": root, "ds": ds, "split": split_path, "a": a, "b": b, "m": m, "s": s, "ens": ens}


def test_run_directory_holds_checkpoints_metrics_and_record(work: dict[str, Any]) -> None:
    a = work["a"]
    assert {"best.pt", "last.pt", "metrics.csv", "run.json"} <= {p.name for p in a.iterdir()}
    rows = _metrics(a)
    assert [int(r["epoch"]) for r in rows] == [1, 2] and tuple(rows[0]) == METRICS_COLUMNS
    assert all(math.isfinite(float(r["train_loss"])) and float(r["images_per_s"]) > 0 for r in rows)
    record = json.loads((a / "run.json").read_text())
    split = Split.load(work["split"])
    train_idx = split.indices(work["ds"], "train")
    assert record["labels"] == list(NIH_CXR14) and record["preprocess"]["size"] == 64
    assert record["epochs_run"] == 2 and record["best_epoch"] in (1, 2) and record["world_size"] == 1
    assert record["n_images"]["train"] + record["n_images"]["val"] <= 48
    assert record["n_images"]["train"] < len(train_idx)  # --max-images cut it
    parts = cap_parts({k: split.indices(work["ds"], k) for k in ("train", "val")}, 48, 0)
    train_labels = work["ds"].labels[parts["train"]]
    assert record["train_counts"]["n_pos"] == train_labels.sum(axis=0).astype(int).tolist()
    assert np.allclose(record["pos_weight"], pos_weight_from_labels(train_labels))
    assert record["freeze_fraction"] == 0.1 and record["frozen_convs"] == math.ceil(0.1 * 20)  # resnet18: 20 convs
    best = min(float(r["val_loss"]) for r in rows)
    assert record["best_val_loss"] == pytest.approx(best)


def test_frozen_layers_keep_their_initial_weights(work: dict[str, Any]) -> None:
    torch.manual_seed(0)
    initial = build_model("resnet18", len(NIH_CXR14), hidden=16).state_dict()
    trained = torch.load(work["a"] / "best.pt", map_location="cpu", weights_only=True)
    assert torch.equal(trained["backbone.0.weight"], initial["backbone.0.weight"])  # conv1: frozen
    assert torch.equal(trained["backbone.1.running_mean"], initial["backbone.1.running_mean"])  # its BN: frozen
    assert not torch.equal(trained["backbone.7.1.conv2.weight"], initial["backbone.7.1.conv2.weight"])
    assert not torch.equal(trained["head.0.weight"], initial["head.0.weight"])


def test_resumed_run_matches_the_uninterrupted_one(work: dict[str, Any]) -> None:
    straight, resumed = _metrics(work["a"]), _metrics(work["b"])
    assert [r["epoch"] for r in resumed] == ["1", "2"]
    for key in ("train_loss", "val_loss"):
        for r_s, r_r in zip(straight, resumed, strict=True):
            assert float(r_r[key]) == pytest.approx(float(r_s[key]), rel=1e-4), key
    last = torch.load(work["b"] / "last.pt", map_location="cpu", weights_only=False)
    assert last["state"]["epoch"] == 2 and "optimizer" in last and len(last["rng"]) == 1


def test_a_small_data_run_records_its_recipe_and_initial_weights(work: dict[str, Any]) -> None:
    s = work["s"]
    record = json.loads((s / "run.json").read_text())
    assert record["recipe_name"] == "small-data" and record["recipe"]["optimizer"] == "adamw"
    assert record["recipe"]["epochs"] == 2 and record["hidden"] == 0 and record["checkpoint"] == "last"
    assert record["init"]["sha256"] == "ce0b12e7d75659c448f173858551489d9c1aa917be15a96cdcaeb5f6956cc56b"
    assert record["input_norm"] == "tf" and record["frozen_batchnorms"] == 34 and record["frozen_convs"] == 0
    assert [h["epoch"] for h in record["history"]] == [1, 2]
    best, ema, final = (torch.load(s / f, map_location="cpu", weights_only=True) for f in ("best.pt", "ema.pt",
                                                                                        "final.pt"))  # fmt: skip
    assert all(torch.equal(best[k], ema[k]) for k in best)  # checkpoint "last" with EMA keeps the average
    assert not all(torch.equal(final[k], ema[k]) for k in final)
    initial = torch.load(V3_SMALL, map_location="cpu", weights_only=True)
    assert torch.equal(final["backbone.0.1.running_var"], initial["features.0.1.running_var"])  # BN frozen


def test_ensemble_manifest_has_calibration_and_tuned_thresholds(work: dict[str, Any]) -> None:
    manifest, net = load_ensemble(work["ens"])
    assert manifest.model_names == ("resnet18", "mobilenet_v3_large", "mobilenet_v3_small")
    assert manifest.labels == NIH_CXR14
    assert manifest.ensemble_rule == "ctp" and "positive-class F1" in manifest.threshold_criterion
    assert "temperature scaling" in manifest.calibration
    assert all(0.0 <= t <= 1.0 for t in manifest.thresholds)
    assert [m.hidden for m in manifest.models] == [16, 16, 0] and manifest.models[2].input_norm == "tf"
    for entry, run in zip(manifest.models, ("a", "m", "s"), strict=True):
        record = json.loads((work[run] / "run.json").read_text())
        assert entry.thresholds is not None and entry.temperature is not None and entry.logit_offset is not None
        assert np.allclose(entry.logit_offset, np.log(record["pos_weight"]), atol=1e-6)
        assert all(0.05 <= t <= 20 for t in entry.temperature)
    assert set(manifest.extra["validation_ece"]) == {*manifest.model_names, "ctp"}
    val = work["ds"].subset(Split.load(work["split"]).indices(work["ds"], "val"))
    for j, t in enumerate(manifest.thresholds):
        if val.labels[:, j].sum() == 0:
            assert t == 0.5  # no validation positives: the default
    with torch.inference_mode():
        assert net(torch.zeros(2, 1, 64, 64)).shape == (2, 3, len(NIH_CXR14))


def test_evaluate_json_is_one_object_with_every_model_and_rule(work: dict[str, Any]) -> None:
    report_dir = work["root"] / "report"
    done = _cxr("evaluate", "--model", str(work["ens"]), "--data", str(NIH), "--split", str(work["split"]),
                "--part", "test", "--bootstrap", "50", "--json", "--out", str(report_dir), "--device", "cpu",
                "--workers", "0")  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # the whole stdout is one JSON document
    assert done.stdout.strip().count("\n") == 0
    n_test = len(Split.load(work["split"]).test)
    assert report["n_images"] == n_test and report["labels"] == list(NIH_CXR14) and report["skipped_labels"] == []
    assert set(report["models"]) == {"resnet18", "mobilenet_v3_large", "mobilenet_v3_small"}
    ece = report["calibration"]["ece"]
    assert set(ece) == {"resnet18", "mobilenet_v3_large", "mobilenet_v3_small", "ctp"}
    assert ece["ctp"]["after"] == pytest.approx(report["ensembles"]["ctp"]["ece"])  # the report is calibrated
    assert set(report["ensembles"]) == {"ctp", "ptc_lw", "ptc_mode"}
    keys = {"auroc_mean", "auprc_mean", "f1_positive_mean", "f1_paper_mean_pos_neg", "hamming_loss", "ece",
            "per_label", "ci95"}  # fmt: skip
    for block in [*report["models"].values(), *report["ensembles"].values()]:
        assert keys <= set(block) and set(block["per_label"]) == set(NIH_CXR14)
        aurocs = [v["auroc"] for v in block["per_label"].values() if v["auroc"] is not None]
        assert block["auroc_mean"] == pytest.approx(np.mean(aurocs))
    saved = json.loads((report_dir / "report.json").read_text())
    assert saved["ensembles"]["ctp"]["auroc_mean"] == report["ensembles"]["ctp"]["auroc_mean"]
    md = (report_dir / "report.md").read_text()
    assert "NOT FOR CLINICAL USE" in md and "ensemble PTC_MODE" in md and f"{n_test} images" in md
    assert "## Calibration" in md and "ECE plain sigmoid" in md
    for png in ("roc.png", "pr.png", "reliability.png"):
        assert (report_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_reports_labels_the_data_lacks(work: dict[str, Any]) -> None:
    from training.evaluate import evaluate_ensemble

    ds: LabelledImages = work["ds"]
    test = ds.subset(Split.load(work["split"]).indices(ds, "test")[:30])
    cols = [NIH_CXR14.index(n) for n in ("Effusion", "Cardiomegaly", "No_Finding")]
    labels = test.labels[:, cols].copy()
    labels[0, 0] = np.nan  # one unknown: masked, not read as absent
    small = LabelledImages(test.image_ids, test.paths, labels, ("Effusion", "Cardiomegaly", "No_Finding"),
                           test.patient_ids, test.views)  # fmt: skip
    csv_path = work["root"] / "three_labels.csv"
    write_csv_dataset(small, csv_path)
    report = evaluate_ensemble(work["ens"], csv_path, n_boot=0, device="cpu", workers=0)
    assert report["labels"] == ["Cardiomegaly", "Effusion", "No_Finding"]  # the ensemble's order
    assert len(report["skipped_labels"]) == 12 and "Mass" in report["skipped_labels"]
    eff = report["ensembles"]["ctp"]["per_label"]["Effusion"]
    assert eff["n_pos"] + eff["n_neg"] == 29 and report["n_images"] == 30


def test_export_copies_a_valid_ensemble_and_refuses_to_overwrite(work: dict[str, Any]) -> None:
    out, mar_dir = work["root"] / "model_store" / "cxr-test", work["root"] / "mar"
    done = _cxr("export", "--ensemble", str(work["ens"]), "--out", str(out), "--mar", str(mar_dir))
    assert done.returncode == 0, done.stderr
    assert zipfile.is_zipfile(mar_dir / "cxr.mar") and f"mar={mar_dir / 'cxr.mar'}" in done.stdout
    assert read_manifest(out) == read_manifest(work["ens"])
    assert (out / "resnet18.pt").read_bytes() == (work["ens"] / "resnet18.pt").read_bytes()
    again = _cxr("export", "--ensemble", str(work["ens"]), "--out", str(out))
    assert again.returncode == 2 and "OUTPUT_EXISTS" in again.stderr


def test_export_rejects_a_broken_ensemble(work: dict[str, Any], tmp_path: Path) -> None:
    from training.export import export_ensemble

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text((work["ens"] / "manifest.json").read_text())
    (broken / "resnet18.pt").write_bytes(b"not the weights")
    with pytest.raises(ManifestError, match="sha256|missing"):
        export_ensemble(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_training_errors_exit_2_with_a_message(work: dict[str, Any], tmp_path: Path) -> None:
    split = work["split"]
    assert _train(tmp_path / "x", split, "--arch", "no_such_net") == 2
    assert _train(tmp_path / "y", split, "--arch", "resnet18", "--resume", "--workers", "0") == 2  # no last.pt
    done = _cxr("train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "z"), *TINY)
    assert done.returncode == 2 and "dataset not found" in done.stderr
    done = _cxr("ensemble", "--runs", str(tmp_path), "--data", str(NIH), "--split", str(split), "--out",
                str(tmp_path / "e"), "--name", "n", "--version", "1", module="cxr.cli.train_cmds")  # fmt: skip
    assert done.returncode == 2 and "BAD_RUN_DIR" in done.stderr
