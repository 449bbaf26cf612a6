"""Typed settings of the ingestion service, read once at start (CLI > environment > default).

Every value is parsed and checked here; a bad value stops the service before it binds a port
(``SettingsError`` lists every problem at once).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cxr.core import env_settings
from cxr.core.env_settings import Setting, non_negative, positive
from cxr.core.env_settings import host_name as _host
from cxr.core.env_settings import port_number as _port
from cxr.core.env_settings import positive_float as _positive_float
from cxr.core.env_settings import redis_url as _redis_url

MIB = 1024 * 1024
LATERAL_POLICIES = ("reject", "warn")


class SettingsError(ValueError):
    """One or more settings are missing or invalid; the message names each variable and its problem."""


@dataclass(frozen=True)
class IngestionSettings:
    """Everything the ingestion service needs to start. Field docs name the environment variable."""

    addr: str = "127.0.0.1:50151"  # CXR_INGESTION_ADDR, host:port of the gRPC server (port 0 = any free port)
    metrics_port: int = 9151  # CXR_INGESTION_METRICS_PORT (0 = no metrics endpoint)
    metrics_host: str = "127.0.0.1"  # CXR_INGESTION_METRICS_HOST: loopback, or the internal network's address
    redis_url: str = "redis://127.0.0.1:6390/0"  # CXR_REDIS_URL: result store and Celery broker
    torchserve_grpc: str = "127.0.0.1:7470"  # CXR_TORCHSERVE_GRPC: TorchServe's gRPC inference API
    torchserve_model: str = "cxr"  # CXR_TORCHSERVE_MODEL
    torchserve_token_file: Path | None = None  # CXR_TORCHSERVE_TOKEN_FILE: TorchServe's key_file.json
    model_dir: Path = Path("model_store/cxr-nih14-imagenet")  # CXR_MODEL_DIR: ensemble dir with manifest.json
    max_upload_bytes: int = 64 * MIB  # CXR_MAX_UPLOAD_BYTES
    max_concurrent: int = 8  # CXR_MAX_CONCURRENT: in-flight Analyze calls; more are rejected (OVERLOADED)
    lateral_policy: str = "reject"  # CXR_LATERAL_POLICY: reject | warn
    result_ttl_s: int = 86400  # CXR_RESULT_TTL_S: TTL of every Redis key written
    dicom_ttl_s: int = 3600  # CXR_DICOM_TTL_S: TTL of a queued job's uploaded DICOM (capped by the result TTL)
    inference_timeout_s: float = 30.0  # CXR_INFERENCE_TIMEOUT_S: deadline of one Analyze's inference, retries included
    inference_retries: int = 2  # CXR_INFERENCE_RETRIES: extra attempts when TorchServe is UNAVAILABLE
    grace_s: float = 10.0  # CXR_GRACE_S: graceful shutdown period
    startup_wait_s: float = 120.0  # CXR_STARTUP_WAIT_S: bounded wait for Redis and the served model at start
    watch_max_s: float = 900.0  # CXR_WATCH_MAX_S: longest WatchExplanation stream (when the client sets no deadline)
    upload_idle_s: float = 30.0  # CXR_UPLOAD_IDLE_S: an Analyze upload silent this long is cut (UPLOAD_IDLE_TIMEOUT)
    health_interval_s: float = 5.0  # CXR_HEALTH_INTERVAL_S: period of the dependency checks behind gRPC health
    health_timeout_s: float = 5.0  # CXR_HEALTH_TIMEOUT_S: bound on one TorchServe probe of those checks
    tls_cert: Path | None = None  # CXR_TLS_CERT: PEM server certificate (chain); with tls_key, the API speaks TLS
    tls_key: Path | None = None  # CXR_TLS_KEY: PEM private key of tls_cert
    tls_client_ca: Path | None = None  # CXR_TLS_CLIENT_CA: PEM CA(s); when set, clients need a certificate (mTLS)

    @property
    def host(self) -> str:
        """Host part of ``addr`` (brackets of an IPv6 literal removed)."""
        return split_host_port(self.addr)[0].strip("[]")

    @property
    def tls(self) -> bool:
        """True when the API is served over TLS (a certificate and its key are configured)."""
        return self.tls_cert is not None and self.tls_key is not None


def split_host_port(value: str) -> tuple[str, int]:
    """'host:port' -> (host, port). Raises ValueError when either part is missing or the port is out of range."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {value!r}")
    return host, _port(port_text)


def _address(value: str) -> str:
    split_host_port(value)
    return value


def _redacted(raw: str) -> str:
    """A setting's raw text with any URL credentials (``//user:password@``) masked, for error messages."""
    return re.sub(r"//[^/@]*@", "//***@", raw)


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _lateral(value: str) -> str:
    if value not in LATERAL_POLICIES:
        raise ValueError(f"must be one of {LATERAL_POLICIES}, got {value!r}")
    return value


def _model_dir(value: str) -> Path:
    path = Path(value)
    if not (path / "manifest.json").is_file():
        raise ValueError(f"{value} has no manifest.json")
    return path


def _optional_path(value: str) -> Path | None:
    return Path(value) if value.strip() else None


def _pem_file(value: str) -> Path | None:
    """An optional PEM file that must be readable now (a TLS setting: fail at start, not at the first call)."""
    path = _optional_path(value)
    if path is None:
        return None
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {value}: {e.strerror}") from None
    if b"-----BEGIN " not in text:
        raise ValueError(f"{value} is not a PEM file")
    return path


_SPECS: tuple[Setting, ...] = (
    Setting("addr", "CXR_INGESTION_ADDR", _address, "gRPC listen address host:port"),
    Setting("metrics_port", "CXR_INGESTION_METRICS_PORT", _port, "Prometheus port (0 = off)"),
    Setting("redis_url", "CXR_REDIS_URL", _redis_url, "Redis URL (results, jobs, Celery broker)"),
    Setting("torchserve_grpc", "CXR_TORCHSERVE_GRPC", _address, "TorchServe gRPC inference address"),
    Setting("torchserve_model", "CXR_TORCHSERVE_MODEL", _non_empty, "model name registered in TorchServe"),
    Setting("torchserve_token_file", "CXR_TORCHSERVE_TOKEN_FILE", _optional_path, "TorchServe key_file.json"),
    Setting("model_dir", "CXR_MODEL_DIR", _model_dir, "ensemble directory (manifest.json)"),
    Setting("max_upload_bytes", "CXR_MAX_UPLOAD_BYTES", positive(int), "largest accepted DICOM upload"),
    Setting("max_concurrent", "CXR_MAX_CONCURRENT", positive(int), "in-flight Analyze calls"),
    Setting("lateral_policy", "CXR_LATERAL_POLICY", _lateral, "reject | warn"),
    Setting("result_ttl_s", "CXR_RESULT_TTL_S", positive(int), "TTL of stored results and jobs (s)"),
    Setting("dicom_ttl_s", "CXR_DICOM_TTL_S", positive(int), "TTL of a queued job's uploaded DICOM (s)"),
    Setting("inference_timeout_s", "CXR_INFERENCE_TIMEOUT_S", _positive_float, "inference deadline (s)"),
    Setting("inference_retries", "CXR_INFERENCE_RETRIES", non_negative(int), "retries when TorchServe is down"),
    Setting("grace_s", "CXR_GRACE_S", _positive_float, "graceful shutdown period (s)"),
    Setting("startup_wait_s", "CXR_STARTUP_WAIT_S", _positive_float, "wait for dependencies at start (s)"),
    Setting("watch_max_s", "CXR_WATCH_MAX_S", _positive_float, "longest WatchExplanation stream (s)"),
    Setting("metrics_host", "CXR_INGESTION_METRICS_HOST", _host, "address the metrics endpoint binds"),
    Setting("upload_idle_s", "CXR_UPLOAD_IDLE_S", _positive_float, "cut an upload silent this long (s)"),
    Setting("health_interval_s", "CXR_HEALTH_INTERVAL_S", _positive_float, "dependency check period (s)"),
    Setting("health_timeout_s", "CXR_HEALTH_TIMEOUT_S", _positive_float, "TorchServe health probe bound (s)"),
    Setting("tls_cert", "CXR_TLS_CERT", _pem_file, "PEM server certificate (TLS on with --tls-key)"),
    Setting("tls_key", "CXR_TLS_KEY", _pem_file, "PEM private key of the server certificate"),
    Setting("tls_client_ca", "CXR_TLS_CLIENT_CA", _pem_file, "PEM CA bundle: require client certificates"),
)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m services.ingestion``; every flag overrides its environment variable."""
    return env_settings.build_parser(
        "python -m services.ingestion", "cxr ingestion gRPC service (research software: NOT FOR CLINICAL USE)", _SPECS
    )


def _raw_value(spec: Setting, cli: Mapping[str, Any], env: Mapping[str, str]) -> str | None:
    """The text given for one setting (CLI first, then environment); the model directory's default is checked
    like a given value because the service cannot start without it."""
    raw = cli.get(spec.name)
    raw = env.get(spec.env) if raw is None else raw
    if raw is None and spec.name == "model_dir":
        raw = str(IngestionSettings.model_dir)
    return raw


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> IngestionSettings:
    """Read the settings: CLI ``argv`` > ``environ`` (default ``os.environ``) > defaults.

    Raises SettingsError naming every invalid value; argparse exits (status 2) on an unknown flag.
    """
    env = os.environ if environ is None else environ
    cli = vars(build_parser().parse_args([] if argv is None else list(argv)))
    defaults = {f.name: f.default for f in fields(IngestionSettings)}
    values: dict[str, Any] = {}
    problems: list[str] = []
    for spec in _SPECS:
        raw = _raw_value(spec, cli, env)
        if raw is None:
            values[spec.name] = defaults[spec.name]
            continue
        try:
            values[spec.name] = spec.parse(raw)
        except ValueError as e:
            problems.append(f"{spec.env}={_redacted(raw)!r}: {e}")
    problems = problems or _tls_problems(values)  # (an unreadable file is reported once, above)
    if problems:
        raise SettingsError("invalid settings: " + "; ".join(problems))
    return IngestionSettings(**values)


def _tls_problems(values: Mapping[str, Any]) -> list[str]:
    """TLS needs both the certificate and its key; mutual TLS needs TLS."""
    cert, key, client_ca = values.get("tls_cert"), values.get("tls_key"), values.get("tls_client_ca")
    if (cert is None) != (key is None):
        return ["CXR_TLS_CERT and CXR_TLS_KEY must be given together"]
    if client_ca is not None and cert is None:
        return ["CXR_TLS_CLIENT_CA (mutual TLS) needs CXR_TLS_CERT and CXR_TLS_KEY"]
    return []
