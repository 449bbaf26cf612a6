"""``python -m services.worker [--concurrency N] [--loglevel info] ...``: run the explanation worker.

Order matters: settings (fail fast, no heavy imports) -> environment (metrics folder, matplotlib folder) ->
bundle check (no torch) -> import torch + captum via ``services.worker.app`` -> metrics server -> Celery worker
(prefork pool on queue ``explain``). Exit status: 0 after a normal shutdown (SIGTERM / SIGINT: warm shutdown,
running tasks finish), 2 on bad settings or a bad bundle, 3 if the pool children cannot load the ensemble.

Readiness for a supervisor: the file named by ``CXR_WORKER_READY_FILE`` appears (JSON) once the worker consumes
the queue and every pool child has loaded the models; ``celery -A ... inspect ping`` answers as well.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cxr.core.errors import ManifestError
from services.worker.settings import QUEUE, SettingsError, WorkerSettings, load_settings
from services.worker.startup import EXIT_NOT_READY, Readiness, check_bundle, prepare_environment

log = logging.getLogger("services.worker")


def _readiness(s: WorkerSettings, run_dir: Path, model: tuple[str, str]) -> Readiness:
    description = {
        "service": "cxr-worker",
        "hostname": s.worker_hostname,
        "queue": QUEUE,
        "concurrency": s.concurrency,
        "model": {"name": model[0], "version": model[1]},
        "note": "Research software: NOT FOR CLINICAL USE.",
    }
    timeout = s.proc_alive_timeout_s + 30.0
    return Readiness(run_dir, s.ready_file, s.concurrency, timeout, description)


def _serve(s: WorkerSettings, readiness: Readiness) -> int:
    # Imports torch and captum here, in the parent, before the pool forks (STACK-NOTES "Celery").
    from services.worker.app import create_app
    from services.worker.metrics import start_metrics_server

    app = create_app(s, readiness)
    server = start_metrics_server(s.metrics_host, s.metrics_port)
    worker = app.Worker(
        hostname=s.worker_hostname,
        queues=[QUEUE],
        concurrency=s.concurrency,
        loglevel=s.loglevel.upper(),
        pool_cls="prefork",
        optimization="fair",
        without_mingle=True,
        without_gossip=True,
        without_heartbeat=True,
    )
    try:
        worker.start()
    finally:
        if server is not None:
            server.shutdown()
    if readiness.fatal is not None:
        return EXIT_NOT_READY
    return int(worker.exitcode or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker until it is stopped; returns the process exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        s = load_settings(sys.argv[1:] if argv is None else argv)
        manifest = check_bundle(s.model_dir)
    except (SettingsError, ManifestError) as e:
        log.error("cannot start the worker: %s", e)
        return 2
    run_dir = Path(tempfile.mkdtemp(prefix="cxr-worker-"))
    readiness = _readiness(s, run_dir, (manifest.name, manifest.version))
    try:
        prepare_environment(run_dir)
        return _serve(s, readiness)
    finally:
        readiness.remove_ready_file()
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
