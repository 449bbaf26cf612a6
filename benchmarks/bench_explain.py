"""Benchmark: cost of explaining one image with all labels x all models, against the bare forward and against
captum's one-call-per-label Grad-CAM. Not a test. Prints a table, writes benchmarks/results/explain.json.

    .venv/bin/python benchmarks/bench_explain.py [--runs 3] [--size 224] [--threads 2]

Demo-like ensemble: densenet121, efficientnet_b0, mobilenet_v3_large, the 15 NIH labels, random weights,
hidden 512, on a real NIH radiograph. Variants run interleaved inside one process (CPU timings drift between
processes; see STACK-NOTES) and the median per variant is reported:
    (a) forward  - EnsembleNet(x) under torch.inference_mode()
    (b) explain  - cxr.explain.compute.compute_heatmaps (Grad-CAM, fusion, agreement, quantisation); target <= 1.2 x (a)
    (c) captum   - LayerGradCam(member, member.cam_target).attribute(x, target=l) for every label and model;
                   target (c) / (b) >= 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from captum.attr import LayerGradCam
from PIL import Image

from cxr.core.labels import NIH_CXR14
from cxr.core.manifest import Manifest
from cxr.core.preprocess import prepare_image, to_unit_range
from cxr.explain.compute import compute_heatmaps
from cxr.models.architectures import CXRNet
from cxr.models.bundle import EnsembleNet, load_ensemble
from cxr.models.testing import make_random_ensemble

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO.parent / "shared" / "data" / "nih-cxr14-621" / "images_512" / "00000129_000.png"
RESULTS = REPO / "benchmarks" / "results" / "explain.json"
ARCHS = ("densenet121", "efficientnet_b0", "mobilenet_v3_large")


def _model_input(manifest: Manifest) -> torch.Tensor:
    pixels = to_unit_range(np.asarray(Image.open(IMAGE).convert("L")))
    return torch.from_numpy(prepare_image(pixels, manifest.preprocess))[None]


def _forward(ensemble: EnsembleNet, x: torch.Tensor) -> None:
    with torch.inference_mode():
        ensemble(x)


def _captum_loop(ensemble: EnsembleNet, x: torch.Tensor, n_labels: int) -> None:
    for member in ensemble.members:
        assert isinstance(member, CXRNet)
        explainer = LayerGradCam(member, member.cam_target)
        for label in range(n_labels):
            explainer.attribute(x, target=label, relu_attributions=True)


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds of all threads). On a shared machine the CPU time is the steadier
    measure of the work done; the wall time is what a user waits."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run(runs: int, size: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        make_random_ensemble(tmp, archs=ARCHS, labels=NIH_CXR14, size=size, hidden=512, name="bench-explain")
        manifest, ensemble = load_ensemble(tmp)
    x = _model_input(manifest)
    n_labels = len(manifest.labels)
    variants: dict[str, Callable[[], object]] = {
        "forward": lambda: _forward(ensemble, x),
        "explain": lambda: compute_heatmaps(ensemble, manifest, x),
        "captum": lambda: _captum_loop(ensemble, x, n_labels),
    }
    _forward(ensemble, x)  # warm-up: allocator pools, lazily initialised kernels
    compute_heatmaps(ensemble, manifest, x)
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(runs):
        for name, fn in variants.items():
            w, c = _timed(fn)
            wall[name].append(w)
            cpu[name].append(c)
    med_wall = {name: statistics.median(ts) for name, ts in wall.items()}
    med_cpu = {name: statistics.median(ts) for name, ts in cpu.items()}
    return {
        "ensemble": list(ARCHS), "labels": n_labels, "size": size, "runs": runs, "image": IMAGE.name,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or "cpu",
        "load_average_1m": os.getloadavg()[0], "wall_s": wall, "cpu_s": cpu,
        "median_wall_s": med_wall, "median_cpu_s": med_cpu,
        "ratios_wall": _ratios(med_wall), "ratios_cpu": _ratios(med_cpu),
    }  # fmt: skip


def _ratios(median: dict[str, float]) -> dict[str, float]:
    return {
        "explain_over_forward": median["explain"] / median["forward"],
        "captum_over_explain": median["captum"] / median["explain"],
    }


def _print_table(result: dict) -> None:
    print(f"load average (1 min) at the end: {result['load_average_1m']:.1f}")
    print(f"{'variant':<10}{'wall s':>9}{'cpu s':>9}   wall per run | cpu per run")
    for name in ("forward", "explain", "captum"):
        walls = " ".join(f"{t:.3f}" for t in result["wall_s"][name])
        cpus = " ".join(f"{t:.3f}" for t in result["cpu_s"][name])
        print(f"{name:<10}{result['median_wall_s'][name]:>9.3f}{result['median_cpu_s'][name]:>9.3f}   {walls} | {cpus}")
    for kind in ("wall", "cpu"):
        r = result[f"ratios_{kind}"]
        print(f"{kind}: explain / forward = {r['explain_over_forward']:.2f} (target <= 1.2), "
              f"captum / explain = {r['captum_over_explain']:.1f} (target >= 5)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.runs, args.size)
    _print_table(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
