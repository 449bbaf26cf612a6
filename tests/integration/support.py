"""Helpers shared by the integration fixtures (conftest.py, ingestion_fixtures.py, worker_fixtures.py): free
loopback ports, polling with a deadline, a private redis-server (loopback only, persistence off, its files and
log in a given folder) and the tiny random ``ensemble`` fixture, which those modules re-export by name."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from cxr.core.manifest import Manifest
from cxr.stack.processes import free_port, free_ports, log_tail

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"

__all__ = ["DATA", "REPO", "RedisServer", "ensemble", "free_port", "free_ports", "redis_server_in",
           "start_redis_server", "stop_redis", "wait_until"]  # fmt: skip
ENSEMBLE_SIZE = 64


def wait_until(check: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy and return that; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")


@dataclass(frozen=True)
class RedisServer:
    """A running redis-server started by a test fixture."""

    port: int
    url: str  # redis://127.0.0.1:<port>/0
    log: Path

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


def _redis_argv(port: int, folder: Path, debug_command: bool) -> list[str]:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed: apt-get install -y redis-server"
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(folder)]
    return argv + (["--enable-debug-command", "local"] if debug_command else [])


def start_redis_server(
    folder: Path, *, debug_command: bool = False, port: int | None = None, timeout_s: float = 10.0
) -> tuple[subprocess.Popen[bytes], RedisServer]:
    """Start redis-server on loopback ``port`` (default: a free one), files and ``redis.log`` in ``folder``; return
    once it answers PING. ``debug_command`` allows DEBUG from loopback (``DEBUG SLEEP`` simulates a Redis hiccup).

    The caller stops the process (:func:`stop_redis`). Fails the test if it exits or does not answer in time."""
    port, log = free_port() if port is None else port, folder / "redis.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(_redis_argv(port, folder, debug_command), stdout=out, stderr=subprocess.STDOUT)
    server = RedisServer(port=port, url=f"redis://127.0.0.1:{port}/0", log=log)
    try:
        _wait_pong(server, proc, timeout_s)
    except BaseException:
        stop_redis(proc)
        raise
    return proc, server


def _wait_pong(server: RedisServer, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    client = redis.Redis.from_url(server.url, socket_timeout=2)

    def pong() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"redis-server exited ({proc.returncode}):\n{log_tail(server.log)}")
        try:
            return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError):  # not listening yet, or the port is someone else's
            return False

    try:
        wait_until(pong, timeout_s, "redis-server to answer PING", interval_s=0.02)
    finally:
        client.close()


def stop_redis(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; waits until the process is gone."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@contextmanager
def redis_server_in(folder: Path, *, debug_command: bool = False) -> Iterator[RedisServer]:
    """A private redis-server (see :func:`start_redis_server`) for the ``with`` block; always stopped after."""
    proc, server = start_redis_server(folder, debug_command=debug_command)
    try:
        yield server
    finally:
        stop_redis(proc)


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    """A tiny random 2-model ensemble at 64 px (never downloaded weights): (its folder, its manifest)."""
    from cxr.models.testing import make_random_ensemble  # torch: only where a module asks for the fixture

    out = tmp_path_factory.mktemp("ensemble")
    return out, make_random_ensemble(out, size=ENSEMBLE_SIZE)
