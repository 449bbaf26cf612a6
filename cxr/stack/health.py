"""Readiness probes of the stack's services. Each answers True/False quickly and never raises for a service
that is down (a probe is asked "are you ready?", not "why not?")."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)


def redis_ready(url: str, timeout_s: float = 1.0) -> bool:
    """True if the Redis server at ``url`` answers PING."""
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def grpc_serving(address: str, timeout_s: float = 2.0, service: str = "") -> bool:
    """True if the standard gRPC health check at ``address`` says SERVING for ``service`` ("" = the server)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def file_exists(path: Path) -> bool:
    """True if the ready file a service touches exists."""
    return path.is_file()


def torchserve_model_ready(management_port: int, model: str, token_file: Path | None, timeout_s: float = 2.0) -> bool:
    """True if TorchServe's management API reports at least one READY worker for ``model``.

    ``token_file`` is TorchServe's key_file.json; None or a missing file means no token is sent."""
    request = urllib.request.Request(f"http://127.0.0.1:{management_port}/models/{model}")
    token = management_token(token_file)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            described = json.loads(reply.read())
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return any(w.get("status") == "READY" for entry in described for w in entry.get("workers", []))


def management_token(token_file: Path | None) -> str | None:
    """The management key from TorchServe's key_file.json, or None if there is no readable file."""
    if token_file is None:
        return None
    try:
        keys = json.loads(token_file.read_text())
        return str(keys["management"]["key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
