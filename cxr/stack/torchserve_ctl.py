"""TorchServe for the local stack, through ``cxr.serving`` (the one place that knows how to run it): the model
archive (rebuilt only when the ensemble or the handler changed), the instance's settings, its log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cxr.stack.settings import TORCHSERVE_MODEL, StackSettings

ARCHIVE = f"{TORCHSERVE_MODEL}.mar"


def torchserve(settings: StackSettings) -> Any:
    """A ``cxr.serving.torchserve_process.TorchServe`` for this stack's home, model store and ports (token
    authorisation as that module's default: on), ``ts_workers`` workers of ``ts_threads_per_worker`` threads."""
    from cxr.serving.torchserve_process import TorchServe, TorchServeSettings

    ts_settings = TorchServeSettings(
        home=settings.torchserve_home,
        model_store=settings.model_store,
        inference_port=settings.ts_inference_port,
        management_port=settings.ts_management_port,
        metrics_port=settings.ts_metrics_port,
        grpc_inference_port=settings.ts_grpc_port,
        grpc_management_port=settings.ts_grpc_management_port,
        default_workers=settings.ts_workers,
        extra_env={"CXR_TORCH_THREADS": str(settings.ts_threads_per_worker)},
    )
    return TorchServe(ts_settings)


def ensure_archive(settings: StackSettings) -> Path:
    """``<CXR_HOME>/model_store/cxr.mar`` built from the model directory; the builder reuses an archive whose
    inputs are unchanged. Raises ManifestError / ArchiveError from ``cxr.serving.archive``."""
    from cxr.serving.archive import build_archive

    return build_archive(settings.model_dir, settings.model_store, TORCHSERVE_MODEL)
