"""Client side of the ingestion API's TLS: which certificates a client uses, and the channel built from them.

Shared by ``cxr.client``, ``cxr analyze`` and the stack's health probe. Settings (command-line flags override):

=========================== ================================================================================
variable                    what
=========================== ================================================================================
CXR_TLS_CA                  PEM CA bundle that signed the server's certificate: TLS on
CXR_TLS_CLIENT_CERT         PEM client certificate, for a server that requires one (mutual TLS)
CXR_TLS_CLIENT_KEY          PEM private key of the client certificate
CXR_TLS_SERVER_NAME         the name to check the server's certificate against, when the address differs
=========================== ================================================================================

Without any of them the channel is plaintext (the local stack's default). Research software: NOT FOR CLINICAL USE.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

ENV = {
    "ca": "CXR_TLS_CA",
    "cert": "CXR_TLS_CLIENT_CERT",
    "key": "CXR_TLS_CLIENT_KEY",
    "server_name": "CXR_TLS_SERVER_NAME",
}


class TlsConfigError(ValueError):
    """Client TLS settings that cannot be used (a certificate without its key, an unreadable file)."""


@dataclass(frozen=True)
class ClientTLS:
    """TLS of a client channel. ``ca`` None: the system's trusted roots. ``cert``/``key``: a client
    certificate for mutual TLS. ``server_name``: overrides the host name the server certificate is checked for."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise TlsConfigError("a client certificate and its key must be given together")

    @classmethod
    def from_values(
        cls, *, ca: str | None = None, cert: str | None = None, key: str | None = None, server_name: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> ClientTLS | None:  # fmt: skip
        """Given values (e.g. command-line flags) over the ``CXR_TLS_*`` environment; None when nothing asks for
        TLS. Raises TlsConfigError for a certificate without its key."""
        env = os.environ if env is None else env
        given = {"ca": ca, "cert": cert, "key": key, "server_name": server_name}
        values = {name: given[name] or env.get(var, "").strip() or None for name, var in ENV.items()}
        if not any(values.values()):
            return None
        paths = {name: Path(values[name]) if values[name] else None for name in ("ca", "cert", "key")}  # type: ignore[arg-type]
        return cls(**paths, server_name=values["server_name"])

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials. Raises TlsConfigError when a file cannot be read."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca), private_key=_read(self.key), certificate_chain=_read(self.cert)
        )


def stack_probe_tls(env: Mapping[str, str] | None = None) -> ClientTLS | None:
    """How the local stack's own health probe reaches an ingestion service started with ``env``: plaintext
    unless ``CXR_TLS_CERT`` (the server's TLS) is set; then the CA is ``CXR_TLS_CA`` or, for a self-signed server
    certificate, that certificate itself, and ``CXR_TLS_CLIENT_CERT`` / ``_KEY`` answer a mutual-TLS server.
    Raises TlsConfigError for a client certificate without its key."""
    env = os.environ if env is None else env
    server_cert = env.get("CXR_TLS_CERT", "").strip()
    if not server_cert:
        return None
    return ClientTLS.from_values(ca=env.get("CXR_TLS_CA", "").strip() or server_cert, env=env)


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as e:
        raise TlsConfigError(f"cannot read {path}: {e.strerror}") from None


def make_channel(address: str, tls: ClientTLS | None, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to ``address``: plaintext when ``tls`` is None, else TLS with its certificates."""
    opts = list(options)
    if tls is None:
        return grpc.insecure_channel(address, options=opts)
    if tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(address, tls.credentials(), options=opts)
