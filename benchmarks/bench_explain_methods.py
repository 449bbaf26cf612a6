"""Benchmark: the explanation worker's cost per method, per fusion rule, and the cost of the DICOM results.
Not a test. Prints a table, writes benchmarks/results/explain_methods.json.

    .venv/bin/python benchmarks/bench_explain_methods.py [--model DIR] [--runs 2] [--threads 2]

On the served ensemble (default: the bundled model), one real NIH radiograph:
    (a) compute_heatmaps with each method (gradcam: every label; captum's integrated_gradients, occlusion,
        guided_gradcam: the labels they explain, reported), each fusion rule with gradcam;
    (b) the DICOM results of a real DICOM file (RG1_UNCR.dcm, display 1024 px): build_result_datasets (SR + one
        SC per positive finding + summary) and their Part 10 bytes, with every label made positive (the worst case)
        and with none positive.
Medians of interleaved runs (CPU timings drift between processes; see STACK-NOTES); wall and process CPU seconds.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cxr.core.preprocess import load_image_file, prepare_image
from cxr.dicom_results import build_result_datasets, dataset_bytes, source_header
from cxr.explain.compute import compute_heatmaps
from cxr.explain.display import display_from_dicom
from cxr.explain.methods import ATTRIBUTION_METHODS, FUSION_RULES

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
IMAGE = DATA / "nih-cxr14-621" / "images_512" / "00000129_000.png"
DICOM = DATA / "dicom" / "RG1_UNCR.dcm"
RESULTS = REPO / "benchmarks" / "results" / "explain_methods.json"


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _findings_document(manifest: Any, heatmaps: Any, positive: bool) -> dict[str, Any]:
    findings = [
        {"label": label, "probability": 0.7 if positive else 0.2, "votes": 2, "n_models": len(manifest.models),
         "threshold": manifest.thresholds[j], "positive": positive,
         "model_probabilities": {m: 0.6 for m in manifest.model_names}}
        for j, label in enumerate(manifest.labels)
    ]  # fmt: skip
    return {"model": {"name": manifest.name, "version": manifest.version}, "findings": findings}


def run(model_dir: Path, runs: int) -> dict[str, Any]:
    from cxr.models.bundle import load_ensemble

    manifest, ensemble = load_ensemble(model_dir)
    x = prepare_image(load_image_file(IMAGE), manifest.preprocess)
    data = DICOM.read_bytes()
    source = source_header(data)
    display = np.asarray(Image.open(io.BytesIO(display_from_dicom(data, 1024))).convert("L"))
    heatmaps = compute_heatmaps(ensemble, manifest, x)  # warm-up
    explained: dict[str, int] = {}
    variants: dict[str, Callable[[], object]] = {}

    def explain(method: str) -> None:
        h = compute_heatmaps(ensemble, manifest, x, method=method)
        explained[method] = len(h.labels) if h.explained is None else int(h.explained.sum())

    for method in ATTRIBUTION_METHODS:
        variants[f"method:{method}"] = lambda m=method: explain(m)  # type: ignore[misc]
    for rule in FUSION_RULES:
        variants[f"fusion:{rule}"] = lambda r=rule: compute_heatmaps(ensemble, manifest, x, fusion_rule=r)  # type: ignore[misc]
    for positive in (True, False):
        doc = _findings_document(manifest, heatmaps, positive)
        name = "dicom:all_positive" if positive else "dicom:none_positive"
        variants[name] = lambda d=doc: [dataset_bytes(ds) for ds in build_result_datasets(
            copy.deepcopy(source), d, heatmaps, display)]  # type: ignore[misc]  # fmt: skip
    wall: dict[str, list[float]] = {n: [] for n in variants}
    cpu: dict[str, list[float]] = {n: [] for n in variants}
    for _ in range(runs):
        for name, fn in variants.items():
            w, c = _timed(fn)
            wall[name].append(w)
            cpu[name].append(c)
    sizes = [len(dataset_bytes(ds)) for ds in build_result_datasets(source, _findings_document(
        manifest, heatmaps, True), heatmaps, display)]  # fmt: skip
    return {
        "model": {"name": manifest.name, "version": manifest.version, "dir": str(model_dir),
                  "members": list(manifest.model_names)},
        "labels": len(manifest.labels), "size": manifest.preprocess.size, "runs": runs, "image": IMAGE.name,
        "dicom_source": DICOM.name, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or "cpu", "load_average_1m": os.getloadavg()[0],
        "labels_explained": explained, "wall_s": wall, "cpu_s": cpu,
        "median_wall_s": {n: statistics.median(t) for n, t in wall.items()},
        "median_cpu_s": {n: statistics.median(t) for n, t in cpu.items()},
        "dicom_object_bytes_all_positive": sizes,
    }  # fmt: skip


def _print_table(result: dict[str, Any]) -> None:
    m = result["model"]
    print(f"model {m['name']} {m['version']}; load average (1 min) at the end {result['load_average_1m']:.1f}")
    print(f"{'variant':<34}{'wall s':>9}{'cpu s':>9}{'images/s':>10}  labels explained")
    for name, wall in result["median_wall_s"].items():
        method = name.split(":", 1)[1]
        labels = result["labels_explained"].get(method, "") if name.startswith("method:") else ""
        print(f"{name:<34}{wall:>9.3f}{result['median_cpu_s'][name]:>9.3f}{1 / wall:>10.3f}  {labels}")
    sizes = result["dicom_object_bytes_all_positive"]
    print(f"DICOM objects (all positive): {len(sizes)}, {sum(sizes) / 2**20:.1f} MiB in total")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "model_store" / "cxr-nih14-imagenet")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.model, args.runs)
    _print_table(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
