"""Typed settings of the DICOM front door (Storage SCP + results sender), read once at start
(CLI > environment > default). Standard library only: ``python -m services.dicom`` reads them before pynetdicom.

The calling-AE allow-list (``CXR_DICOM_ALLOWED_AETS``): a comma-separated list of AE titles, or ``*`` for any.
The default ``*`` is only accepted while the SCP listens on a loopback address (the local stack: a plain
``storescu 127.0.0.1 11112 file.dcm`` from this host gets in); listening on any other address requires an
explicit list, so a hospital deployment always names its PACS and modality routers.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cxr.core import env_settings
from cxr.core.env_settings import Setting, positive
from cxr.core.env_settings import host_name as _host
from cxr.core.env_settings import port_number as _port
from cxr.core.env_settings import positive_float as _positive_float
from cxr.core.env_settings import redis_url as _redis_url

MIB = 1024 * 1024
ANY_AE = "*"
DEFAULT_PORT = 11112  # the registered unprivileged DICOM port; 104 needs root
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: 16 chars, no backslash, no control chars


class SettingsError(ValueError):
    """One or more settings are missing or invalid; the message names each variable and its problem."""


@dataclass(frozen=True)
class Destination:
    """Where results go by C-STORE: the peer's AE title, host and port."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class DicomSettings:
    """Everything the DICOM front door needs. Field comments name the environment variable."""

    addr: str = f"127.0.0.1:{DEFAULT_PORT}"  # CXR_DICOM_ADDR: host:port of the Storage SCP (port 0 = any free)
    ae_title: str = "CXR"  # CXR_DICOM_AE_TITLE: our AE title (the SCP answers to any called AE title)
    allowed_aets: tuple[str, ...] = (ANY_AE,)  # CXR_DICOM_ALLOWED_AETS: calling AE titles let in, or "*"
    ingestion_addr: str = "127.0.0.1:50151"  # CXR_DICOM_INGESTION_ADDR: the gRPC API every instance goes through
    redis_url: str = "redis://127.0.0.1:6390/0"  # CXR_REDIS_URL: the durable results outbox
    metrics_port: int = 9153  # CXR_DICOM_METRICS_PORT (0 = no metrics endpoint)
    metrics_host: str = "127.0.0.1"  # CXR_DICOM_METRICS_HOST
    max_associations: int = 8  # CXR_DICOM_MAX_ASSOCIATIONS: more are rejected (transient, local limit exceeded)
    max_concurrent: int = 4  # CXR_DICOM_MAX_CONCURRENT: instances analysed at once (others wait, bounded)
    max_upload_bytes: int = 64 * MIB  # CXR_MAX_UPLOAD_BYTES: the same cap as the gRPC API's
    analyze_timeout_s: float = 120.0  # CXR_DICOM_ANALYZE_TIMEOUT_S: deadline of one instance's Analyze call
    overload_wait_s: float = 10.0  # CXR_DICOM_OVERLOAD_WAIT_S: how long an instance waits for capacity
    acse_timeout_s: float = 30.0  # CXR_DICOM_ACSE_TIMEOUT_S: association negotiation / release
    dimse_timeout_s: float = 60.0  # CXR_DICOM_DIMSE_TIMEOUT_S: waiting for the next DIMSE message
    network_timeout_s: float = 60.0  # CXR_DICOM_NETWORK_TIMEOUT_S: a silent peer is dropped after this
    spool_dir: Path | None = None  # CXR_DICOM_SPOOL_DIR: where incoming instances are written (default: TMPDIR)
    destination: Destination | None = None  # CXR_DICOM_DESTINATION: AET@host:port for results ("" = none)
    send_retry_s: float = 5.0  # CXR_DICOM_SEND_RETRY_S: first retry delay; doubles per attempt
    send_retry_max_s: float = 600.0  # CXR_DICOM_SEND_RETRY_MAX_S: longest delay between two attempts
    send_max_attempts: int = 50  # CXR_DICOM_SEND_MAX_ATTEMPTS: then the delivery is dead-lettered
    explanation_wait_s: float = 900.0  # CXR_DICOM_EXPLANATION_WAIT_S: then results go without heatmaps
    delivery_ttl_s: int = 7 * 86400  # CXR_DICOM_DELIVERY_TTL_S: how long a pending delivery is kept in Redis
    outbox_max: int = 10000  # CXR_DICOM_OUTBOX_MAX: pending deliveries; beyond, new instances are refused
    grace_s: float = 10.0  # CXR_GRACE_S: graceful shutdown period
    startup_wait_s: float = 120.0  # CXR_STARTUP_WAIT_S: bounded wait for Redis and the ingestion API

    @property
    def host(self) -> str:
        """Host part of ``addr``."""
        return split_host_port(self.addr)[0]

    @property
    def port(self) -> int:
        """Port part of ``addr``."""
        return split_host_port(self.addr)[1]

    @property
    def any_calling_ae(self) -> bool:
        """True when every calling AE title is let in."""
        return ANY_AE in self.allowed_aets


def split_host_port(value: str) -> tuple[str, int]:
    """'host:port' -> (host, port). Raises ValueError when a part is missing or the port is out of range."""
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {value!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} outside 0..65535")
    return host, port


def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback IP addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ae_title(value: str) -> str:
    """A valid AE title (1-16 characters of the default repertoire, no backslash), surrounding spaces removed.
    Raises ValueError otherwise."""
    title = value.strip()
    if not _AE_TITLE.match(title):
        raise ValueError(f"not a valid AE title (1-16 printable characters, no backslash): {value!r}")
    return title


def _ae_list(value: str) -> tuple[str, ...]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise ValueError("needs at least one AE title, or * for any")
    return tuple(item if item == ANY_AE else ae_title(item) for item in items)


def _destination(value: str) -> Destination | None:
    if not value.strip():
        return None
    title, sep, address = value.strip().partition("@")
    if not sep:
        raise ValueError(f"expected AET@host:port, got {value!r}")
    host, port = split_host_port(address)
    if port == 0:
        raise ValueError("the destination port must not be 0")
    return Destination(ae_title(title), host, port)


def _address(value: str) -> str:
    split_host_port(value)
    return value


def _directory(value: str) -> Path | None:
    if not value.strip():
        return None
    path = Path(value)
    if not path.is_dir():
        raise ValueError(f"{value} is not a directory")
    return path


_SPECS: tuple[Setting, ...] = (
    Setting("addr", "CXR_DICOM_ADDR", _address, "Storage SCP listen address host:port"),
    Setting("ae_title", "CXR_DICOM_AE_TITLE", ae_title, "our AE title"),
    Setting("allowed_aets", "CXR_DICOM_ALLOWED_AETS", _ae_list, "calling AE titles let in (comma list, * = any)"),
    Setting("ingestion_addr", "CXR_DICOM_INGESTION_ADDR", _address, "ingestion gRPC API host:port"),
    Setting("redis_url", "CXR_REDIS_URL", _redis_url, "Redis URL (results outbox)"),
    Setting("metrics_port", "CXR_DICOM_METRICS_PORT", _port, "Prometheus port (0 = off)"),
    Setting("metrics_host", "CXR_DICOM_METRICS_HOST", _host, "address the metrics endpoint binds"),
    Setting("max_associations", "CXR_DICOM_MAX_ASSOCIATIONS", positive(int), "concurrent associations"),
    Setting("max_concurrent", "CXR_DICOM_MAX_CONCURRENT", positive(int), "instances analysed at once"),
    Setting("max_upload_bytes", "CXR_MAX_UPLOAD_BYTES", positive(int), "largest accepted instance (bytes)"),
    Setting("analyze_timeout_s", "CXR_DICOM_ANALYZE_TIMEOUT_S", _positive_float, "Analyze deadline (s)"),
    Setting("overload_wait_s", "CXR_DICOM_OVERLOAD_WAIT_S", _positive_float, "wait for capacity (s)"),
    Setting("acse_timeout_s", "CXR_DICOM_ACSE_TIMEOUT_S", _positive_float, "ACSE timeout (s)"),
    Setting("dimse_timeout_s", "CXR_DICOM_DIMSE_TIMEOUT_S", _positive_float, "DIMSE timeout (s)"),
    Setting("network_timeout_s", "CXR_DICOM_NETWORK_TIMEOUT_S", _positive_float, "idle network timeout (s)"),
    Setting("spool_dir", "CXR_DICOM_SPOOL_DIR", _directory, "folder for incoming instances"),
    Setting("destination", "CXR_DICOM_DESTINATION", _destination, "results destination AET@host:port"),
    Setting("send_retry_s", "CXR_DICOM_SEND_RETRY_S", _positive_float, "first retry delay (s)"),
    Setting("send_retry_max_s", "CXR_DICOM_SEND_RETRY_MAX_S", _positive_float, "longest retry delay (s)"),
    Setting("send_max_attempts", "CXR_DICOM_SEND_MAX_ATTEMPTS", positive(int), "attempts before dead-letter"),
    Setting("explanation_wait_s", "CXR_DICOM_EXPLANATION_WAIT_S", _positive_float, "wait for heatmaps (s)"),
    Setting("delivery_ttl_s", "CXR_DICOM_DELIVERY_TTL_S", positive(int), "pending delivery lifetime (s)"),
    Setting("outbox_max", "CXR_DICOM_OUTBOX_MAX", positive(int), "pending deliveries before refusing"),
    Setting("grace_s", "CXR_GRACE_S", _positive_float, "graceful shutdown period (s)"),
    Setting("startup_wait_s", "CXR_STARTUP_WAIT_S", _positive_float, "wait for dependencies at start (s)"),
)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m services.dicom``; every flag overrides its environment variable."""
    return env_settings.build_parser(
        "python -m services.dicom",
        "cxr DICOM front door: Storage SCP and results sender (research software: NOT FOR CLINICAL USE)",
        _SPECS,
    )


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> DicomSettings:
    """Read the settings: CLI ``argv`` > ``environ`` (default ``os.environ``) > defaults.

    Raises SettingsError naming every invalid value; argparse exits (status 2) on an unknown flag.
    """
    env = os.environ if environ is None else environ
    cli = vars(build_parser().parse_args([] if argv is None else list(argv)))
    values: dict[str, Any] = {f.name: f.default for f in fields(DicomSettings)}
    problems: list[str] = []
    for spec in _SPECS:
        raw = cli.get(spec.name)
        raw = env.get(spec.env) if raw is None else raw
        if raw is None:
            continue
        try:
            values[spec.name] = spec.parse(raw)
        except ValueError as e:
            problems.append(f"{spec.env}={re.sub(r'//[^/@]*@', '//***@', raw)!r}: {e}")
    if not problems:
        problems = _consistency_problems(values)
    if problems:
        raise SettingsError("invalid settings: " + "; ".join(problems))
    return DicomSettings(**values)


def _consistency_problems(values: Mapping[str, Any]) -> list[str]:
    problems = []
    host = split_host_port(values["addr"])[0]
    if ANY_AE in values["allowed_aets"] and not is_loopback(host):
        problems.append(
            f"CXR_DICOM_ADDR listens on {host}, beyond loopback: CXR_DICOM_ALLOWED_AETS must name the calling AE "
            "titles to let in (the default * is only for a loopback listener)"
        )
    if values["send_retry_s"] > values["send_retry_max_s"]:
        problems.append("CXR_DICOM_SEND_RETRY_S must not exceed CXR_DICOM_SEND_RETRY_MAX_S")
    return problems
