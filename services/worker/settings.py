"""Settings of the explanation worker: typed, read once at start, command line > environment > default.

Every setting has one environment variable (``CXR_...``) and one command-line flag. ``load_settings`` raises
``SettingsError`` (fail fast) on a missing required value, a value of the wrong type or an inconsistent
combination. This module imports nothing heavy: ``python -m services.worker`` reads it before torch.

Redelivery and the visibility timeout (``CXR_VISIBILITY_TIMEOUT_S``): a task is acknowledged only after it has
finished (``acks_late``). If a pool child dies mid-task, the worker's parent process requeues the message at once
(``task_reject_on_worker_lost``). If the whole worker dies (SIGKILL, OOM killer, lost host), nobody is left to
requeue it: the message stays in Redis's ``unacked`` hash and any worker redelivers it once
``visibility_timeout`` seconds have passed since it was delivered, at its next sweep (every
``CXR_UNACKED_RESTORE_INTERVAL_S``). The timeout must therefore be longer than a task may legitimately run
(the hard time limit plus the longest retry countdown), or a live, slow task would be delivered twice.

``CXR_TASK_TEST_DELAY_S`` is for tests only: it makes every task sleep that long (while the job is ``running``,
before the input is read) so that tests can kill a worker mid-task deterministically. Leave it 0 in production.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr.core import env_settings
from cxr.core.env_settings import Setting, is_redis_url, non_negative, positive
from cxr.core.errors import CxrError
from cxr.explain.methods import DEFAULT_FUSION_RULE, FUSION_RULES

QUEUE = "explain"
TASK_NAME = "cxr.explain"
APP_NAME = "cxr"
MAX_HEATMAP_GRID = 512  # cxr.explain.compute.MAX_GRID (not imported: this module must stay free of torch)
MIN_OVERLAY_SIDE = 64  # a smaller display image makes unreadable overlays
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class SettingsError(CxrError):
    """A worker setting is missing, malformed or inconsistent (a deployment error)."""

    reason = "BAD_WORKER_SETTINGS"


@dataclass(frozen=True)
class WorkerSettings:
    """The worker's configuration. Times are seconds; ``metrics_port`` 0 turns the metrics server off."""

    model_dir: Path
    redis_url: str = "redis://127.0.0.1:6390/0"
    concurrency: int = 1
    loglevel: str = "info"
    hostname: str = ""  # "" -> explain-<pid>@<host>, unique per process
    metrics_port: int = 9152
    metrics_host: str = "127.0.0.1"
    ready_file: Path | None = None
    heatmap_grid: int = 64
    overlay_max_side: int = 1024
    result_ttl_s: int = 86400
    soft_time_limit_s: float = 120.0
    time_limit_s: float = 180.0
    max_retries: int = 3
    retry_backoff_s: float = 2.0
    max_attempts: int = 6  # deliveries of one job (first + retries + redeliveries after lost workers)
    torch_threads: int = 0  # 0 -> cpu count / concurrency - 1 (see threads_per_child)
    visibility_timeout_s: int = 600
    unacked_restore_interval_s: int = 10
    proc_alive_timeout_s: float = 60.0
    redis_socket_timeout_s: float = 5.0
    task_test_delay_s: float = 0.0  # TEST ONLY (see module docstring)
    fusion_rule: str = DEFAULT_FUSION_RULE  # how the models' maps are fused (cxr.explain.methods.FUSION_RULES)

    def __post_init__(self) -> None:
        _check_ranges(self)
        _check_consistency(self)

    @property
    def worker_hostname(self) -> str:
        """The Celery node name, unique per process unless set explicitly."""
        return self.hostname or f"explain-{os.getpid()}@{socket.gethostname()}"

    def threads_per_child(self) -> int:
        """Torch intra-op threads for each pool child: ``torch_threads``, or (auto) the child's share of the CPUs
        less one, which is left to the display decode that runs in a thread beside the heatmaps (on the 2-core
        CPU a job took 127 ms with 1 torch thread and 185 ms with 2: docs/BENCHMARKS.md, issue 9); at least 1."""
        if self.torch_threads > 0:
            return self.torch_threads
        return max(1, (os.cpu_count() or 1) // self.concurrency - 1)

    def max_retry_countdown_s(self) -> float:
        """The longest countdown before a retry (exponential backoff: base * 2**(retries - 1))."""
        return self.retry_backoff_s * 2 ** max(0, self.max_retries - 1)


def _fusion_rule(text: str) -> str:
    if text not in FUSION_RULES:
        raise ValueError(f"must be one of {FUSION_RULES}")
    return text


def _loglevel(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise ValueError(f"must be one of {LOG_LEVELS}")
    return text.lower()


FIELDS: tuple[Setting, ...] = (
    Setting("model_dir", "CXR_MODEL_DIR", Path, "ensemble directory (manifest.json + weights); required"),
    Setting("redis_url", "CXR_REDIS_URL", str, "Redis URL: Celery broker and job store"),
    Setting("concurrency", "CXR_WORKER_CONCURRENCY", positive(int), "prefork pool children"),
    Setting("loglevel", "CXR_WORKER_LOGLEVEL", _loglevel, "log level"),
    Setting("hostname", "CXR_WORKER_HOSTNAME", str, "Celery node name (default unique per process)"),
    Setting("metrics_port", "CXR_WORKER_METRICS_PORT", non_negative(int), "Prometheus port, 0 = off"),
    Setting("metrics_host", "CXR_WORKER_METRICS_HOST", str, "Prometheus bind address"),
    Setting("ready_file", "CXR_WORKER_READY_FILE", Path, "file written once the worker and its models are ready"),
    Setting("heatmap_grid", "CXR_HEATMAP_GRID", positive(int), "side of the stored heatmaps"),
    Setting("overlay_max_side", "CXR_OVERLAY_MAX_SIDE", positive(int), "long side of the display image (>= 64)"),
    Setting("result_ttl_s", "CXR_RESULT_TTL_S", positive(int), "TTL of job keys without one"),
    Setting("soft_time_limit_s", "CXR_TASK_SOFT_TIME_LIMIT_S", positive(float), "soft time limit per task"),
    Setting("time_limit_s", "CXR_TASK_TIME_LIMIT_S", positive(float), "hard time limit per task"),
    Setting("max_retries", "CXR_TASK_MAX_RETRIES", non_negative(int), "retries after transient errors"),
    Setting("retry_backoff_s", "CXR_TASK_RETRY_BACKOFF_S", positive(float), "first retry countdown (doubles)"),
    Setting("max_attempts", "CXR_TASK_MAX_ATTEMPTS", positive(int), "deliveries of one job before it fails"),
    Setting("torch_threads", "CXR_TORCH_THREADS", non_negative(int), "torch threads per child, 0 = auto"),
    Setting("visibility_timeout_s", "CXR_VISIBILITY_TIMEOUT_S", positive(int), "redelivery after a lost worker"),
    Setting("unacked_restore_interval_s", "CXR_UNACKED_RESTORE_INTERVAL_S", positive(int), "redelivery sweep"),
    Setting("proc_alive_timeout_s", "CXR_WORKER_PROC_ALIVE_TIMEOUT_S", positive(float), "child start limit"),
    Setting("redis_socket_timeout_s", "CXR_REDIS_SOCKET_TIMEOUT_S", positive(float), "Redis socket timeout"),
    Setting("fusion_rule", "CXR_FUSION_RULE", _fusion_rule, "heatmap fusion: " + "|".join(FUSION_RULES)),
    Setting("task_test_delay_s", "CXR_TASK_TEST_DELAY_S", non_negative(float), "TEST ONLY", cli=False),
)


def _check_ranges(s: WorkerSettings) -> None:
    if s.metrics_port > 65535:
        raise SettingsError(f"CXR_WORKER_METRICS_PORT {s.metrics_port} is not a port")
    if s.overlay_max_side < MIN_OVERLAY_SIDE:
        raise SettingsError(f"CXR_OVERLAY_MAX_SIDE must be at least {MIN_OVERLAY_SIDE}, got {s.overlay_max_side}")
    if s.heatmap_grid > MAX_HEATMAP_GRID:
        raise SettingsError(f"CXR_HEATMAP_GRID must be at most {MAX_HEATMAP_GRID}")
    if s.max_attempts <= s.max_retries:
        raise SettingsError("CXR_TASK_MAX_ATTEMPTS must exceed CXR_TASK_MAX_RETRIES (first try + retries)")
    if not is_redis_url(s.redis_url):
        raise SettingsError(f"CXR_REDIS_URL must be a redis:// URL, got {s.redis_url.split('@')[-1]!r}")


def _check_consistency(s: WorkerSettings) -> None:
    if s.soft_time_limit_s >= s.time_limit_s:
        raise SettingsError("CXR_TASK_SOFT_TIME_LIMIT_S must be below CXR_TASK_TIME_LIMIT_S")
    if s.visibility_timeout_s <= s.time_limit_s + s.max_retry_countdown_s():
        raise SettingsError(
            f"CXR_VISIBILITY_TIMEOUT_S ({s.visibility_timeout_s}) must exceed the hard time limit plus the longest "
            f"retry countdown ({s.time_limit_s + s.max_retry_countdown_s():g}); otherwise a live task is redelivered"
        )


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m services.worker``: one flag per setting, all optional."""
    return env_settings.build_parser(
        "python -m services.worker", "cxr explanation worker (Celery). Research software: NOT FOR CLINICAL USE.", FIELDS
    )


def _resolve(field: Setting, cli: Mapping[str, str | None], environ: Mapping[str, str]) -> Any:
    text = cli.get(field.name) if field.cli else None
    if text is None:
        text = environ.get(field.env) or None
    if text is None:
        return None
    try:
        return field.parse(text)
    except ValueError as e:
        raise SettingsError(f"{field.env} / {field.flag}: {e}") from e


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> WorkerSettings:
    """Read the settings once: ``argv`` (without the program name) > ``environ`` > defaults.

    Raises SettingsError on a missing required value (CXR_MODEL_DIR), a malformed or inconsistent value, or a
    model directory that does not exist. argparse exits with status 2 on unknown flags.
    """
    env = os.environ if environ is None else environ
    cli = vars(build_parser().parse_args(list(argv or [])))
    values = {f.name: v for f in FIELDS if (v := _resolve(f, cli, env)) is not None}
    if "model_dir" not in values:
        raise SettingsError("CXR_MODEL_DIR (or --model-dir) is required: the ensemble directory to explain with")
    if not values["model_dir"].is_dir():
        raise SettingsError(f"CXR_MODEL_DIR {values['model_dir']} is not a directory")
    return WorkerSettings(**values)
