"""Load run (a benchmark, not a test): N concurrent gRPC clients and M DICOM (C-STORE) clients against the local
stack for a bounded time and number of requests, loopback only.

    .venv/bin/python benchmarks/bench_load.py --start --clients 8 --dicom-clients 2 --duration 180
    .venv/bin/python benchmarks/bench_load.py --home .cxr --clients 4 --duration 60     # a stack already up

Every request is a real analysis: gRPC uploads ask ``skip_cache``; DICOM clients send each file with a new SOP
Instance UID (one association per client, reused, as a PACS does). Files: the four real radiographs of
../shared/data/dicom, in turn. ``--explain`` also queues explanations (the worker then competes for the CPU).

Reports throughput, p50 / p95 / p99 latency per door, outcomes (``ok``; ``overloaded`` = the deliberate
RESOURCE_EXHAUSTED / 0xA700 refusals of a full stack; anything else is an error), and the resident memory of
each service (its whole process group: TorchServe's Java frontend and Python workers, the Celery pool) at the
start, every --memory-every seconds (a trend shows growth) and at the end. Prints a table and writes
benchmarks/results/load.json (or ``--json``). Exit 1 on any error.
Research software: NOT FOR CLINICAL USE.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pydicom

REPO = Path(__file__).resolve().parents[1]
DICOM = REPO.parent / "shared" / "data" / "dicom"
FILES = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "siim_pneumothorax_negative.dcm", "nih_no_finding_dx.dcm")
RESULTS = REPO / "benchmarks" / "results" / "load.json"
DEMO = REPO / "model_store" / "cxr-nih14-imagenet"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class Tally:
    """Latencies and outcomes of one door, shared by its client threads."""

    latencies_s: list[float] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: str, seconds: float) -> None:
        with self.lock:
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
            if outcome == "ok":
                self.latencies_s.append(seconds)


class Budget:
    """At most ``max_requests`` requests, until ``deadline`` (monotonic); shared by every client."""

    def __init__(self, max_requests: int, duration_s: float) -> None:
        self._left = max_requests
        self._deadline = time.monotonic() + duration_s
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self._left <= 0 or time.monotonic() >= self._deadline:
                return False
            self._left -= 1
            return True


# -- the stack ---------------------------------------------------------------------------------------------------
@contextmanager
def own_stack(model_dir: Path, scratch: Path) -> Iterator[Path]:
    """`cxr up` on free loopback ports in ``scratch`` (home yielded); `cxr down` after."""
    from cxr.stack import StackSettings, down, up
    from cxr.stack.testing import free_port_env

    os.environ.update(free_port_env(), CXR_HOME=str(scratch / "home"), CXR_MODEL_DIR=str(model_dir))
    settings = StackSettings.from_env()
    try:
        up(settings, say=lambda msg: print(f"  {msg}", file=sys.stderr))
        yield settings.home
    finally:
        down(settings, say=lambda msg: print(f"  {msg}", file=sys.stderr))


def read_stack(home: Path) -> dict[str, Any]:
    """stack.json of a running stack; exits when there is none or an address is not on loopback."""
    state_file = home / "stack.json"
    if not state_file.is_file():
        sys.exit(f"no stack is up in {home} (run `cxr up` or pass --start)")
    state: dict[str, Any] = json.loads(state_file.read_text())
    for name in ("ingestion", "dicom"):
        host = state["services"].get(name, {}).get("address", "127.0.0.1:0").rsplit(":", 1)[0]
        if host not in LOOPBACK:
            sys.exit(f"refusing to load {name} at {host}: this script only drives a loopback stack")
    return state


def service_memory_mb(state: dict[str, Any]) -> dict[str, float]:
    """Resident memory of each service: its process and all its descendants (MiB)."""
    out = {}
    for name, rec in state["services"].items():
        try:
            root = psutil.Process(rec["pid"])
            procs = [root, *root.children(recursive=True)]
            if rec.get("pgid"):  # TorchServe: the launcher's group holds the Java frontend and its workers
                procs += [p for p in psutil.process_iter() if _pgid(p.pid) == rec["pgid"] and p not in procs]
            out[name] = round(sum(_rss(p) for p in procs) / 2**20, 1)
        except psutil.NoSuchProcess:
            out[name] = 0.0
    return out


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _rss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


# -- clients -----------------------------------------------------------------------------------------------------
def grpc_client(address: str, files: list[bytes], budget: Budget, tally: Tally, explain: bool, index: int) -> None:
    from cxr.client import ClientError, IngestionClient

    with IngestionClient(address, timeout_s=300) as client:
        n = index
        while budget.take():
            data = files[n % len(files)]
            n += 1
            t0 = time.perf_counter()
            try:
                client.analyze(data, skip_cache=True, skip_explanation=not explain, client_name="bench-load")
                outcome = "ok"
            except ClientError as e:
                outcome = "overloaded" if e.code == "RESOURCE_EXHAUSTED" else f"error:{e.reason}"
            tally.add(outcome, time.perf_counter() - t0)


def dicom_client(address: str, ae_title: str, datasets: list[pydicom.Dataset], budget: Budget, tally: Tally,
                 index: int) -> None:  # fmt: skip
    from pynetdicom import AE

    host, port = address.rsplit(":", 1)
    ae = AE(ae_title=f"LOAD{index:02d}")
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 300
    assoc = ae.associate(host, int(port), ae_title=ae_title)
    if not assoc.is_established:
        tally.add("error:ASSOCIATION_REJECTED", 0.0)
        return
    n = index
    try:
        while budget.take():
            ds = datasets[n % len(datasets)]
            n += 1
            ds.SOPInstanceUID = pydicom.uid.generate_uid()  # a new instance each time: never a cache hit
            t0 = time.perf_counter()
            status = assoc.send_c_store(ds)
            code = int(status.Status) if "Status" in status else -1
            outcome = "ok" if code == 0 else "overloaded" if code == 0xA700 else f"error:0x{code & 0xFFFF:04X}"
            tally.add(outcome, time.perf_counter() - t0)
    finally:
        if assoc.is_established:
            assoc.release()


def summarise(tally: Tally, elapsed_s: float) -> dict[str, Any]:
    ms = np.array(tally.latencies_s) * 1000.0
    pct = {f"p{q}_ms": round(float(np.percentile(ms, q)), 1) if len(ms) else None for q in (50, 95, 99)}
    return {"ok": tally.outcomes.get("ok", 0), "outcomes": dict(tally.outcomes),
            "throughput_per_s": round(len(ms) / elapsed_s, 3), **pct,
            "max_ms": round(float(ms.max()), 1) if len(ms) else None}  # fmt: skip


def sample_memory(
    state: dict[str, Any], threads: list[threading.Thread], t0: float, every_s: float
) -> list[dict[str, Any]]:
    """Join the client threads, sampling every ``every_s`` seconds until they end: {"t_s", service: MiB} (growth
    shows as a trend)."""
    samples: list[dict[str, Any]] = []
    while True:
        next_at = t0 + (len(samples) + 1) * every_s
        for t in threads:
            t.join(timeout=max(0.0, next_at - time.monotonic()))
        if not any(t.is_alive() for t in threads):
            return samples
        samples.append({"t_s": round(time.monotonic() - t0), **service_memory_mb(state)})


def run(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    state = read_stack(home)
    files = [(DICOM / name).read_bytes() for name in FILES]
    datasets = [pydicom.dcmread(io.BytesIO(data)) for data in files]
    budget = Budget(args.max_requests, args.duration)
    tallies = {"grpc": Tally(), "dicom": Tally()}
    ae_title = os.environ.get("CXR_DICOM_AE_TITLE", "CXR")
    memory_start = service_memory_mb(state)
    threads = [threading.Thread(target=grpc_client, args=(state["services"]["ingestion"]["address"], files, budget,
                                tallies["grpc"], args.explain, i)) for i in range(args.clients)]  # fmt: skip
    dicom_address = state["services"]["dicom"]["address"] if args.dicom_clients else ""
    for i in range(args.dicom_clients):
        own = [d.copy() for d in datasets]
        threads.append(threading.Thread(target=dicom_client, args=(dicom_address, ae_title, own, budget,
                                                                   tallies["dicom"], i)))  # fmt: skip
    t0 = time.monotonic()
    for t in threads:
        t.start()
    samples = sample_memory(state, threads, t0, args.memory_every)
    elapsed = time.monotonic() - t0
    memory_end = service_memory_mb(read_stack(home))
    by_door = {door: summarise(tally, elapsed) for door, tally in tallies.items()}
    outcomes: dict[str, int] = {}
    for tally in tallies.values():
        for name, count in tally.outcomes.items():
            outcomes[name] = outcomes.get(name, 0) + count
    errors = sum(v for k, v in outcomes.items() if k.startswith("error"))
    return {
        "clients": args.clients, "dicom_clients": args.dicom_clients, "duration_s": round(elapsed, 1),
        "requests": sum(outcomes.values()), "errors": errors, "overloaded": outcomes.get("overloaded", 0),
        "throughput_per_s": round(sum(d["ok"] for d in by_door.values()) / elapsed, 3),
        "all": summarise(Tally(latencies_s=[s for t in tallies.values() for s in t.latencies_s],
                               outcomes=outcomes), elapsed),
        "by_door": by_door, "memory_mb": {"start": memory_start, "end": memory_end, "during": samples},
        "model": state.get("model", {}).get("name"), "explain": args.explain, "files": list(FILES),
        "memory_every_s": args.memory_every,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }  # fmt: skip


def print_table(report: dict[str, Any]) -> None:
    print(f"load: {report['clients']} gRPC + {report['dicom_clients']} DICOM clients, {report['duration_s']} s, "
          f"model {report['model']}, explanations {'on' if report['explain'] else 'off'}")  # fmt: skip
    print(f"{'door':<8}{'ok':>7}{'req/s':>9}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}  outcomes")
    for door, d in [*report["by_door"].items(), ("all", report["all"])]:
        print(f"{door:<8}{d['ok']:>7}{d['throughput_per_s']:>9.2f}{d['p50_ms'] or 0:>10.0f}{d['p95_ms'] or 0:>10.0f}"
              f"{d['p99_ms'] or 0:>10.0f}  {json.dumps(d['outcomes'])}")  # fmt: skip
    during = report["memory_mb"]["during"]
    every = report["memory_every_s"]
    print(f"{'service':<12}{'RSS start MiB':>15}{'RSS end MiB':>13}  during the run (every {every:g} s)")
    for name, start in report["memory_mb"]["start"].items():
        series = " ".join(f"{s.get(name, 0):.0f}" for s in during)
        print(f"{name:<12}{start:>15.0f}{report['memory_mb']['end'].get(name, 0):>13.0f}  {series}")
    print(f"errors: {report['errors']}, deliberate overload refusals: {report['overloaded']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--home", type=Path, default=Path(os.environ.get("CXR_HOME", ".cxr")), help="CXR_HOME of the stack")
    p.add_argument("--start", action="store_true", help="start a stack of our own (free ports), stop it after")
    p.add_argument("--model-dir", type=Path, default=DEMO, help="with --start: the ensemble to serve")
    p.add_argument("--clients", type=int, default=4, help="concurrent gRPC clients")
    p.add_argument("--dicom-clients", type=int, default=1, help="concurrent C-STORE clients (associations)")
    p.add_argument("--duration", type=float, default=120.0, help="seconds (bound)")
    p.add_argument("--max-requests", type=int, default=5000, help="requests in all (bound)")
    p.add_argument("--explain", action="store_true", help="also queue the explanations")
    p.add_argument("--memory-every", type=float, default=30.0, help="seconds between memory samples")
    p.add_argument("--json", type=Path, default=RESULTS, help="where to write the JSON report")
    args = p.parse_args(argv)
    if args.start:
        with tempfile.TemporaryDirectory(prefix="cxr-load-") as scratch, own_stack(args.model_dir, Path(scratch)) as h:
            report = run(args, h)
    else:
        report = run(args, args.home)
    print_table(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
