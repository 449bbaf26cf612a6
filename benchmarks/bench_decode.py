"""Decode time of every shared DICOM file at full resolution and at min_side=224 / 512 (median of a few runs).

Usage: .venv/bin/python benchmarks/bench_decode.py [--runs 5] [--data ../shared/data/dicom] [--out FILE]
Prints a table and writes benchmarks/results/decode.json. Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import PIL
import pydicom

from cxr.core.dicom_decode import decode_radiograph, read_identity
from cxr.core.errors import CxrError

REPO = Path(__file__).resolve().parents[1]
MIN_SIDES: tuple[int | None, ...] = (None, 224, 512)


def median_ms(call: Callable[[], object], runs: int) -> float:
    """Median wall time of ``runs`` calls, in milliseconds (one untimed warm-up call first)."""
    call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def bench_file(path: Path, runs: int) -> dict:
    """Timings and output shapes for one file; a rejected file records its reason instead."""
    data = path.read_bytes()
    row: dict = {
        "file": path.name,
        "bytes": len(data),
        "read_identity_ms": median_ms(lambda: read_identity(data), runs),
    }
    try:
        row["transfer_syntax"] = pydicom.uid.UID(read_identity(data).transfer_syntax_uid).name
        for min_side in MIN_SIDES:
            result = decode_radiograph(data, min_side=min_side)
            key = "full" if min_side is None else f"min_side_{min_side}"
            row[key] = {
                "ms": median_ms(partial(decode_radiograph, data, min_side=min_side), runs),
                "shape": list(result.pixels.shape),
                "scale": round(result.scale, 4),
            }
    except CxrError as exc:
        row["rejected"] = exc.reason
    return row


def print_table(rows: list[dict]) -> None:
    """One line per file: identity time, then decode time and output shape per min_side."""
    print(f"{'file':34} {'syntax':38} {'identity':>9} " + " ".join(f"{_label(m):>22}" for m in MIN_SIDES))
    for row in rows:
        cells = [f"{row['file']:34} {row.get('transfer_syntax', '-')[:38]:38} {row['read_identity_ms']:8.1f}ms"]
        for min_side in MIN_SIDES:
            entry = row.get("full" if min_side is None else f"min_side_{min_side}")
            text = row.get("rejected", "-") if entry is None else f"{entry['ms']:7.1f}ms {_shape(entry)}"
            cells.append(f"{text:>22}")
        print(" ".join(cells))


def _label(min_side: int | None) -> str:
    return "full" if min_side is None else f"min_side={min_side}"


def _shape(entry: dict) -> str:
    return "x".join(str(v) for v in entry["shape"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "dicom")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "decode.json")
    args = parser.parse_args()
    rows = [bench_file(path, args.runs) for path in sorted(args.data.glob("*.dcm"))]
    print_table(rows)
    report = {
        "what": "cxr.core.dicom_decode.decode_radiograph, median wall time of a few runs after one warm-up",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "runs": args.runs,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {"pydicom": pydicom.__version__, "pillow": PIL.__version__},
        "files": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
