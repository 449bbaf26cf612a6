"""How redis-server is run for what it holds (the local stack, the fault tests and docker-compose use these
settings; docs/SECURITY.md and docs/OPERATIONS-FAULTS.md explain them).

Redis holds the Celery queue of explanation jobs (list ``explain`` and hash ``unacked``, no TTL) and the
results and job state (``cxr:*``, every key with a TTL). So:

* **Persistence: append-only file, fsync every second** (``appendonly yes``, ``appendfsync everysec``; RDB
  snapshots off). Redis appends every write to the AOF before it answers the client, so a job that ingestion
  acknowledged is in the file (in the kernel's page cache) and survives a crash or kill -9 of redis-server. A
  crash of the whole machine can lose the last second of writes. Cost: every byte written is also written to
  disk (DICOM uploads, heatmaps), the file grows until Redis rewrites it (at twice its size after the last
  rewrite), and a restart replays the file before it answers (``LOADING``).
* **Memory limit, never evict** (``maxmemory`` = ``CXR_REDIS_MAXMEMORY``, ``maxmemory-policy noeviction``):
  no key is ever evicted, so queued work and its inputs cannot disappear. When the limit is reached Redis refuses
  writes: Analyze answers RESOURCE_EXHAUSTED / STORE_FULL (nothing stored, retry later) and the health check
  turns NOT_SERVING until TTLs have freed memory. Deletes and expiries still work.
* Loopback only (``bind``, ``protected-mode yes``) for the local stack.
"""

from __future__ import annotations

import re
from pathlib import Path

DEFAULT_MAXMEMORY = "1gb"
_MEMORY = re.compile(r"^[1-9][0-9]*(b|kb|mb|gb)?$", re.IGNORECASE)


def is_memory_size(value: str) -> bool:
    """True for a redis.conf memory size such as ``1gb``, ``512mb`` or ``1048576`` (no zero: 0 = no limit)."""
    return _MEMORY.match(value.strip()) is not None


def durability_args(maxmemory: str = DEFAULT_MAXMEMORY) -> list[str]:
    """redis-server options for persistence and memory (see the module docstring)."""
    return [
        "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
        "--maxmemory", maxmemory, "--maxmemory-policy", "noeviction",
    ]  # fmt: skip


def redis_server_argv(
    binary: str, *, port: int, host: str, data_dir: Path, maxmemory: str = DEFAULT_MAXMEMORY
) -> list[str]:
    """The command line of a stack's redis-server: loopback (``host``), data (AOF) in ``data_dir``."""
    return [
        binary, "--port", str(port), "--bind", host, "--protected-mode", "yes", "--dir", str(data_dir),
        "--daemonize", "no", *durability_args(maxmemory),
    ]  # fmt: skip
