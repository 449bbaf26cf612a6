"""Detached child processes of the local stack: spawn with a log file, identify, stop, and ports.

Processes are started in their own session (``start_new_session=True``) with stdout/stderr appended to a log
file; nothing else is done to daemonise them. A process is identified by (pid, create time) so that a recycled
pid is never mistaken for ours.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessRef:
    """A process we started: its pid and its create time (seconds since the epoch, as psutil reports it)."""

    pid: int
    create_time: float

    def alive(self) -> bool:
        """True if this very process (not a recycled pid) is running and not a zombie."""
        try:
            proc = psutil.Process(self.pid)
            return abs(proc.create_time() - self.create_time) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        """Reference a running pid. Raises psutil.NoSuchProcess if it is gone."""
        return cls(pid, psutil.Process(pid).create_time())


def spawn(
    argv: Sequence[str], *, log_file: Path, env: Mapping[str, str], cwd: Path
) -> tuple[subprocess.Popen, ProcessRef]:
    """Start ``argv`` detached (own session), stdout+stderr appended to ``log_file``; stdin from /dev/null.

    Returns the Popen (to poll while we wait for readiness) and its ProcessRef. Raises OSError if the
    executable cannot be started."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=dict(env), cwd=cwd, start_new_session=True,
        )  # fmt: skip
    log.info("started %s (pid %d), log %s", argv[0], proc.pid, log_file)
    return proc, ProcessRef.of(proc.pid)


def stop_process(ref: ProcessRef, grace_s: float, pgid: int | None = None) -> bool:
    """SIGTERM the process and wait up to ``grace_s`` for it and the rest of its process group (``pgid``,
    default its own pid: our services lead their group) to exit; then SIGKILL whatever is left.

    Returns True if something had to be killed. A process that is already gone is fine."""
    group = ref.pid if pgid is None else pgid
    deadline = time.monotonic() + grace_s
    if ref.alive():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(ref.pid, signal.SIGTERM)
    while time.monotonic() < deadline:
        _reap(ref.pid)
        if not ref.alive() and not group_pids(group):
            return False
        time.sleep(0.1)
    log.warning("process group %d still running %.0f s after SIGTERM; sending SIGKILL", group, grace_s)
    kill_group(group)
    if ref.alive():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(ref.pid, signal.SIGKILL)
    _wait_gone(ref, 5.0)
    return True


def group_pids(pgid: int) -> list[int]:
    """Pids of the live processes in process group ``pgid`` (our services are group leaders)."""
    pids = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return pids


def kill_group(pgid: int) -> bool:
    """SIGKILL every process left in group ``pgid`` (leftovers of a stopped service). True if any was left."""
    if not group_pids(pgid):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    return True


def _wait_gone(ref: ProcessRef, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap(ref.pid)
        if not ref.alive():
            return True
        time.sleep(0.1)
    return not ref.alive()


def _reap(pid: int) -> None:
    """Collect the exit status if ``pid`` is our own child (otherwise it would linger as a zombie)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: its parent (init) reaps it


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file ("" if it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# -- ports -------------------------------------------------------------------------------------------
def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if ``host:port`` can be bound right now (SO_REUSEADDR as servers set it, so TIME_WAIT is free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def port_holder(port: int) -> str | None:
    """'<name> (pid N)' of the process listening on ``port``, or None when it cannot be found out."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    for c in conns:
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
            try:
                return f"{psutil.Process(c.pid).name()} (pid {c.pid})"
            except psutil.NoSuchProcess:
                return f"pid {c.pid}"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free now (bind to port 0). For tests and benchmarks."""
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports the OS considers free now: all ``n`` sockets are bound to port 0 at the same time,
    so no port is given twice. For tests and benchmarks."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()
