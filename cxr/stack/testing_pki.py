"""A throw-away certificate authority for tests of TLS and mutual TLS (never for a deployment): a CA, a server
certificate for ``localhost`` / ``127.0.0.1``, a client certificate signed by the CA, and a "rogue" client
certificate signed by another CA that the server does not trust. Made with the ``openssl`` command (P-256 keys,
valid 2 days)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "2"


@dataclass(frozen=True)
class TestPKI:
    """PEM files of the test certificates (keys unencrypted)."""

    __test__ = False  # not a pytest test class

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_cert: Path
    rogue_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", DAYS, "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip


def _leaf(folder: Path, name: str, ca: str, extensions: str) -> None:
    (folder / f"{name}.ext").write_text(extensions)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-out", f"{name}.pem", "-days", DAYS, "-extfile", f"{name}.ext", cwd=folder,
    )  # fmt: skip


def make_test_pki(folder: Path) -> TestPKI:
    """Write the CA, server, client and rogue certificates into ``folder``. Raises CalledProcessError when
    openssl fails, FileNotFoundError when it is not installed."""
    folder.mkdir(parents=True, exist_ok=True)
    _ca(folder, "test-ca")
    _ca(folder, "rogue-ca")
    server_ext = "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    client_ext = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"
    _leaf(folder, "server", "test-ca", server_ext)
    _leaf(folder, "client", "test-ca", client_ext)
    _leaf(folder, "rogue", "rogue-ca", client_ext)
    return TestPKI(
        ca=folder / "test-ca.pem", server_cert=folder / "server.pem", server_key=folder / "server.key",
        client_cert=folder / "client.pem", client_key=folder / "client.key", rogue_ca=folder / "rogue-ca.pem",
        rogue_cert=folder / "rogue.pem", rogue_key=folder / "rogue.key",
    )  # fmt: skip
