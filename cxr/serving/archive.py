"""Build the TorchServe model archive (.mar) holding the whole ensemble.

Contents: ``handler.py`` (services/inference/handler.py), ``manifest.json`` + one weights file per model as
extra files (they land next to the handler in the worker's model_dir), ``model-config.yaml`` as the archive's
config file, version = the manifest's version.

torch-model-archiver stages files in ``$TMPDIR/<model name>``, which two concurrent builds would share, so it is
run as a subprocess with a private TMPDIR and its output moved into place atomically. An archive is reused when
a hash of all its inputs (stored beside it as ``<name>.mar.inputs-sha256``) is unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cxr.core.errors import CxrError, ManifestError
from cxr.core.manifest import MANIFEST_FILE, Manifest, read_manifest

logger = logging.getLogger(__name__)

SERVICE_DIR = Path(__file__).resolve().parents[2] / "services" / "inference"
HANDLER_FILE = SERVICE_DIR / "handler.py"
MODEL_CONFIG_FILE = SERVICE_DIR / "model-config.yaml"
ARCHIVER_TIMEOUT_S = 600


class ArchiveError(CxrError):
    """torch-model-archiver failed (a deployment error)."""

    reason = "ARCHIVE_FAILED"


def _bundle_files(ensemble_dir: Path, manifest: Manifest) -> list[Path]:
    """manifest.json + every weights file, checked to exist as plain files. Raises ManifestError."""
    files = [ensemble_dir / MANIFEST_FILE]
    for entry in manifest.models:
        if Path(entry.weights).name != entry.weights:
            raise ManifestError(f"weights of {entry.name} must be a file name inside the bundle: {entry.weights!r}")
        path = ensemble_dir / entry.weights
        if not path.is_file():
            raise ManifestError(f"weights {entry.weights} of model {entry.name} missing in {ensemble_dir}")
        files.append(path)
    return files


def inputs_digest(model_name: str, version: str, files: list[Path]) -> str:
    """sha256 over the archive's name, version, handler, model config and bundle files (names and bytes)."""
    h = hashlib.sha256(f"{model_name}\0{version}\0".encode())
    for path in [HANDLER_FILE, MODEL_CONFIG_FILE, *files]:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _stage(files: list[Path], stage: Path) -> list[Path]:
    """Hard-link (or copy) the bundle files into ``stage`` so that odd characters in the source paths
    (commas, glob patterns) never reach the archiver's comma-separated --extra-files."""
    stage.mkdir()
    staged = []
    for path in files:
        dst = stage / path.name
        try:
            os.link(path, dst)
        except OSError:
            shutil.copy2(path, dst)
        staged.append(dst)
    return staged


def _run_archiver(model_name: str, version: str, extra: list[Path], work: Path) -> Path:
    """Run torch-model-archiver in ``work`` (private TMPDIR) -> path of the .mar. Raises ArchiveError."""
    out = work / "out"
    out.mkdir()
    cmd = [
        sys.executable, "-m", "model_archiver.model_packaging",
        "--model-name", model_name, "--version", version, "--handler", str(HANDLER_FILE),
        "--extra-files", ",".join(str(p) for p in extra), "--config-file", str(MODEL_CONFIG_FILE),
        "--export-path", str(out), "--archive-format", "default",
    ]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(work), "TEMP": str(work)}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=ARCHIVER_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        raise ArchiveError(f"torch-model-archiver took more than {ARCHIVER_TIMEOUT_S} s") from e
    mar = out / f"{model_name}.mar"
    if proc.returncode != 0 or not mar.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        raise ArchiveError(f"torch-model-archiver failed (exit {proc.returncode}):\n{tail}")
    return mar


def build_archive(
    ensemble_dir: str | Path, out_dir: str | Path, model_name: str = "cxr", *, force: bool = False
) -> Path:
    """Ensemble bundle -> ``<out_dir>/<model_name>.mar``; reuses an up-to-date archive unless ``force``.

    Raises ManifestError for a bad bundle, ArchiveError when torch-model-archiver fails, ValueError for a
    model name TorchServe cannot serve.
    """
    if not model_name or not model_name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"model name must be letters, digits, '-' and '_', got {model_name!r}")
    src = Path(ensemble_dir)
    manifest = read_manifest(src)
    files = _bundle_files(src, manifest)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mar, stamp = out / f"{model_name}.mar", out / f"{model_name}.mar.inputs-sha256"
    digest = inputs_digest(model_name, manifest.version, files)
    if not force and mar.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        logger.info("archive %s is up to date", mar)
        return mar
    with tempfile.TemporaryDirectory(prefix="cxr-mar-", dir=out) as tmp:
        built = _run_archiver(model_name, manifest.version, _stage(files, Path(tmp) / "stage"), Path(tmp))
        os.replace(built, mar)  # same filesystem (tmp is inside out_dir): atomic
    stamp.write_text(digest + "\n")
    logger.info("built %s (%s %s, %d models)", mar, manifest.name, manifest.version, len(manifest.models))
    return mar
