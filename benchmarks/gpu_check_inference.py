"""GPU check of the inference handler (not a test): does the TorchServe handler's CUDA path (bf16 autocast +
channels_last) give the CPU float32 answers, and how fast is it beside the bare ensemble forward?

Calls ``services/inference/handler.py``'s ``initialize`` / ``handle`` directly with a mock context (no TorchServe,
no Java needed), on cuda (when there is one) and on cpu. The ensemble is demo-like (densenet121, efficientnet_b0,
mobilenet_v3_large, 15 labels, 224 px, RANDOM weights: timings and agreement only, no predictions) or ``--model``.
Inputs are real NIH radiographs (../shared/data, or --images) when present, else seeded synthetic images.

Run from the repository root:  PYTHONPATH=. python benchmarks/gpu_check_inference.py --out results.json
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cxr.core.labels import NIH_CXR14
from cxr.core.preprocess import PreprocessSpec, load_image_file, prepare_image
from cxr.core.wire import encode_input
from cxr.models.testing import make_random_ensemble
from services.inference.handler import CxrEnsembleHandler

REPO = Path(__file__).resolve().parents[1]
NIH_IMAGES = REPO.parent / "shared" / "data" / "nih-cxr14-621" / "images_512"
DEMO_ARCHS = ("densenet121", "efficientnet_b0", "mobilenet_v3_large")


class MockContext:
    """The parts of TorchServe's context the handler reads."""

    def __init__(self, model_dir: Path, gpu_id: int | None) -> None:
        self.system_properties: dict[str, Any] = {"model_dir": str(model_dir), "gpu_id": gpu_id, "batch_size": 32}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        raise AssertionError(f"request {idx} rejected: {code} {phrase}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="ensemble bundle directory (default: build a random demo-like one)")
    p.add_argument("--images", type=Path, default=NIH_IMAGES, help="folder of radiograph PNGs used as inputs")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_check_inference.json")
    p.add_argument("--gpu-batches", default="1,8,32", help="batch sizes timed on cuda")
    p.add_argument("--cpu-batches", default="1,8", help="batch sizes timed on cpu ('' to skip cpu timing)")
    p.add_argument("--gpu-repeats", type=int, default=20)
    p.add_argument("--cpu-repeats", type=int, default=2)
    p.add_argument("--compare-batch", type=int, default=8, help="images compared between cuda and cpu")
    return p.parse_args(argv)


def request_blobs(n: int, spec: PreprocessSpec, folder: Path) -> tuple[list[bytes], str]:
    """``n`` model inputs in the wire format, and where they came from."""
    paths = sorted(folder.glob("*.png"))
    if paths:
        images = [load_image_file(paths[i % len(paths)]) for i in range(n)]
        source = f"{folder.name}: {min(n, len(paths))} distinct real radiographs"
    else:
        rng = np.random.default_rng(0)  # smooth seeded fields: radiograph-like low frequencies
        small = [rng.random((16, 16), dtype=np.float32) for _ in range(n)]
        images = [np.asarray(Image.fromarray(s, mode="F").resize((512, 512), Image.Resampling.BICUBIC)) for s in small]
        images = [np.clip(a, 0.0, 1.0).astype(np.float32) for a in images]
        source = f"synthetic (seeded): no PNG in {folder}"
    return [encode_input(prepare_image(a, spec)) for a in images], source


def median_ms(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    """Median wall time of ``fn`` in ms after two warm-up calls; ``sync`` waits for queued GPU work."""
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def bare_forward(handler: CxrEnsembleHandler, batch: np.ndarray) -> Callable[[], object]:
    """The ensemble forward alone (input already on the device) with the runner's precision policy."""
    runner = handler.runner
    assert runner is not None
    x = torch.from_numpy(batch).to(runner.device)
    if runner.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)

    def run() -> object:
        with torch.inference_mode(), torch.autocast(runner.device.type, torch.bfloat16, runner.device.type == "cuda"):
            return runner.net(x)

    return run


def time_device(handler: CxrEnsembleHandler, blobs: list[bytes], batches: list[int], repeats: int) -> list[dict]:
    """Rows of {device, batch, bare_ms, handle_ms, bare_img_s, handle_img_s}."""
    runner = handler.runner
    assert runner is not None
    cuda = runner.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    for b in batches:
        reqs = [{"data": blobs[i % len(blobs)]} for i in range(b)]
        arrays = np.stack([runner.decode_request(r["data"]) for r in reqs])
        bare = median_ms(bare_forward(handler, arrays), repeats, sync)
        ctx = MockContext(Path("unused"), None)
        full = median_ms(functools.partial(handler.handle, reqs, ctx), repeats, sync)
        rows.append(
            {"device": str(runner.device), "batch": b, "bare_ms": round(bare, 2), "handle_ms": round(full, 2),
             "bare_img_s": round(b * 1000 / bare, 1), "handle_img_s": round(b * 1000 / full, 1)}
        )  # fmt: skip
        print(f"  {rows[-1]}", flush=True)
    return rows


def compare(gpu_docs: list[str], cpu_docs: list[str]) -> dict[str, Any]:
    """Agreement of the cuda (bf16) and cpu (float32) result documents."""
    g = [json.loads(d) for d in gpu_docs]
    c = [json.loads(d) for d in cpu_docs]
    per_model = np.abs(np.array([d["probabilities"] for d in g]) - np.array([d["probabilities"] for d in c]))
    ens_g = np.array([[f["probability"] for f in d["findings"]] for d in g])
    ens_c = np.array([[f["probability"] for f in d["findings"]] for d in c])
    pos_g = np.array([[f["positive"] for f in d["findings"]] for d in g])
    pos_c = np.array([[f["positive"] for f in d["findings"]] for d in c])
    flips = int((pos_g != pos_c).sum())
    return {
        "images": len(g),
        "max_abs_prob_diff_per_model": float(per_model.max()),
        "mean_abs_prob_diff_per_model": float(per_model.mean()),
        "max_abs_prob_diff_ensemble": float(np.abs(ens_g - ens_c).max()),
        "positive_decision_flips": int(flips),
        "decisions": int(ens_g.size),
    }


def prepare_model(arg: Path | None, workdir: Path) -> Path:
    if arg is not None:
        return arg
    out = workdir / "demo-random"
    make_random_ensemble(out, archs=DEMO_ARCHS, labels=NIH_CXR14, size=224, hidden=512, name="gpu-check-random")
    return out


def print_table(rows: list[dict]) -> None:
    print(f"\n{'device':<8} {'batch':>5} {'bare ms':>9} {'handle ms':>10} {'bare img/s':>11} {'handle img/s':>13}")
    for r in rows:
        print(f"{r['device']:<8} {r['batch']:>5} {r['bare_ms']:>9} {r['handle_ms']:>10} {r['bare_img_s']:>11} "
              f"{r['handle_img_s']:>13}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = prepare_model(args.model, Path(tmp))
        cpu = CxrEnsembleHandler()
        cpu.initialize(MockContext(model_dir, None))
        assert cpu.runner is not None
        blobs, result["inputs"] = request_blobs(
            max(32, args.compare_batch), cpu.runner.manifest.preprocess, args.images
        )
        result["model"] = {"name": cpu.runner.manifest.name, "members": list(cpu.runner.manifest.model_names),
                           "size": cpu.runner.manifest.preprocess.size}  # fmt: skip
        print(f"ensemble {result['model']}; inputs: {result['inputs']}", flush=True)
        compare_reqs = [{"data": b} for b in blobs[: args.compare_batch]]
        cpu_docs = cpu.handle(compare_reqs, MockContext(model_dir, None))
        if torch.cuda.is_available():
            result["gpu"] = torch.cuda.get_device_name(0)
            gpu = CxrEnsembleHandler()
            gpu.initialize(MockContext(model_dir, 0))
            result["agreement_cuda_bf16_vs_cpu_fp32"] = compare(
                gpu.handle(compare_reqs, MockContext(model_dir, 0)), cpu_docs
            )
            print(f"agreement: {result['agreement_cuda_bf16_vs_cpu_fp32']}", flush=True)
            result["rows"] += time_device(
                gpu, blobs, [int(b) for b in args.gpu_batches.split(",") if b], args.gpu_repeats
            )
        else:
            result["gpu"] = None
            print("NOTE: CUDA is not available here: skipping the GPU part (agreement and cuda timings).", flush=True)
        cpu_batches = [int(b) for b in args.cpu_batches.split(",") if b]
        result["rows"] += time_device(cpu, blobs, cpu_batches, args.cpu_repeats)
    print_table(result["rows"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
