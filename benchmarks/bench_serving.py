"""Serving benchmark (not a test): how much the service path costs on top of the bare ensemble forward.

    .venv/bin/python benchmarks/bench_serving.py                      # starts its own stack on free ports
    .venv/bin/python benchmarks/bench_serving.py --address 127.0.0.1:50151 --model-dir model_store/cxr-nih14-imagenet

Measures, for an uncompressed DICOM (RG1_UNCR.dcm) and the JPEG 2000 one (RG1_J2KR.dcm):
  - latency of one Analyze end to end (gRPC upload, decode, preprocess, TorchServe inference, store;
    skip_cache + skip_explanation) vs the bare ensemble forward in this process on the same prepared image
    (EnsembleRunner.predict) and vs the TorchServe handler's ``handle`` in this process on the same wire blob
    (wire decode + forward + JSON: the difference to the server's inference stage is TorchServe's own cost);
    all interleaved, as CPU timings drift between runs (see ../shared/STACK-NOTES.md).
    Goal: Analyze p50 <= 1.2 x bare forward p50 on both files.
  - throughput with N concurrent clients (default 8) vs the bare ensemble's batched images/s in this process
    (the best of batch 4 and 8 at --threads and at all cores, measured before and after the load); goal >= 0.8;
    and the batch sizes TorchServe formed (the handler logs one "cxr batch of N" line per batch in TorchServe's
    model_log.log);
  - resident memory (RSS, process tree) of each service at rest and after the load;
  - explanation time per job (Analyze answered -> WatchExplanation reports DONE) vs a bare forward.
The benchmark process and each TorchServe worker use the same torch thread count (--threads, CXR_TORCH_THREADS;
by default the stack's own: CPUs // CXR_TS_WORKERS); the bare batched forward is also measured with all CPUs.
All processes keep freed memory mapped (cxr.cpu_allocator), as the services do. The CPU each process spent per
image during the load run is reported, to show where the time goes.
Prints a table and writes benchmarks/results/serving.json. Model: CXR_MODEL_DIR / --model-dir, else
model_store/cxr-nih14-imagenet if present, else a random demo-like ensemble (densenet121, efficientnet_b0,
mobilenet_v3_large at 224 px). Research software: NOT FOR CLINICAL USE.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DICOM = REPO.parent / "shared" / "data" / "dicom"
FILES = ("RG1_UNCR.dcm", "RG1_J2KR.dcm")
RESULTS = REPO / "benchmarks" / "results" / "serving.json"
DEMO = REPO / "model_store" / "cxr-nih14-imagenet"
DEMO_LIKE = ("densenet121", "efficientnet_b0", "mobilenet_v3_large")
TARGET_RATIO = 1.2
THROUGHPUT_GOAL = 0.8
BARE_BATCHES = (4, 8)  # batch sizes of the bare batched forward; the best (with the best thread count) counts


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


@dataclass
class Stack:
    """What the benchmark knows of the stack: the ingestion address, and (own stack only) service pids and
    TorchServe's model log."""

    address: str
    pids: dict[str, int]
    model_log: Path | None


@contextmanager
def own_stack(model_dir: Path, scratch: Path) -> Iterator[Stack]:
    """Start the local stack (cxr.stack.up) on free ports in ``scratch``; yield it; stop it."""
    from cxr.stack import StackSettings, down, up
    from cxr.stack.testing import free_port_env

    os.environ.update(free_port_env(), CXR_HOME=str(scratch / "home"), CXR_MODEL_DIR=str(model_dir))
    settings = StackSettings.from_env()
    try:
        state = up(settings, say=lambda msg: print(f"  {msg}", file=sys.stderr))
        pids = {name: rec.pid for name, rec in state.services.items()}
        logs = sorted(Path(settings.home).rglob("model_log.log"))
        yield Stack(settings.ingestion_address, pids, logs[0] if logs else None)
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


def latency(client: Any, runner: Any, handler: Any, data: bytes, repeats: int, warmup: int) -> dict[str, Any]:
    """Interleaved: service Analyze, bare forward, in-process handler ``handle``, decode + preprocess."""
    from cxr.core.wire import encode_input

    decode_s, batch = prepared_input(data, runner.manifest.preprocess)
    blob = encode_input(batch[0])
    service, bare, handle, decode, server_timings = [], [], [], [], []
    for i in range(warmup + repeats):
        t_service, response = timed(lambda: client.analyze(data, skip_cache=True, skip_explanation=True))
        t_bare, _ = timed(lambda: runner.predict(batch))
        t_handle, _ = timed(lambda: handler.handle([{"data": blob}], None))
        t_decode, _ = prepared_input(data, runner.manifest.preprocess)
        if i >= warmup:
            service.append(t_service)
            bare.append(t_bare)
            handle.append(t_handle)
            decode.append(t_decode)
            server_timings.append(dict(response.timings_ms))
    keys = sorted({k for t in server_timings for k in t})
    result: dict[str, Any] = {
        "service_analyze": summary(service), "bare_forward": summary(bare), "handler_handle": summary(handle),
        "decode_preprocess": summary(decode), "wire_bytes": len(blob),
        "server_timings_p50_ms": {k: statistics.median(t.get(k, 0.0) for t in server_timings) for k in keys},
    }  # fmt: skip
    result["ratio_p50"] = result["service_analyze"]["p50_ms"] / result["bare_forward"]["p50_ms"]
    return result


def bare_batched(runner: Any, data: bytes, runs: int, thread_counts: list[int]) -> dict[str, list[float]]:
    """Images/s of ``runs`` bare forwards for each batch size in BARE_BATCHES and torch thread count, keyed
    "b<batch>-t<threads>" (the process's thread count is restored after)."""
    import torch

    _, one = prepared_input(data, runner.manifest.preprocess)
    before = torch.get_num_threads()
    out: dict[str, list[float]] = {}
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for size in BARE_BATCHES:
                batch = np.repeat(one, size, axis=0)
                runner.predict(batch)
                out[f"b{size}-t{threads}"] = [size / timed(partial(runner.predict, batch))[0] for _ in range(runs)]
    finally:
        torch.set_num_threads(before)
    return out


def batch_sizes(model_log: Path | None, since: int) -> dict[str, int] | None:
    """{batch size: count} of the "cxr batch of N" lines TorchServe's model log got after byte ``since``."""
    if model_log is None or not model_log.is_file():
        return None
    with model_log.open("rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    sizes = [int(n) for n in re.findall(r"cxr batch of (\d+)", text)]
    return {str(k): sizes.count(k) for k in sorted(set(sizes))}


def per_service(pids: dict[str, int], measure: Callable[[Any], float]) -> dict[str, float]:
    """``measure`` (of one psutil.Process) summed over each service's process tree, TorchServe split into its Java
    frontend and its Python workers. A service whose processes are gone is left out."""
    import psutil

    out: dict[str, float] = {}
    for name, pid in pids.items():
        try:
            proc = psutil.Process(pid)
            tree = [proc, *proc.children(recursive=True)]
            values = {p.pid: measure(p) for p in tree}
            workers = [p.pid for p in tree if p.pid != pid and "python" in p.name().lower()]
        except psutil.Error:
            continue
        if name == "torchserve":
            out["torchserve_python_workers"] = sum(values[w] for w in workers)
            out["torchserve_frontend"] = sum(values.values()) - out["torchserve_python_workers"]
        else:
            out[name] = sum(values.values())
    return out


def service_memory_mb(pids: dict[str, int]) -> dict[str, float]:
    """RSS in MiB of each service's process tree (see ``per_service``)."""
    return per_service(pids, lambda p: p.memory_info().rss / 2**20)


def cpu_seconds(proc: Any) -> float:
    """User + system CPU seconds a psutil.Process has used so far."""
    t = proc.cpu_times()
    return float(t.user + t.system)


def service_cpu_s(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds each service's process tree has used so far (see ``per_service``), and this benchmark
    process's (the load-generating clients, during the load run)."""
    import psutil

    return {"benchmark_clients": cpu_seconds(psutil.Process()), **per_service(pids, cpu_seconds)}


def cpu_per_image_ms(before: dict[str, float], after: dict[str, float], images: int) -> dict[str, float]:
    """CPU milliseconds per image each process spent between two ``service_cpu_s`` readings."""
    return {k: (after[k] - before[k]) * 1000.0 / images for k in after if k in before}


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
        for key in ("service_analyze", "bare_forward", "handler_handle", "decode_preprocess"):
            print(f"{name:<16}{key:<22}{r[key]['p50_ms']:>10.1f}{r[key]['p95_ms']:>10.1f}")
        verdict = "meets" if r["ratio_p50"] <= TARGET_RATIO else "misses"
        print(f"{name:<16}{'Analyze / bare (p50)':<22}{r['ratio_p50']:>10.2f}   (goal <= {TARGET_RATIO}: {verdict})")
        server = {k: round(v, 1) for k, v in r["server_timings_p50_ms"].items()}
        print(f"{'':<16}server timings p50 ms: {json.dumps(server)}; wire input {r['wire_bytes']} bytes")
    t = report["throughput"]
    verdict = "meets" if t["ratio_to_bare_batched"] >= THROUGHPUT_GOAL else "misses"
    print(f"throughput: {t['images_per_s']:.2f} images/s with {t['clients']} clients "
          f"(latency p50 {t['latency']['p50_ms']:.0f} ms, p95 {t['latency']['p95_ms']:.0f} ms); best bare batched "
          f"forward ({t['bare_batched_best']}) {t['bare_batched_images_per_s']:.2f} images/s "
          f"{json.dumps({k: round(v, 2) for k, v in t['bare_batched_p50_images_per_s'].items()})}; "
          f"stack / bare = {t['ratio_to_bare_batched']:.2f} "
          f"(goal >= {THROUGHPUT_GOAL}: {verdict}); TorchServe batches (size: count) {t['batch_sizes']}")  # fmt: skip
    if t.get("cpu_ms_per_image"):
        cpu = {k: round(v, 1) for k, v in t["cpu_ms_per_image"].items()}
        print(f"CPU ms per image during the load run (wall {1000.0 / t['images_per_s']:.1f} ms per image, "
              f"{os.cpu_count()} CPUs): {json.dumps(cpu)}; all {sum(cpu.values()):.1f}")  # fmt: skip
    for phase in ("memory_at_rest_mb", "memory_after_load_mb"):
        print(f"{phase}: {json.dumps({k: round(v) for k, v in report[phase].items()})}")
    e = report["explanation"]
    print(f"explanation per job: p50 {e['p50_ms']:.0f} ms, p95 {e['p95_ms']:.0f} ms ({e['statuses']}); "
          f"= {e['p50_ms'] / report['bare_forward_p50_ms']:.1f} x a bare forward; "
          f"Analyze store stage with the DICOM file p50 {e['analyze_store_p50_ms']:.1f} ms")  # fmt: skip
    print("Research software: NOT FOR CLINICAL USE.")


def in_process_handler(model_dir: Path) -> Any:
    """The TorchServe handler, initialised in this process as TorchServe would (CPU)."""
    sys.path.insert(0, str(REPO))
    from services.inference.handler import CxrEnsembleHandler

    class Context:
        system_properties = {"model_dir": str(model_dir), "gpu_id": None}

    handler = CxrEnsembleHandler()
    handler.initialize(Context())
    return handler


def run(args: argparse.Namespace, stack: Stack, model_dir: Path) -> dict[str, Any]:
    import torch

    from cxr.client import IngestionClient
    from cxr.cpu_allocator import keep_freed_memory
    from cxr.serving.runner import EnsembleRunner

    address = stack.address
    keep_freed_memory()  # as TorchServe's worker and ingestion do: the bare forward gets the same allocator
    torch.set_num_threads(args.threads)
    runner = EnsembleRunner.load(model_dir)
    handler = in_process_handler(model_dir)
    m = runner.manifest
    report: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads in the benchmark process)",
        "model": {"name": m.name, "version": m.version, "members": list(m.model_names), "size": m.preprocess.size,
                  "dir": str(model_dir)},
        "settings": vars(args) | {"address": address}, "latency": {},
    }  # fmt: skip
    report["memory_at_rest_mb"] = service_memory_mb(stack.pids)
    with IngestionClient(address, timeout_s=args.timeout) as client:
        for name in FILES:
            print(f"latency: {name} ...", file=sys.stderr)
            data = (DICOM / name).read_bytes()
            report["latency"][name] = latency(client, runner, handler, data, args.repeats, args.warmup)
        uncompressed = (DICOM / FILES[0]).read_bytes()
        print("throughput ...", file=sys.stderr)
        thread_counts = sorted({args.threads, os.cpu_count() or 1})
        bare = bare_batched(runner, uncompressed, args.bare_runs, thread_counts)
        log_start = stack.model_log.stat().st_size if stack.model_log and stack.model_log.is_file() else 0
        cpu_before = service_cpu_s(stack.pids)
        t = throughput(address, uncompressed, args.clients, args.per_client)
        t["cpu_ms_per_image"] = cpu_per_image_ms(cpu_before, service_cpu_s(stack.pids), t["requests"])
        t["batch_sizes"] = batch_sizes(stack.model_log, log_start)
        for key, rates in bare_batched(runner, uncompressed, args.bare_runs, thread_counts).items():
            bare[key] += rates  # before and after the load, as the machine's load drifts
        t["bare_batched_images_per_s_runs"] = bare
        t["bare_batched_p50_images_per_s"] = {k: statistics.median(v) for k, v in bare.items()}
        t["bare_batched_best"] = max(t["bare_batched_p50_images_per_s"], key=t["bare_batched_p50_images_per_s"].get)
        t["bare_batched_images_per_s"] = t["bare_batched_p50_images_per_s"][t["bare_batched_best"]]
        t["ratio_to_bare_batched"] = t["images_per_s"] / t["bare_batched_images_per_s"]
        report["throughput"] = t
        report["memory_after_load_mb"] = service_memory_mb(stack.pids)
        print("explanations ...", file=sys.stderr)
        report["explanation"] = explanation_times(client, uncompressed, args.explanations, args.timeout)
    report["bare_forward_p50_ms"] = report["latency"][FILES[0]]["bare_forward"]["p50_ms"]
    ratios = {k: r["ratio_p50"] for k, r in report["latency"].items()}
    through = report["throughput"]["ratio_to_bare_batched"]
    report["goals"] = {
        "analyze_over_bare_p50": {"goal": TARGET_RATIO, "measured": ratios,
                                  "met": all(v <= TARGET_RATIO for v in ratios.values())},
        "throughput_over_bare_batched": {"goal": THROUGHPUT_GOAL, "measured": through,
                                         "met": through >= THROUGHPUT_GOAL},
    }  # fmt: skip
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", help="use a running ingestion service instead of starting a stack")
    p.add_argument("--model-dir", default=os.environ.get("CXR_MODEL_DIR"), help="the ensemble the stack serves")
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--per-client", type=int, default=4)
    p.add_argument("--bare-runs", type=int, default=4, help="bare batched forwards before and after the load")
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads of this process and of each TorchServe worker (CXR_TORCH_THREADS; default: the "
        "stack's own choice, CPUs // CXR_TS_WORKERS)",
    )
    p.add_argument("--explanations", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.threads is None:
        from cxr.stack.settings import StackSettings

        args.threads = StackSettings.from_env().ts_threads_per_worker
    os.environ["CXR_TORCH_THREADS"] = str(args.threads)  # TorchServe's worker (own stack) uses the same count
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        model_dir = choose_model(args.model_dir, Path(tmp))
        if args.address:
            report = run(args, Stack(args.address, {}, None), model_dir)
        else:
            with own_stack(model_dir, Path(tmp)) as stack:
                report = run(args, stack, model_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_table(report)
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
