"""Start, probe and stop one TorchServe 0.12 instance with its own home folder.

Why it looks like this (see /work/shared/STACK-NOTES.md, "TorchServe 0.12"):
- A port already in use fails silently (``--start`` exits 0 and the new Java process quits), so every port is
  checked first and the Java process is watched while waiting for readiness.
- Logs, metrics logs, the pid file, unpacked archives and worker sockets go to per-instance folders
  (LOG_LOCATION, METRICS_LOCATION, TEMP, TMPDIR), and the process runs in ``home`` so that ``key_file.json``
  lands there too. Two instances never share anything.
- The worker must run the project's Python (``cxr`` importable, PyYAML present): the launcher is started with
  ``settings.python -m ts.model_server``, which hands that same interpreter to the frontend (``--python``), and
  ``python=`` is also written to config.properties.
- Ready means the management API reports a READY worker for the model, never ``/ping``.

Token authorisation is ON by default, and TorchServe 0.12 applies it to gRPC too: its interceptor
(``org.pytorch.serve.grpcimpl.GRPCInterceptor``) reads the metadata key ``authorization`` with value
``Bearer <key>`` (the inference key for the inference service, the management key for the management service)
and answers ``PERMISSION_DENIED`` ("Token Authorization failed...") when it is missing or wrong; the
integration test checks both. gRPC clients can pass the token, so the stack keeps authorisation on: ingestion
reads ``inference_token()`` and sends ``[("authorization", f"Bearer {token}")]`` with every call (re-read it
after a TorchServe restart: every start makes new keys). The metrics endpoint takes no token (loopback only).
TorchServe's keys expire after ``token_expiration_min``; its default (60 min) would break a long-running stack,
so the settings raise it (a year) instead of making every client rotate keys.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from cxr.core.errors import Category, CxrError
from cxr.serving.torchserve_config import METRICS_YAML, TorchServeSettings, render_config

__all__ = ["PortInUseError", "TorchServe", "TorchServeError", "TorchServeSettings", "ensure_ports_free"]

logger = logging.getLogger(__name__)

JAVA_MAIN = "org.pytorch.serve.ModelServer"
PID_FILE = ".model_server.pid"  # written by ts.model_server into $TMPDIR
LOG_FILES = ("torchserve.out", "ts_log.log", "model_log.log")
MAX_SOCKET_DIR = 80  # AF_UNIX paths are limited to 107 bytes; worker sockets are <tmp>/.ts.sock.<port>


class TorchServeError(CxrError):
    """TorchServe could not be started, did not become ready, or could not be stopped."""

    category = Category.UNAVAILABLE
    reason = "TORCHSERVE_FAILED"


class PortInUseError(TorchServeError):
    reason = "PORT_IN_USE"


def ensure_ports_free(host: str, ports: Sequence[int]) -> None:
    """Raise PortInUseError naming the first port of ``ports`` that cannot be bound on ``host`` (or a duplicate)."""
    if len(set(ports)) != len(ports):
        raise PortInUseError(f"ports must be distinct, got {list(ports)}")
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine; a listener is not
            try:
                s.bind((host, port))
            except OSError as e:
                raise PortInUseError(f"port {host}:{port} is already in use ({e.strerror})") from e


def _read_token(key_file: Path, kind: str) -> str | None:
    try:
        return str(json.loads(key_file.read_text())[kind]["key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _java_alive(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and JAVA_MAIN in proc.cmdline()
    except psutil.Error:
        return False


class TorchServe:
    """One TorchServe instance: ``start(models)``, ``wait_ready(name)``, ``stop()``.

    A fresh object built from the same settings controls an instance started by another process (the pid
    file lives in ``home/tmp``), which is what ``cxr up`` / ``cxr down`` need.
    """

    def __init__(self, settings: TorchServeSettings) -> None:
        self.settings = settings
        self._launcher: subprocess.Popen[bytes] | None = None

    # -- addresses ---------------------------------------------------------------------------------
    @property
    def grpc_inference_address(self) -> str:
        return f"{self.settings.bind_host}:{self.settings.grpc_inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://{self.settings.bind_host}:{self.settings.management_port}"

    @property
    def inference_url(self) -> str:
        return f"http://{self.settings.bind_host}:{self.settings.inference_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.settings.bind_host}:{self.settings.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        """pid of the running Java frontend, or None when it is not running."""
        try:
            pid = int((self.settings.tmp_dir / PID_FILE).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _java_alive(pid) else None

    def inference_token(self) -> str | None:
        """The inference key from key_file.json (None when token auth is off or the file is not there yet)."""
        return _read_token(self.settings.key_file, "inference") if self.settings.token_auth else None

    def management_token(self) -> str | None:
        return _read_token(self.settings.key_file, "management") if self.settings.token_auth else None

    # -- start -------------------------------------------------------------------------------------
    def start(self, models: dict[str, str]) -> None:
        """Write config.properties and launch TorchServe serving ``models`` ({"cxr": "cxr.mar"}).

        Returns once the launcher runs; call ``wait_ready``. Raises PortInUseError if a port is taken,
        TorchServeError if this instance already runs, a model archive is missing or the Python cannot be run,
        ValueError for bad model names.
        """
        s = self.settings
        if self.pid is not None:
            raise TorchServeError(f"TorchServe of {s.home} already runs (pid {self.pid})")
        config = render_config(s, models)
        for mar in models.values():
            if not (s.model_store / mar).is_file():
                raise TorchServeError(f"model archive {mar} not found in {s.model_store}")
        ensure_ports_free(s.bind_host, s.ports)
        self._prepare_home()
        s.config_path.write_text(config)
        s.metrics_config_path.write_text(METRICS_YAML)
        s.key_file.unlink(missing_ok=True)  # never hand out a previous instance's token
        self._launch()
        logger.info("TorchServe starting: home %s, gRPC inference %s", s.home, self.grpc_inference_address)

    def _prepare_home(self) -> None:
        s = self.settings
        for d in (s.home, s.logs_dir, s.metrics_dir, s.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        if len(str(s.tmp_dir)) > MAX_SOCKET_DIR:
            raise TorchServeError(f"home {s.home} is too deep: worker socket paths would exceed the AF_UNIX limit")

    def _environment(self) -> dict[str, str]:
        s = self.settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("TS_")}
        env.update(s.extra_env)
        env.update(
            LOG_LOCATION=str(s.logs_dir),
            METRICS_LOCATION=str(s.metrics_dir),
            TEMP=str(s.tmp_dir),
            TMPDIR=str(s.tmp_dir),
            TS_CONFIG_FILE=str(s.config_path),  # ts.model_server prefers it over --ts-config
        )
        return env

    def _launch(self) -> None:
        s = self.settings
        cmd = [s.python, "-m", "ts.model_server", "--start", "--foreground", "--ncs"]
        cmd += ["--ts-config", str(s.config_path), "--model-store", str(s.model_store)]
        if not s.token_auth:
            cmd.append("--disable-token-auth")
        with open(s.logs_dir / LOG_FILES[0], "ab") as out:
            try:
                self._launcher = subprocess.Popen(
                    cmd, cwd=s.home, env=self._environment(), stdout=out, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
            except OSError as e:
                raise TorchServeError(f"cannot run TorchServe's launcher with {s.python}: {e}") from e

    # -- readiness ---------------------------------------------------------------------------------
    def describe_model(self, model_name: str) -> list[dict[str, Any]]:
        """GET management /models/<name> (with the management token). Raises urllib.error.URLError/HTTPError."""
        req = urllib.request.Request(f"{self.management_url}/models/{model_name}")
        token = self.management_token()
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=5) as resp:
            return list(json.loads(resp.read()))

    def wait_ready(self, model_name: str, timeout: float = 120.0) -> None:
        """Block until a worker of ``model_name`` is READY. Raises TorchServeError (with the log tail) when
        TorchServe exits, refuses the token, or is not ready within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self._launcher_exited() and self.pid is None:
                raise TorchServeError(f"TorchServe exited during start-up.\n{self.log_tail()}")
            if self.settings.token_auth and self.management_token() is None:
                last = "no key_file.json yet"
            else:
                last = self._probe(model_name)
                if last == "READY":
                    logger.info("TorchServe model %s is READY", model_name)
                    return
            time.sleep(0.5)
        raise TorchServeError(f"model {model_name} not READY after {timeout:.0f} s (last: {last}).\n{self.log_tail()}")

    def _probe(self, model_name: str) -> str:
        """One readiness probe -> "READY" or a short description of why not. Raises on a refused token."""
        try:
            described = self.describe_model(model_name)
        except urllib.error.HTTPError as e:
            if e.code in (400, 401, 403):
                raise TorchServeError(f"management API refused the token: HTTP {e.code}") from e
            return f"HTTP {e.code}"
        except (urllib.error.URLError, OSError, ValueError) as e:
            return f"not answering ({e})"
        statuses = [w.get("status") for d in described for w in d.get("workers", [])]
        return "READY" if "READY" in statuses else f"workers {statuses}"

    def _launcher_exited(self) -> bool:
        return self._launcher is not None and self._launcher.poll() is not None

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the launcher output, frontend log and model (worker) log."""
        parts = []
        for name in LOG_FILES:
            path = self.settings.logs_dir / name
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} ---\n" + "\n".join(text))
        return "\n".join(parts) or f"(no logs in {self.settings.logs_dir})"

    # -- stop --------------------------------------------------------------------------------------
    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the Java frontend (what ``torchserve --stop`` does) and wait until it and its workers are
        gone; SIGKILL what is left after ``timeout``. Idempotent. Removes key_file.json."""
        pid = self.pid
        if pid is not None:
            self._terminate(pid, timeout)
        if self._launcher is not None:
            try:
                self._launcher.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._launcher.kill()
                self._launcher.wait()
            self._launcher = None
        self.settings.key_file.unlink(missing_ok=True)
        (self.settings.tmp_dir / PID_FILE).unlink(missing_ok=True)

    def _terminate(self, pid: int, timeout: float) -> None:
        try:
            java = psutil.Process(pid)
            family = [java, *java.children(recursive=True)]
            java.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            return
        _, alive = psutil.wait_procs(family, timeout=timeout)
        for proc in alive:
            logger.warning("TorchServe process %d did not stop in %.0f s: killing it", proc.pid, timeout)
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        logger.info("TorchServe stopped (pid %d)", pid)
