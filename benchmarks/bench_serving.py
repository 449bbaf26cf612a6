"""Serving benchmark (not a test): how much the service path costs on top of the bare ensemble forward.

    .venv/bin/python benchmarks/bench_serving.py                      # starts its own stack on free ports
    .venv/bin/python benchmarks/bench_serving.py --address 127.0.0.1:50151 --model-dir model_store/cxr-nih14-imagenet

Measures, for an uncompressed DICOM (RG1_UNCR.dcm) and the JPEG 2000 one (RG1_J2KR.dcm):
  - latency of one Analyze end to end (gRPC upload, decode, preprocess, TorchServe inference, store;
    skip_cache + skip_explanation) vs the bare ensemble forward in this process on the same prepared image
    (EnsembleRunner.predict, what the TorchServe handler runs); the two are interleaved, as CPU timings drift
    between runs (see ../shared/STACK-NOTES.md). Target: service p50 <= 1.3 x bare forward p50.
  - throughput with N concurrent clients (default 4);
  - explanation time per job (Analyze answered -> WatchExplanation reports DONE) vs a bare forward.
Prints a table and writes benchmarks/results/serving.json. Model: CXR_MODEL_DIR / --model-dir, else
model_store/cxr-nih14-imagenet if present, else a random demo-like ensemble (densenet121, efficientnet_b0,
mobilenet_v3_large at 224 px). Research software: NOT FOR CLINICAL USE.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DICOM = REPO.parent / "shared" / "data" / "dicom"
FILES = ("RG1_UNCR.dcm", "RG1_J2KR.dcm")
RESULTS = REPO / "benchmarks" / "results" / "serving.json"
DEMO = REPO / "model_store" / "cxr-nih14-imagenet"
DEMO_LIKE = ("densenet121", "efficientnet_b0", "mobilenet_v3_large")
TARGET_RATIO = 1.3


def summary(samples_s: list[float]) -> dict[str, float]:
    """Seconds -> {"n", "p50_ms", "p95_ms", "mean_ms"}."""
    ms = np.array(samples_s) * 1000.0
    return {"n": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "mean_ms": float(ms.mean())}  # fmt: skip


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


# -- the served model and the stack -----------------------------------------------------------------------
def choose_model(given: str | None, scratch: Path) -> Path:
    """--model-dir / CXR_MODEL_DIR, else the bundled demo ensemble, else a random demo-like one in ``scratch``."""
    if given:
        return Path(given).resolve()
    if (DEMO / "manifest.json").is_file():
        return DEMO
    from cxr.models.testing import make_random_ensemble

    out = scratch / "cxr-random-demo-like"
    make_random_ensemble(out, archs=DEMO_LIKE, size=224, hidden=512, name="cxr-random-demo-like")
    return out


@contextmanager
def own_stack(model_dir: Path, scratch: Path) -> Iterator[str]:
    """Start the local stack (cxr.stack.up) on free ports in ``scratch``; yield the ingestion address; stop it."""
    from cxr.stack import StackSettings, down, up
    from cxr.stack.testing import free_port_env

    os.environ.update(free_port_env(), CXR_HOME=str(scratch / "home"), CXR_MODEL_DIR=str(model_dir))
    settings = StackSettings.from_env()
    try:
        up(settings, say=lambda msg: print(f"  {msg}", file=sys.stderr))
        yield settings.ingestion_address
    finally:
        down(settings, say=lambda msg: print(f"  {msg}", file=sys.stderr))


# -- measurements -----------------------------------------------------------------------------------------
def prepared_input(data: bytes, spec: Any) -> tuple[float, np.ndarray]:
    """Decode + preprocess exactly as the ingestion service does; returns (seconds, (1, 1, S, S) batch)."""
    from cxr.core.dicom_decode import decode_radiograph
    from cxr.core.preprocess import prepare_image

    def work() -> np.ndarray:
        decoded = decode_radiograph(data, min_side=spec.size)
        return prepare_image(decoded.pixels, spec)[None]

    return timed(work)


def latency(client: Any, runner: Any, data: bytes, repeats: int, warmup: int) -> dict[str, Any]:
    """Interleaved service Analyze vs bare forward on the same image."""
    decode_s, batch = prepared_input(data, runner.manifest.preprocess)
    service, bare, decode, server_timings = [], [], [], []
    for i in range(warmup + repeats):
        t_service, response = timed(lambda: client.analyze(data, skip_cache=True, skip_explanation=True))
        t_bare, _ = timed(lambda: runner.predict(batch))
        t_decode, _ = prepared_input(data, runner.manifest.preprocess)
        if i >= warmup:
            service.append(t_service)
            bare.append(t_bare)
            decode.append(t_decode)
            server_timings.append(dict(response.timings_ms))
    keys = sorted({k for t in server_timings for k in t})
    result = {
        "service_analyze": summary(service), "bare_forward": summary(bare), "decode_preprocess": summary(decode),
        "server_timings_p50_ms": {k: statistics.median(t.get(k, 0.0) for t in server_timings) for k in keys},
    }  # fmt: skip
    result["ratio_p50"] = result["service_analyze"]["p50_ms"] / result["bare_forward"]["p50_ms"]
    return result


def throughput(address: str, data: bytes, clients: int, per_client: int) -> dict[str, Any]:
    """``clients`` concurrent clients, each ``per_client`` Analyze calls (skip cache and explanation)."""
    from cxr.client import IngestionClient

    def one_client(_: int) -> list[float]:
        with IngestionClient(address) as c:
            return [
                timed(lambda: c.analyze(data, skip_cache=True, skip_explanation=True))[0] for _ in range(per_client)
            ]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        samples = [s for got in pool.map(one_client, range(clients)) for s in got]
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(samples), "wall_s": wall, "images_per_s": len(samples) / wall,
            "latency": summary(samples)}  # fmt: skip


def explanation_times(client: Any, data: bytes, jobs: int, timeout_s: float) -> dict[str, Any]:
    """Per job: Analyze answered (job enqueued) -> DONE, watched over gRPC; plus the server's store stage of those
    Analyze calls (with an explanation requested it also stores the uploaded DICOM file for the worker)."""
    from cxr.client import job_status_name

    samples, statuses, store_ms = [], [], []
    for _ in range(jobs):
        response = client.analyze(data, skip_cache=True)
        t0 = time.perf_counter()
        final = client.wait_explanation(response.job_id, timeout_s)
        t_done = time.perf_counter() - t0
        statuses.append(job_status_name(final.status))
        samples.append(t_done)
        store_ms.append(dict(response.timings_ms).get("store", 0.0))
    return {"statuses": statuses, **summary(samples), "analyze_store_p50_ms": statistics.median(store_ms)}


# -- report -----------------------------------------------------------------------------------------------
def print_table(report: dict[str, Any]) -> None:
    print(f"\nmodel {report['model']['name']} {report['model']['version']} ({', '.join(report['model']['members'])}, "
          f"{report['model']['size']} px) on {report['machine']}")  # fmt: skip
    print(f"{'file':<16}{'path':<22}{'p50 ms':>10}{'p95 ms':>10}")
    for name, r in report["latency"].items():
        for key in ("service_analyze", "bare_forward", "decode_preprocess"):
            print(f"{name:<16}{key:<22}{r[key]['p50_ms']:>10.1f}{r[key]['p95_ms']:>10.1f}")
        verdict = "meets" if r["ratio_p50"] <= TARGET_RATIO else "misses"
        print(f"{name:<16}{'service / bare (p50)':<22}{r['ratio_p50']:>10.2f}   ({verdict} target <= {TARGET_RATIO})")
        server = {k: round(v, 1) for k, v in r["server_timings_p50_ms"].items()}
        print(f"{'':<16}server timings p50 ms: {json.dumps(server)}")
    t = report["throughput"]
    print(f"throughput: {t['images_per_s']:.2f} images/s with {t['clients']} clients "
          f"(latency p50 {t['latency']['p50_ms']:.0f} ms, p95 {t['latency']['p95_ms']:.0f} ms)")  # fmt: skip
    e = report["explanation"]
    print(f"explanation per job: p50 {e['p50_ms']:.0f} ms, p95 {e['p95_ms']:.0f} ms ({e['statuses']}); "
          f"= {e['p50_ms'] / report['bare_forward_p50_ms']:.1f} x a bare forward; "
          f"Analyze store stage with the DICOM file p50 {e['analyze_store_p50_ms']:.1f} ms")  # fmt: skip
    print("Research software: NOT FOR CLINICAL USE.")


def run(args: argparse.Namespace, address: str, model_dir: Path) -> dict[str, Any]:
    import torch

    from cxr.client import IngestionClient
    from cxr.serving.runner import EnsembleRunner

    runner = EnsembleRunner.load(model_dir)
    m = runner.manifest
    report: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads in the benchmark process)",
        "model": {"name": m.name, "version": m.version, "members": list(m.model_names), "size": m.preprocess.size,
                  "dir": str(model_dir)},
        "settings": vars(args) | {"address": address}, "latency": {},
    }  # fmt: skip
    with IngestionClient(address, timeout_s=args.timeout) as client:
        for name in FILES:
            print(f"latency: {name} ...", file=sys.stderr)
            report["latency"][name] = latency(client, runner, (DICOM / name).read_bytes(), args.repeats, args.warmup)
        uncompressed = (DICOM / FILES[0]).read_bytes()
        print("throughput ...", file=sys.stderr)
        report["throughput"] = throughput(address, uncompressed, args.clients, args.per_client)
        print("explanations ...", file=sys.stderr)
        report["explanation"] = explanation_times(client, uncompressed, args.explanations, args.timeout)
    report["bare_forward_p50_ms"] = report["latency"][FILES[0]]["bare_forward"]["p50_ms"]
    report["target"] = {
        "ratio": TARGET_RATIO,
        "met": all(r["ratio_p50"] <= TARGET_RATIO for r in report["latency"].values()),
    }
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", help="use a running ingestion service instead of starting a stack")
    p.add_argument("--model-dir", default=os.environ.get("CXR_MODEL_DIR"), help="the ensemble the stack serves")
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--per-client", type=int, default=5)
    p.add_argument("--explanations", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        model_dir = choose_model(args.model_dir, Path(tmp))
        if args.address:
            report = run(args, args.address, model_dir)
        else:
            with own_stack(model_dir, Path(tmp)) as address:
                report = run(args, address, model_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_table(report)
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
