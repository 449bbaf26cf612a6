"""Shared session fixtures of the integration tests: one real redis-server on a free loopback port, persistence
off, its files in a temporary folder; stopped at the end of the session. Keep this small: other fixtures live
in the test modules that need them."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from cxr.stack.processes import free_port

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"


@dataclass(frozen=True)
class RedisServer:
    """A running redis-server started for the test session."""

    port: int
    url: str  # redis://127.0.0.1:<port>/0
    log: Path

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


def _wait_pong(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 10.0) -> None:
    client = redis.Redis.from_url(url, socket_timeout=1.0)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            if client.ping():
                return
        except redis.ConnectionError:
            time.sleep(0.02)
    raise RuntimeError(f"redis-server not answering PING after {timeout_s} s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server (``apt-get install redis-server``) for the whole session."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed: apt-get install -y redis-server"
    folder = tmp_path_factory.mktemp("redis")
    port, log = free_port(), folder / "redis.log"
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(folder),
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        server = RedisServer(port=port, url=f"redis://127.0.0.1:{port}/0", log=log)
        _wait_pong(server.url, proc, log)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    """The URL of the session's redis-server (db 0). Tests use unique keys; nothing is flushed between tests."""
    return redis_server.url
