"""Stop glibc from returning freed memory to the kernel after every large tensor (CPU only).

By default glibc serves allocations above a dynamic threshold with mmap and unmaps them on free, so every
training step or forward pass page-faults its activations back in. Measured on the 2-core CI machine
(MobileNetV3-Small, batch 32, 224 px, channels_last, one process): 32 training images/s before, 89 after
(``mallopt``; the ``MALLOC_MMAP_THRESHOLD_`` environment variable does the same for a whole process tree, but
only if set before start). The cost is resident memory that stays reserved after a peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory(max_arenas: int | None = None) -> bool:
    """Raise glibc's mmap and trim thresholds for this process -> True when glibc accepted them (False on
    another C library, where nothing changes). ``max_arenas`` bounds glibc's per-thread arenas (each keeps its
    own freed memory): for a process with many threads, such as a gRPC server."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("no glibc mallopt: allocator left as it is")
        return False
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if max_arenas is not None:
        ok = ok and mallopt(M_ARENA_MAX, max_arenas) == 1
    log.debug("glibc mallopt thresholds raised: %s", ok)
    return bool(ok)
