"""Helpers of the health, security and fault tests: a redis-server run with the stack's production settings
(append-only file, memory limit, noeviction; ``cxr.stack.redis_config``) that a test can kill -9 and restart on
the same port and data folder, and polling of the standard gRPC health statuses with the time it took."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import free_port, wait_until

from cxr.stack.processes import log_tail
from cxr.stack.redis_config import redis_server_argv

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class DurableRedis:
    """redis-server on loopback with the production settings, data and log in ``folder``. ``kill`` is kill -9 of
    this process only (started by this object); ``start`` again reuses the port and the append-only file."""

    def __init__(self, folder: Path, maxmemory: str = "256mb") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = folder / "redis.log"
        self.maxmemory = maxmemory
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> float:
        """Start and wait until it answers with its data loaded; returns the seconds that took."""
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed: apt-get install -y redis-server"
        argv = redis_server_argv(
            binary, port=self.port, host="127.0.0.1", data_dir=self.folder, maxmemory=self.maxmemory
        )
        started = time.monotonic()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        client = self.client(timeout_s=1.0)
        try:
            wait_until(lambda: self._answers(client), timeout_s, "redis-server to answer with its data loaded", 0.02)
        finally:
            client.close()
        return time.monotonic() - started

    def _answers(self, client: redis.Redis) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"redis-server exited ({self.proc.returncode}):\n{log_tail(self.log)}")
        try:
            return bool(client.ping())  # LOADING (replaying the AOF) raises BusyLoadingError, a ConnectionError
        except (redis.ConnectionError, redis.TimeoutError):
            return False

    def client(self, timeout_s: float = 10.0) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    def kill(self) -> None:
        """kill -9 (no shutdown, no final fsync) and reap."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def health_status(channel: grpc.Channel, service: str = "") -> int | None:
    """The health status of ``service`` at the channel's server; None when the server does not answer."""
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    except grpc.RpcError:
        return None
    return int(reply.status)


def wait_health(channel: grpc.Channel, status: int, timeout_s: float, service: str = "") -> float:
    """Poll until the health of ``service`` is ``status``; return the seconds it took (fail after ``timeout_s``)."""
    started = time.monotonic()
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)  # type: ignore[arg-type]
    wait_until(lambda: health_status(channel, service) == status, timeout_s, f"health {service!r} {name}", 0.05)
    return time.monotonic() - started
