"""Real DICOM peers as plain processes on free loopback ports, for tests and benchmarks (never for a deployment):
Orthanc (Debian package ``orthanc``: a real PACS with a REST API) and dcmtk's ``storescp`` (a Storage SCP that
writes what it receives to a folder). Each is started in its own folder and stopped by its ``stop``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr.stack.processes import free_ports, log_tail

ORTHANC_BINARY = "Orthanc"


class PeerError(RuntimeError):
    """A peer could not be started, or its REST API answered with an error."""


@dataclass
class Orthanc:
    """A running Orthanc. ``modalities``: the DICOM peers it knows, {name: (AE title, host, port)}."""

    folder: Path
    http_port: int
    dicom_port: int
    ae_title: str
    proc: subprocess.Popen[bytes]
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def rest(self, path: str, body: Any = None, *, method: str | None = None, timeout_s: float = 120) -> Any:
        """Call the REST API; ``body`` is sent as JSON (or raw when bytes). Returns the decoded JSON answer.
        Raises PeerError with Orthanc's message for an HTTP error."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method or ("POST" if data else "GET"))
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as reply:
                raw = reply.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise PeerError(f"Orthanc {request.method} {path}: HTTP {e.code} {detail}") from None
        return json.loads(raw) if raw.strip() else None

    def upload(self, dicom: bytes) -> dict[str, Any]:
        """POST /instances: store a DICOM file in Orthanc. Returns Orthanc's answer (ID, ParentStudy, ...)."""
        answer: dict[str, Any] = self.rest("/instances", dicom)
        return answer

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        """The instance's tags by keyword (``?simplify``)."""
        tags: dict[str, Any] = self.rest(f"/instances/{orthanc_id}/tags?simplify")
        return tags

    def instance_file(self, orthanc_id: str) -> bytes:
        request = urllib.request.Request(f"{self.url}/instances/{orthanc_id}/file")
        with urllib.request.urlopen(request, timeout=60) as reply:
            return bytes(reply.read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def log_tail(self) -> str:
        return log_tail(self.folder / "orthanc.log")


def start_orthanc(
    folder: Path, *, ae_title: str = "ORTHANC", modalities: dict[str, tuple[str, str, int]] | None = None,
    timeout_s: float = 60.0,
) -> Orthanc:  # fmt: skip
    """Start Orthanc with its storage in ``folder`` on free loopback ports, no authentication, no plugins; return
    once its REST API answers. Raises PeerError when it is not installed or does not come up."""
    binary = shutil.which(ORTHANC_BINARY) or (f"/usr/sbin/{ORTHANC_BINARY}" if Path("/usr/sbin/Orthanc").exists()
                                              else None)  # fmt: skip
    if binary is None:
        raise PeerError("Orthanc is not installed (Debian/Ubuntu: apt-get install -y orthanc)")
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_ports(2)
    known = dict(modalities or {})
    config = {
        "Name": "cxr-test-pacs", "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
        "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": ae_title, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "Plugins": [], "HttpServerEnabled": True, "DicomServerEnabled": True,
        "DicomModalities": {name: list(peer) for name, peer in known.items()}, "DicomScuTimeout": 120,
        "DicomAssociationCloseDelay": 0, "StorageCompression": False, "ConcurrentJobs": 2,
    }  # fmt: skip
    (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
    with open(folder / "orthanc.log", "ab") as log:
        proc = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    orthanc = Orthanc(folder, http_port, dicom_port, ae_title, proc, known)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PeerError(f"Orthanc exited with {proc.returncode}:\n{orthanc.log_tail()}")
        try:
            orthanc.rest("/system", timeout_s=2)
            return orthanc
        except (OSError, PeerError):
            time.sleep(0.2)
    orthanc.stop()
    raise PeerError(f"Orthanc did not answer within {timeout_s:g} s:\n{orthanc.log_tail()}")


@dataclass
class StoreSCP:
    """A running dcmtk ``storescp`` writing every received instance into ``folder``."""

    folder: Path
    port: int
    ae_title: str
    proc: subprocess.Popen[bytes]
    log: Path

    def received(self) -> list[Path]:
        """The files received so far (dcmtk names them <modality>.<SOP Instance UID>)."""
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def start_storescp(folder: Path, *, ae_title: str = "STORESCP", port: int | None = None) -> StoreSCP:
    """Start ``storescp`` on loopback ``port`` (default: a free one), accepting every transfer syntax, files into
    ``folder``; return once it accepts connections. Raises PeerError when dcmtk is missing or it fails."""
    binary = shutil.which("storescp")
    if binary is None:
        raise PeerError("dcmtk is not installed (Debian/Ubuntu: apt-get install -y dcmtk)")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_ports(1)[0] if port is None else port
    log = folder.parent / f"storescp-{port}.log"
    argv = [binary, "--aetitle", ae_title, "--output-directory", str(folder), "+xa", str(port)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    scp = StoreSCP(folder, port, ae_title, proc, log)
    from cxr.stack.dicom_probe import dicom_echo

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PeerError(f"storescp exited with {proc.returncode}:\n{log_tail(log)}")
        if dicom_echo(f"127.0.0.1:{port}", ae_title, timeout_s=1):
            return scp
        time.sleep(0.1)
    scp.stop()
    raise PeerError(f"storescp did not answer a C-ECHO within 20 s:\n{log_tail(log)}")
