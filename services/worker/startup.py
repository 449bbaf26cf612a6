"""Start-up pieces of the worker that must not import torch: the process environment, the fail-fast bundle check
and readiness (a file a supervisor waits for, written once the worker consumes AND its children loaded the models).

Readiness works across the prefork pool through small marker files: each child writes ``<run_dir>/children/<pid>``
after loading the ensemble (``ok`` or the error); the parent, once Celery's ``worker_ready`` fired, waits (bounded)
for ``concurrency`` good markers, then writes the ready file atomically. A child that cannot load the models makes
the parent shut the worker down (exit status 3) instead of serving with a broken bundle.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cxr.core.manifest import Manifest, checked_weights_path, read_manifest

log = logging.getLogger(__name__)

EXIT_NOT_READY = 3


def prepare_environment(run_dir: Path) -> dict[str, str]:
    """Set, in this process only (children inherit it), what the worker's libraries need; returns what was set.

    ``PROMETHEUS_MULTIPROC_DIR``: a fresh folder unless set (then its stale ``*.db`` files are removed), and
    ``MPLCONFIGDIR`` (matplotlib comes with captum) unless set. Must run before prometheus_client is imported.
    """
    done: dict[str, str] = {}
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        done["PROMETHEUS_MULTIPROC_DIR"] = str(_fresh_dir(run_dir / "metrics"))
    else:
        for stale in _fresh_dir(Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])).glob("*.db"):
            stale.unlink()
    if not os.environ.get("MPLCONFIGDIR"):
        done["MPLCONFIGDIR"] = str(_fresh_dir(run_dir / "matplotlib"))
    os.environ.update(done)
    return done


def _fresh_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_bundle(model_dir: Path) -> Manifest:
    """Read the manifest and check every weights file exists and matches its sha256 (no torch needed).

    Raises ManifestError, so that a broken bundle stops the worker before it forks or touches the queue.
    """
    manifest = read_manifest(model_dir)
    for entry in manifest.models:
        checked_weights_path(model_dir, entry)
    return manifest


class Readiness:
    """Child markers -> one ready file (see module docstring). ``fatal`` says why the worker was stopped."""

    def __init__(
        self,
        run_dir: Path,
        ready_file: Path | None,
        children: int,
        timeout_s: float,
        description: dict[str, Any],
        on_fatal: Callable[[], None] | None = None,
    ) -> None:
        self.description = description
        self.on_fatal = on_fatal if on_fatal is not None else _terminate_self
        self.children_dir = _fresh_dir(run_dir / "children")
        self.ready_file = ready_file
        self.children = children
        self.timeout_s = timeout_s
        self.fatal: str | None = None

    def child_loaded(self, error: Exception | None) -> None:
        """In a pool child, after loading the ensemble: leave a marker for the parent."""
        marker = self.children_dir / str(os.getpid())
        _write_atomic(marker, json.dumps({"ok": error is None, "error": str(error) if error else ""}))

    def start_waiting(self) -> threading.Thread:
        """In the parent, when Celery's worker_ready fires: wait for the children in a daemon thread."""
        thread = threading.Thread(target=self._wait, name="cxr-readiness", daemon=True)
        thread.start()
        return thread

    def remove_ready_file(self) -> None:
        if self.ready_file is not None:
            self.ready_file.unlink(missing_ok=True)

    def _wait(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            ok, errors = self._markers()
            if errors:
                return self._stop(f"a pool child could not load the ensemble: {errors[0]}")
            if ok >= self.children:
                return self._ready()
            time.sleep(0.1)
        return self._stop(f"pool children did not load the ensemble within {self.timeout_s:g} s")

    def _markers(self) -> tuple[int, list[str]]:
        ok, errors = 0, []
        for marker in self.children_dir.iterdir():
            try:
                state = json.loads(marker.read_text())
            except (OSError, ValueError):
                continue  # being written
            ok += bool(state.get("ok"))
            if not state.get("ok"):
                errors.append(str(state.get("error")))
        return ok, errors

    def _ready(self) -> None:
        log.info("worker ready: %d children loaded the ensemble", self.children)
        if self.ready_file is not None:
            _write_atomic(
                self.ready_file, json.dumps({**self.description, "pid": os.getpid(), "ready_at": time.time()})
            )

    def _stop(self, why: str) -> None:
        self.fatal = why
        log.error("worker not ready, shutting down: %s", why)
        self.on_fatal()


def _terminate_self() -> None:
    """Ask this worker for a warm shutdown (Celery handles SIGTERM); __main__ then exits with EXIT_NOT_READY."""
    os.kill(os.getpid(), signal.SIGTERM)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
