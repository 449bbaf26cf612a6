"""Transport security of the ingestion API: TLS when a certificate and key are configured, mutual TLS when a
client CA is configured too (``CXR_TLS_CERT``, ``CXR_TLS_KEY``, ``CXR_TLS_CLIENT_CA``; docs/SECURITY.md).

With mutual TLS a client that shows no certificate, or one not signed by the client CA, fails the handshake:
its call ends UNAVAILABLE before any request reaches the service.
"""

from __future__ import annotations

import grpc

from services.ingestion.settings import IngestionSettings


def server_credentials(settings: IngestionSettings) -> grpc.ServerCredentials | None:
    """The server's TLS credentials, or None for plaintext (no certificate configured). Files are read now;
    OSError when one became unreadable since the settings were checked."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def describe(settings: IngestionSettings) -> str:
    """ "plaintext", "TLS" or "mutual TLS", for the log line that says how the API is served."""
    if not settings.tls:
        return "plaintext"
    return "mutual TLS" if settings.tls_client_ca is not None else "TLS"
