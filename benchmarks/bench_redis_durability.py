"""What Redis's production settings cost (cxr.stack.redis_config): the same job-shaped writes against a
redis-server with persistence off (the old setting) and with the append-only file fsynced every second, then
the restart (replay) time and the disk used. One "job" = what one Analyze stores: a MULTI/EXEC of the uploaded
DICOM file, the model input, the findings, the answer and the job hash (sizes below), plus the Celery message.

Usage: .venv/bin/python benchmarks/bench_redis_durability.py [--jobs 200] [--dicom-kib 1024]
Prints a table and writes benchmarks/results/redis_durability.json. Not a test: numbers depend on the machine,
its disk and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import redis

from cxr.stack.processes import free_port
from cxr.stack.redis_config import durability_args

REPO = Path(__file__).resolve().parents[1]
MODES = {"persistence off": ["--save", "", "--appendonly", "no"], "AOF everysec + noeviction": durability_args("2gb")}


def start(folder: Path, options: list[str]) -> tuple[subprocess.Popen[bytes], redis.Redis, float]:
    """redis-server in ``folder`` with ``options``; returns it, a client and the seconds until it answered."""
    port = free_port()
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed"
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), *options]
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_timeout=30)
    while True:
        try:
            client.ping()
            break
        except (redis.ConnectionError, redis.TimeoutError):
            time.sleep(0.005)
    return proc, client, time.monotonic() - started


def write_jobs(client: redis.Redis, jobs: int, dicom: bytes) -> list[float]:
    """Job-shaped transactions; returns each one's latency in ms."""
    model_input, findings, answer = os.urandom(224 * 224 * 4), os.urandom(4096), os.urandom(2048)
    latencies = []
    for i in range(jobs):
        t0 = time.perf_counter()
        pipe = client.pipeline(transaction=True)
        pipe.hset(f"cxr:job:{i}", mapping={"status": "queued", "progress": "0", "attempts": "0"})
        pipe.expire(f"cxr:job:{i}", 86400)
        pipe.set(f"cxr:job:{i}:dicom", dicom, ex=3600)
        pipe.set(f"cxr:job:{i}:input", model_input, ex=86400)
        pipe.set(f"cxr:job:{i}:findings", findings, ex=86400)
        pipe.set(f"cxr:result:v:{i}", answer, ex=86400)
        pipe.execute()
        client.lpush("explain", json.dumps({"job": i}))
        latencies.append((time.perf_counter() - t0) * 1000.0)
    return latencies


def measure(name: str, options: list[str], jobs: int, dicom: bytes) -> dict[str, float | str]:
    with tempfile.TemporaryDirectory(prefix="cxr-redis-bench-") as tmp:
        folder = Path(tmp)
        proc, client, _ = start(folder, options)
        t0 = time.perf_counter()
        latencies = write_jobs(client, jobs, dicom)
        elapsed = time.perf_counter() - t0
        used = int(client.info("memory")["used_memory"])
        proc.kill()  # kill -9: what survives is what was on disk (page cache included)
        proc.wait()
        disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        proc, client, restart_s = start(folder, options)
        survived = int(client.llen("explain"))
        proc.terminate()
        proc.wait()
    return {
        "mode": name, "jobs_per_s": jobs / elapsed, "median_ms": statistics.median(latencies),
        "p95_ms": sorted(latencies)[int(0.95 * len(latencies)) - 1], "memory_mib": used / 2**20,
        "disk_mib": disk / 2**20, "restart_s": restart_s, "jobs_after_kill9": survived,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--dicom-kib", type=int, default=1024, help="size of the uploaded DICOM file per job")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "redis_durability.json")
    args = parser.parse_args()
    dicom = os.urandom(args.dicom_kib * 1024)
    rows = [measure(name, options, args.jobs, dicom) for name, options in MODES.items()]
    print(f"{'mode':28} {'jobs/s':>8} {'median ms':>10} {'p95 ms':>8} {'RAM MiB':>8} {'disk MiB':>9} "
          f"{'restart s':>10} {'jobs after kill -9':>19}")  # fmt: skip
    for r in rows:
        print(f"{r['mode']:28} {r['jobs_per_s']:8.0f} {r['median_ms']:10.2f} {r['p95_ms']:8.2f} {r['memory_mib']:8.0f} "
              f"{r['disk_mib']:9.0f} {r['restart_s']:10.2f} {r['jobs_after_kill9']:>19}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"when": datetime.now(UTC).isoformat(), "jobs": args.jobs, "dicom_kib": args.dicom_kib}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
