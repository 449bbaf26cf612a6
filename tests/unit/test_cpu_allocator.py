"""glibc's allocator settings of the serving processes, checked in a child process (they are process-wide)."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import ctypes, resource, sys
import numpy as np
from cxr.cpu_allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory(max_arenas=2)
def step():  # ten 16 MB buffers alive at once, then all freed, as a forward's activations are
    buffers = [np.ones(2_000_000) for _ in range(10)]
    return sum(float(b[0]) for b in buffers)
for _ in range(3):  # warm up
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120, check=True)
    return int(done.stdout.strip())


def test_freed_buffers_stay_mapped_instead_of_faulting_in_again() -> None:
    plain, kept = page_faults("plain"), page_faults("keep")
    assert plain > 10 * 2_000  # glibc gives part of the freed 160 MB back and faults it in again every step
    assert kept < plain / 10, (plain, kept)
