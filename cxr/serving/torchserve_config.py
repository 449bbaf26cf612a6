"""TorchServe 0.12 instance settings and the ``config.properties`` they produce (no process handling here).

Every security-relevant option is written explicitly, even where it equals TorchServe's default, so that the
file documents the deployment and a change of upstream default cannot change it silently:
token authorisation (on by default, see ``torchserve_process``), the model-management API (off: models are
registered at start only), every listener bound to 127.0.0.1, no per-model pip installs, no environment-variable
overrides, archive URLs limited to the local model store, and request/response size limits.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_FILE = "config.properties"
METRICS_CONFIG_FILE = "metrics.yaml"
# TorchServe's metrics: only those that pass `promtool check metrics` (deploy/torchserve-metrics.yaml explains;
# the two are kept identical by tests/unit/test_monitoring_static.py).
METRICS_YAML = """dimensions:
  - &hostname "Hostname"
ts_metrics:
  counter:
    - name: ts_inference_requests_total
      unit: Count
      dimensions: ["model_name", "model_version", "hostname"]
model_metrics:  # the worker refuses an empty section; nothing emits this name
  gauge:
    - name: cxr_torchserve_unused
      unit: ms
      dimensions: ["ModelName", "Level"]
"""
KEY_FILE = "key_file.json"  # written by TorchServe into its working directory (= home) when token auth is on


@dataclass
class TorchServeSettings:
    """One TorchServe instance. ``home`` holds config.properties, logs/, metrics/, tmp/ and key_file.json."""

    home: Path
    model_store: Path
    bind_host: str = "127.0.0.1"
    inference_port: int = 8480
    management_port: int = 8481
    metrics_port: int = 8482
    grpc_inference_port: int = 7470
    grpc_management_port: int = 7471
    token_auth: bool = True
    token_expiration_min: int = 60 * 24 * 365  # TorchServe's own default (60 min) would expire a running stack
    java_xmx: str = "1g"
    default_workers: int = 1
    max_request_size: int = 8_000_000
    max_response_size: int = 8_000_000
    number_of_gpu: int | None = None  # None: all GPUs TorchServe sees; 0: CPU only
    python: str = sys.executable
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.home = Path(self.home).resolve()
        self.model_store = Path(self.model_store).resolve()
        if not re.fullmatch(r"\d+[kmgKMG]?", self.java_xmx):
            raise ValueError(f"java_xmx must look like 512m or 1g, got {self.java_xmx!r}")

    @property
    def ports(self) -> tuple[int, ...]:
        return (
            self.inference_port,
            self.management_port,
            self.metrics_port,
            self.grpc_inference_port,
            self.grpc_management_port,
        )

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def metrics_dir(self) -> Path:
        return self.home / "metrics"

    @property
    def tmp_dir(self) -> Path:
        return self.home / "tmp"  # TEMP and TMPDIR: pid file, unpacked archives, worker sockets

    @property
    def config_path(self) -> Path:
        return self.home / CONFIG_FILE

    @property
    def key_file(self) -> Path:
        return self.home / KEY_FILE

    @property
    def metrics_config_path(self) -> Path:
        return self.home / METRICS_CONFIG_FILE


def _models_value(models: dict[str, str]) -> str:
    """{"cxr": "cxr.mar"} -> "cxr=cxr.mar". Raises ValueError for names/files TorchServe cannot take."""
    if not models:
        raise ValueError("at least one model must be registered at start (the model API is disabled)")
    for name, mar in models.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or not re.fullmatch(r"[A-Za-z0-9_.-]+\.mar", mar):
            raise ValueError(f"bad model entry {name!r}: {mar!r} (plain names, a .mar file inside the store)")
    return ",".join(f"{name}={mar}" for name, mar in models.items())


def _properties_escape(value: str) -> str:
    """Java's Properties.load drops lone backslashes: double them so a regex survives."""
    return value.replace("\\", "\\\\")


def render_config(settings: TorchServeSettings, models: dict[str, str]) -> str:
    """The complete config.properties text for ``settings`` serving ``models`` (name -> .mar in the store)."""
    s = settings
    host = s.bind_host
    lines = [
        "# Written by cxr.serving.torchserve_config: every security option explicit. NOT FOR CLINICAL USE.",
        f"inference_address=http://{host}:{s.inference_port}",
        f"management_address=http://{host}:{s.management_port}",
        f"metrics_address=http://{host}:{s.metrics_port}",
        f"grpc_inference_address={host}",
        f"grpc_inference_port={s.grpc_inference_port}",
        f"grpc_management_address={host}",
        f"grpc_management_port={s.grpc_management_port}",
        "enable_grpc_ssl=false",
        f"disable_token_authorization={'false' if s.token_auth else 'true'}",
        f"token_expiration_min={s.token_expiration_min}",
        "enable_model_api=false",
        "enable_envvars_config=false",
        "install_py_dep_per_model=false",
        f"allowed_urls={_properties_escape('file://' + re.escape(str(s.model_store)) + '/.*')}",
        "enable_metrics_api=true",
        "metrics_mode=prometheus",
        f"metrics_config={s.metrics_config_path}",
        "disable_system_metrics=false",
        f"model_store={s.model_store}",
        f"load_models={_models_value(models)}",
        f"default_workers_per_model={s.default_workers}",
        f"max_request_size={s.max_request_size}",
        f"max_response_size={s.max_response_size}",
        "decode_input_request=false",
        f"python={s.python}",
        f"vmargs=-Xmx{s.java_xmx} -XX:+ExitOnOutOfMemoryError -Djava.io.tmpdir={s.tmp_dir}",
    ]
    if s.number_of_gpu is not None:
        lines.append(f"number_of_gpu={s.number_of_gpu}")
    return "\n".join(lines) + "\n"
