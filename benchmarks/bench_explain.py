"""Benchmark: cost of an explanation against the bare ensemble forward. Not a test. Prints a table, writes
benchmarks/results/explain.json.

    .venv/bin/python benchmarks/bench_explain.py [--runs 5] [--threads 2] [--model-dir DIR] [--captum]

Model: --model-dir / CXR_MODEL_DIR, else the bundled model_store/cxr-nih14-imagenet. Everything runs interleaved
inside one process (CPU timings drift between processes and the machine is shared; see STACK-NOTES), and the
median per variant is reported.

Part 1, the whole explanation job on the RG1 files (../shared/data/dicom/RG1_UNCR.dcm, RG1_J2KR.dcm), against a
private redis-server on a free loopback port: the job is written as ingestion writes it (hash, ``:input`` in the
wire format, ``:dicom``, ``:findings``) and ``services.worker.tasks.run_job`` runs it as the Celery task does
(read, display decode at CXR_OVERLAY_MAX_SIDE 1024 with the reduced-resolution path, Grad-CAM of every label and
model, fusion, pack, store in one transaction). Goal: job p50 <= 1.5 x bare forward p50 on both files. Its
parts are timed on their own in the same loop: display (``display_from_dicom``) and heatmaps
(``compute_heatmaps``), and, for comparison in the same run, the job and the display as the previous release
made them (``job_before``: display decoded at full resolution and shrunk to 1024 px, ``:dicom`` read twice, then
the heatmaps, one after the other; ``display_before``).

Part 2 (--captum): our all-labels Grad-CAM (``compute_heatmaps``) against captum's ``LayerGradCam`` with one call
per label per model, on the RG1 model input; goal captum / ours >= 5.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import torch

from cxr.core.dicom_decode import decode_radiograph, read_identity
from cxr.core.jobs import JobStatus, dicom_key, findings_key, input_key, job_key, new_job_fields
from cxr.core.manifest import Manifest
from cxr.core.preprocess import prepare_image
from cxr.core.wire import decode_input, encode_input
from cxr.dicom_results.findings import header_bytes
from cxr.explain.compute import compute_heatmaps
from cxr.explain.display import display_from_dicom, display_min_side, display_png
from cxr.explain.heatmap_store import pack_heatmaps
from cxr.models.bundle import EnsembleNet
from services.worker import tasks
from services.worker.job_state import JobStore
from services.worker.settings import WorkerSettings

REPO = Path(__file__).resolve().parents[1]

DICOM = REPO.parent / "shared" / "data" / "dicom"
FILES = ("RG1_UNCR.dcm", "RG1_J2KR.dcm")
RESULTS = REPO / "benchmarks" / "results" / "explain.json"
DEFAULT_MODEL = REPO / "model_store" / "cxr-nih14-imagenet"
JOB_GOAL = 1.5
CAPTUM_GOAL = 5.0
TTL_S = 600


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds of all threads). On a shared machine the CPU time is the steadier
    measure of the work done; the wall time is what a user waits."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


@contextmanager
def private_redis(folder: Path) -> Iterator[str]:
    """A redis-server on a free loopback port, persistence off, for the ``with`` block; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
            "--dir", str(folder)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def write_job(client: redis.Redis, manifest: Manifest, data: bytes, model_input: bytes) -> str:
    """A queued job as ingestion writes it (hash, ``:input``, ``:dicom``, ``:findings``); returns its id."""
    job_id = uuid.uuid4().hex
    fields = new_job_fields(JobStatus.QUEUED, "queued for explanation", model_name=manifest.name,
                            model_version=manifest.version)  # fmt: skip
    pipe = client.pipeline(transaction=True)
    pipe.hset(job_key(job_id), mapping=fields)  # type: ignore[arg-type]
    pipe.expire(job_key(job_id), TTL_S)
    pipe.set(input_key(job_id), model_input, ex=TTL_S)
    pipe.set(dicom_key(job_id), data, ex=TTL_S)
    pipe.set(findings_key(job_id), b"{}", ex=TTL_S)
    pipe.execute()
    return job_id


def _forward(ensemble: EnsembleNet, x: torch.Tensor) -> None:
    with torch.inference_mode():
        ensemble(x)


def job_variants(
    s: WorkerSettings, store: JobStore, client: redis.Redis, data: bytes
) -> tuple[dict[str, Callable[[], object]], Callable[[], None]]:
    """The variants of Part 1 for one file (bare forward, whole job, the job's two big parts on their own, the
    previous release's job and display), and the untimed step before each round that writes the jobs as
    ingestion would (ingestion's cost, not the job's)."""
    manifest, ensemble = tasks.loaded_ensemble()
    model_input = prepare_image(decode_radiograph(data, min_side=manifest.preprocess.size).pixels, manifest.preprocess)
    blob = encode_input(model_input)
    x = torch.from_numpy(model_input)[None]
    identity = read_identity(data)
    before_min_side = display_min_side(identity.rows, identity.columns, s.overlay_max_side)

    def display_before() -> bytes:
        return display_png(decode_radiograph(data, min_side=before_min_side).pixels, s.overlay_max_side)

    queued: dict[str, list[str]] = {"job": [], "job_before": []}

    def prepare() -> None:
        for ids in queued.values():
            ids.append(write_job(client, manifest, data, blob))

    def job() -> None:
        outcome = tasks.run_job(store, queued["job"].pop(), s)
        if outcome != "done":
            raise RuntimeError(f"the job ended {outcome}")

    def job_before() -> None:
        """The job as the previous release ran it: display at full resolution first, ``:dicom`` read twice,
        then the heatmaps, sequentially."""
        job_id = queued["job_before"].pop()
        store.read(job_id)
        store.begin_attempt(job_id, "computing explanations")
        x_job = decode_input(store.read_input(job_id), manifest.preprocess)
        display = display_png(decode_radiograph(store.read_dicom(job_id), min_side=before_min_side).pixels,
                              s.overlay_max_side)  # fmt: skip
        source = header_bytes(store.read_dicom(job_id))
        heatmaps = compute_heatmaps(ensemble, manifest, x_job, grid=s.heatmap_grid)
        store.finish(job_id, pack_heatmaps(heatmaps), display, source)

    return {
        "forward": lambda: _forward(ensemble, x),
        "job": job,
        "job_before": job_before,
        "display": lambda: display_from_dicom(data, s.overlay_max_side),
        "display_before": display_before,
        "heatmaps": lambda: compute_heatmaps(ensemble, manifest, x, grid=s.heatmap_grid),
    }, prepare


def run_variants(
    variants: dict[str, Callable[[], object]], runs: int, prepare: Callable[[], None] | None = None
) -> dict[str, Any]:
    """One warm-up, then ``runs`` interleaved rounds, each after an untimed ``prepare()``; wall and CPU seconds
    per variant and their medians."""
    before_round = prepare if prepare is not None else (lambda: None)
    before_round()
    for fn in variants.values():
        fn()
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(runs):
        before_round()
        for name, fn in variants.items():
            w, c = _timed(fn)
            wall[name].append(w)
            cpu[name].append(c)
    return {
        "wall_s": wall, "cpu_s": cpu,
        "median_wall_s": {n: statistics.median(t) for n, t in wall.items()},
        "median_cpu_s": {n: statistics.median(t) for n, t in cpu.items()},
    }  # fmt: skip


def part_jobs(s: WorkerSettings, runs: int, scratch: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with private_redis(scratch) as url:
        client = redis.Redis.from_url(url)
        store = JobStore(client, TTL_S)
        for name in FILES:
            print(f"job: {name} ...", file=sys.stderr)
            variants, prepare = job_variants(s, store, client, (DICOM / name).read_bytes())
            r = run_variants(variants, runs, prepare)
            r["job_over_forward_wall"] = r["median_wall_s"]["job"] / r["median_wall_s"]["forward"]
            r["job_over_forward_cpu"] = r["median_cpu_s"]["job"] / r["median_cpu_s"]["forward"]
            r["job_before_over_forward_wall"] = r["median_wall_s"]["job_before"] / r["median_wall_s"]["forward"]
            out[name] = r
    return out


def part_captum(runs: int, data: bytes) -> dict[str, Any]:
    from captum.attr import LayerGradCam

    from cxr.models.architectures import CXRNet

    manifest, ensemble = tasks.loaded_ensemble()
    pixels = decode_radiograph(data, min_side=manifest.preprocess.size).pixels
    x = torch.from_numpy(prepare_image(pixels, manifest.preprocess))[None]

    def captum_loop() -> None:
        for member in ensemble.members:
            assert isinstance(member, CXRNet)
            explainer = LayerGradCam(member, member.cam_target)
            for label in range(len(manifest.labels)):
                explainer.attribute(x, target=label, relu_attributions=True)

    r = run_variants({"explain": lambda: compute_heatmaps(ensemble, manifest, x), "captum": captum_loop}, runs)
    r["captum_over_explain_wall"] = r["median_wall_s"]["captum"] / r["median_wall_s"]["explain"]
    return r


def _print_table(result: dict[str, Any]) -> None:
    print(f"\nmodel {result['model']} ({', '.join(result['members'])}), {result['threads']} torch threads, "
          f"{result['machine']}; load average (1 min) at the end {result['load_average_1m']:.1f}")  # fmt: skip
    print(f"{'file':<14}{'variant':<10}{'wall ms':>9}{'cpu ms':>9}   wall per run (ms)")
    for name, r in result["jobs"].items():
        for v in ("forward", "job", "job_before", "display", "display_before", "heatmaps"):
            runs = " ".join(f"{t * 1000:.0f}" for t in r["wall_s"][v])
            print(f"{name:<14}{v:<10}{r['median_wall_s'][v] * 1000:>9.1f}{r['median_cpu_s'][v] * 1000:>9.1f}   {runs}")
        ratio = r["job_over_forward_wall"]
        verdict = "meets" if ratio <= JOB_GOAL else "misses"
        print(f"{name:<14}job / forward (p50): wall {ratio:.2f}, cpu {r['job_over_forward_cpu']:.2f}   "
              f"(goal <= {JOB_GOAL}: {verdict}); the previous release's job / forward "
              f"{r['job_before_over_forward_wall']:.2f}")  # fmt: skip
    if "captum" in result:
        c = result["captum"]
        verdict = "meets" if c["captum_over_explain_wall"] >= CAPTUM_GOAL else "misses"
        print(f"captum LayerGradCam per label / ours: {c['captum_over_explain_wall']:.1f} "
              f"(goal >= {CAPTUM_GOAL}: {verdict})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--model-dir", type=Path, default=Path(os.environ.get("CXR_MODEL_DIR") or DEFAULT_MODEL))
    parser.add_argument("--captum", action="store_true", help="also compare with captum's per-label Grad-CAM")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    s = WorkerSettings(model_dir=args.model_dir.resolve(), torch_threads=args.threads, metrics_port=0)
    tasks.configure(s)
    # keeps freed memory, sets the torch threads and loads the ensemble, as a pool child does
    error = tasks.init_child()
    if error is not None:
        raise SystemExit(f"cannot load {args.model_dir}: {error}")
    manifest, _ = tasks.loaded_ensemble()
    result: dict[str, Any] = {
        "model": f"{manifest.name} {manifest.version}", "members": list(manifest.model_names),
        "labels": len(manifest.labels), "size": manifest.preprocess.size, "runs": args.runs,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "overlay_max_side": s.overlay_max_side, "grid": s.heatmap_grid,
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="cxr-bench-explain-") as tmp:
        result["jobs"] = part_jobs(s, args.runs, Path(tmp))
    if args.captum:
        print("captum ...", file=sys.stderr)
        result["captum"] = part_captum(args.runs, (DICOM / FILES[0]).read_bytes())
    result["load_average_1m"] = os.getloadavg()[0]
    ratios = {name: r["job_over_forward_wall"] for name, r in result["jobs"].items()}
    result["goals"] = {"job_over_forward_p50": {"goal": JOB_GOAL, "measured": ratios,
                                                "met": all(v <= JOB_GOAL for v in ratios.values())}}  # fmt: skip
    _print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
