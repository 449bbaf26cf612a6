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

from cxr.tls import ClientTLS, make_channel

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


def grpc_serving(address: str, timeout_s: float = 2.0, service: str = "", tls: ClientTLS | None = None) -> bool:
    """True if the standard gRPC health check at ``address`` says SERVING for ``service`` ("" = the server).
    ``tls``: the certificates for a TLS / mutual-TLS server (None: plaintext)."""
    return grpc_health_statuses(address, [service], timeout_s, tls).get(service) == "SERVING"


def grpc_health_statuses(
    address: str, services: list[str], timeout_s: float = 2.0, tls: ClientTLS | None = None
) -> dict[str, str]:
    """{service: "SERVING" | "NOT_SERVING" | "SERVICE_UNKNOWN" | ...} from the gRPC health check at ``address``
    for each of ``services``; {} when the server does not answer (or the TLS files cannot be read)."""
    statuses: dict[str, str] = {}
    try:
        channel = make_channel(address, tls)
    except ValueError:  # cxr.tls.TlsConfigError: an unreadable certificate
        return statuses
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in services:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
            except grpc.RpcError as e:
                if e.code() is grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                    statuses[service] = "SERVICE_UNKNOWN"
                    continue
                return {}
            statuses[service] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return statuses


def file_exists(path: Path) -> bool:
    """True if the ready file a service touches exists."""
    return path.is_file()


def torchserve_model_ready(
    management_port: int, model: str, token_file: Path | str | None, timeout_s: float = 2.0
) -> bool:
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


def management_token(token_file: Path | str | None) -> str | None:
    """The management key from TorchServe's key_file.json, or None if there is no readable file."""
    if token_file is None:
        return None
    try:
        keys = json.loads(Path(token_file).read_text())
        return str(keys["management"]["key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
