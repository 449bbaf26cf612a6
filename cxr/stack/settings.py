"""Settings of the local stack (``cxr up``): every port and path, read once from the environment.

Environment (all optional; defaults are docs/ARCHITECTURE.md's local ports, all bound to 127.0.0.1):

============================== ============================== ==========================================
variable                       default                        what
============================== ============================== ==========================================
CXR_HOME                       ./.cxr                         runtime folder: logs, state, TorchServe home
CXR_MODEL_DIR                  model_store/cxr-nih14-imagenet     the ensemble to serve (manifest + weights)
CXR_REDIS_PORT                 6390                           redis-server
CXR_TS_INFERENCE_PORT          8480                           TorchServe REST inference
CXR_TS_MANAGEMENT_PORT         8481                           TorchServe REST management
CXR_TS_METRICS_PORT            8482                           TorchServe Prometheus metrics
CXR_TS_GRPC_PORT               7470                           TorchServe gRPC inference
CXR_TS_GRPC_MANAGEMENT_PORT    7471                           TorchServe gRPC management
CXR_INGESTION_PORT             50151                          ingestion gRPC API
CXR_INGESTION_METRICS_PORT     9151                           ingestion Prometheus metrics
CXR_WORKER_METRICS_PORT        9152                           explanation worker Prometheus metrics
CXR_DICOM_PORT                 11112                          DICOM Storage SCP (the DICOM front door)
CXR_DICOM_METRICS_PORT         9153                           DICOM front door Prometheus metrics
CXR_DICOM_AE_TITLE             CXR                            the SCP's AE title (any called AE title is accepted)
CXR_STACK_START_TIMEOUT_S      180                            bound on each service's wait for readiness
CXR_STACK_STOP_GRACE_S         20                             SIGTERM -> SIGKILL grace per service
CXR_REDIS_MAXMEMORY            1gb                            redis-server memory limit (noeviction, AOF on)
CXR_TS_WORKERS                 2                              TorchServe Python workers (each holds the ensemble)
CXR_TORCH_THREADS              0: CPUs // CXR_TS_WORKERS      torch threads of each TorchServe worker
============================== ============================== ==========================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import cxr
from cxr.stack.errors import BadSettingError
from cxr.stack.redis_config import DEFAULT_MAXMEMORY, is_memory_size

HOST = "127.0.0.1"
SERVICES = ("redis", "torchserve", "ingestion", "worker", "dicom")  # dependency order; stopped in reverse
DEFAULT_DICOM_AE_TITLE = "CXR"
TORCHSERVE_MODEL = "cxr"
DEMO_MODEL = Path("model_store") / "cxr-nih14-imagenet"

_PORT_ENV = {
    "redis_port": ("CXR_REDIS_PORT", 6390),
    "ts_inference_port": ("CXR_TS_INFERENCE_PORT", 8480),
    "ts_management_port": ("CXR_TS_MANAGEMENT_PORT", 8481),
    "ts_metrics_port": ("CXR_TS_METRICS_PORT", 8482),
    "ts_grpc_port": ("CXR_TS_GRPC_PORT", 7470),
    "ts_grpc_management_port": ("CXR_TS_GRPC_MANAGEMENT_PORT", 7471),
    "ingestion_port": ("CXR_INGESTION_PORT", 50151),
    "ingestion_metrics_port": ("CXR_INGESTION_METRICS_PORT", 9151),
    "worker_metrics_port": ("CXR_WORKER_METRICS_PORT", 9152),
    "dicom_port": ("CXR_DICOM_PORT", 11112),
    "dicom_metrics_port": ("CXR_DICOM_METRICS_PORT", 9153),
}


@dataclass(frozen=True)
class StackSettings:
    """Where everything of the local stack lives. Build it with :meth:`from_env`."""

    home: Path
    model_dir: Path
    redis_port: int = 6390
    ts_inference_port: int = 8480
    ts_management_port: int = 8481
    ts_metrics_port: int = 8482
    ts_grpc_port: int = 7470
    ts_grpc_management_port: int = 7471
    ingestion_port: int = 50151
    ingestion_metrics_port: int = 9151
    worker_metrics_port: int = 9152
    dicom_port: int = 11112
    dicom_metrics_port: int = 9153
    dicom_ae_title: str = DEFAULT_DICOM_AE_TITLE
    start_timeout_s: float = 180.0
    stop_grace_s: float = 20.0
    redis_maxmemory: str = DEFAULT_MAXMEMORY  # cxr.stack.redis_config
    # Two workers of one torch thread each beat one worker of two threads on the 2-core machine: 17.1 vs 13.6
    # images/s with 8 clients, and 61 vs 102 CPU ms per image in TorchServe (docs/BENCHMARKS.md, issue 9).
    ts_workers: int = 2
    ts_threads: int = 0  # torch threads of each TorchServe worker; 0: the CPUs shared among the workers

    @property
    def ts_threads_per_worker(self) -> int:
        """``ts_threads`` when given, else the CPUs shared among the TorchServe workers (at least 1)."""
        return self.ts_threads or max(1, (os.cpu_count() or 1) // self.ts_workers)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> StackSettings:
        """Read the settings from ``env`` (default ``os.environ``); relative paths resolve against ``cwd``.

        Raises BadSettingError for a port that is not an integer in 1..65535, a duplicated port, a
        non-positive timeout, or a worker count outside 1..64 (thread count: 0..1024, 0 = automatic)."""
        env = os.environ if env is None else env
        cwd = Path.cwd() if cwd is None else cwd
        ports = {name: _port(env, var, default) for name, (var, default) in _PORT_ENV.items()}
        settings = cls(
            home=_path(env.get("CXR_HOME"), cwd, cwd / ".cxr"),
            model_dir=_path(env.get("CXR_MODEL_DIR"), cwd, default_model_dir(cwd)),
            start_timeout_s=_seconds(env, "CXR_STACK_START_TIMEOUT_S", 180.0),
            stop_grace_s=_seconds(env, "CXR_STACK_STOP_GRACE_S", 20.0),
            redis_maxmemory=_memory(env, "CXR_REDIS_MAXMEMORY", DEFAULT_MAXMEMORY),
            dicom_ae_title=_ae_title(env, "CXR_DICOM_AE_TITLE", DEFAULT_DICOM_AE_TITLE),
            ts_workers=_whole(env, "CXR_TS_WORKERS", 2, low=1, high=64, what="a whole number"),
            ts_threads=_whole(env, "CXR_TORCH_THREADS", 0, low=0, high=1024, what="a whole number"),
            **ports,
        )
        settings.check_distinct_ports()
        return settings

    def check_distinct_ports(self) -> None:
        """Raise BadSettingError if two services were given the same port."""
        seen: dict[int, str] = {}
        for name in _PORT_ENV:
            port = getattr(self, name)
            if port in seen:
                raise BadSettingError(
                    f"port {port} is given to both {_PORT_ENV[seen[port]][0]} and {_PORT_ENV[name][0]}"
                )
            seen[port] = name

    def ports(self) -> dict[str, int]:
        """Every port of the stack by the environment variable that sets it, e.g. {"CXR_REDIS_PORT": 6390}."""
        return {var: getattr(self, name) for name, (var, _) in _PORT_ENV.items()}

    def service_ports(self, service: str) -> dict[str, int]:
        """The ports one service binds, by their environment variable."""
        prefix = {"redis": "CXR_REDIS", "torchserve": "CXR_TS_", "ingestion": "CXR_INGESTION", "worker": "CXR_WORKER",
                  "dicom": "CXR_DICOM"}  # fmt: skip
        return {var: port for var, port in self.ports().items() if var.startswith(prefix[service])}

    # -- derived addresses and paths --------------------------------------------------------------
    @property
    def redis_url(self) -> str:
        return f"redis://{HOST}:{self.redis_port}/0"

    @property
    def ingestion_address(self) -> str:
        return f"{HOST}:{self.ingestion_port}"

    @property
    def dicom_address(self) -> str:
        """host:port of the DICOM Storage SCP, as ``storescu HOST PORT`` takes it."""
        return f"{HOST}:{self.dicom_port}"

    @property
    def dicom_spool_dir(self) -> Path:
        return self.home / "dicom-spool"

    @property
    def torchserve_grpc_address(self) -> str:
        return f"{HOST}:{self.ts_grpc_port}"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def state_file(self) -> Path:
        return self.home / "stack.json"

    @property
    def torchserve_home(self) -> Path:
        return self.home / "torchserve"

    @property
    def model_store(self) -> Path:
        return self.home / "model_store"

    @property
    def redis_dir(self) -> Path:
        return self.home / "redis"

    @property
    def token_file(self) -> Path:
        return self.torchserve_home / "key_file.json"

    @property
    def worker_ready_file(self) -> Path:
        return self.home / "run" / "worker.ready"

    def log_file(self, service: str) -> Path:
        """Where a service's output goes; TorchServe writes its own logs in its home (frontend: ts_log.log)."""
        if service == "torchserve":
            return self.torchserve_home / "logs" / "ts_log.log"
        return self.logs_dir / f"{service}.log"

    def metrics_urls(self) -> dict[str, str | None]:
        """The Prometheus endpoint of each service (redis has none)."""
        return {
            "redis": None,
            "torchserve": f"http://{HOST}:{self.ts_metrics_port}/metrics",
            "ingestion": f"http://{HOST}:{self.ingestion_metrics_port}/metrics",
            "worker": f"http://{HOST}:{self.worker_metrics_port}/metrics",
            "dicom": f"http://{HOST}:{self.dicom_metrics_port}/metrics",
        }

    def addresses(self) -> dict[str, str]:
        """The main address of each service, as a client writes it."""
        return {
            "redis": self.redis_url,
            "torchserve": f"{HOST}:{self.ts_grpc_port} (gRPC; management :{self.ts_management_port})",
            "ingestion": self.ingestion_address,
            "worker": "celery queue 'explain'",
            "dicom": self.dicom_address,
        }

    def as_dict(self) -> dict[str, object]:
        """All settings, JSON-ready (paths as strings)."""
        return {f.name: (str(v) if isinstance(v := getattr(self, f.name), Path) else v) for f in fields(self)}


def port_variables() -> list[str]:
    """The environment variables that set the stack's ports."""
    return [var for var, _ in _PORT_ENV.values()]


def default_model_dir(cwd: Path) -> Path:
    """``model_store/cxr-nih14-imagenet`` in ``cwd`` if there, else in the source checkout the package runs from."""
    here = cwd / DEMO_MODEL
    if here.is_dir():
        return here
    return Path(cxr.__file__).resolve().parents[1] / DEMO_MODEL


def _path(value: str | None, cwd: Path, default: Path) -> Path:
    if not value:
        return default.absolute()
    p = Path(value).expanduser()
    return (p if p.is_absolute() else cwd / p).absolute()


def _port(env: Mapping[str, str], var: str, default: int) -> int:
    return _whole(env, var, default, low=1, high=65535, what="a port number")


def _whole(env: Mapping[str, str], var: str, default: int, *, low: int, high: int, what: str) -> int:
    raw = env.get(var, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadSettingError(f"{var}={raw!r} is not {what}") from None
    if not low <= value <= high:
        raise BadSettingError(f"{var}={value} is outside {low}..{high}")
    return value


def _memory(env: Mapping[str, str], var: str, default: str) -> str:
    raw = env.get(var, "").strip()
    if not raw:
        return default
    if not is_memory_size(raw):
        raise BadSettingError(f"{var}={raw!r} is not a memory size such as 512mb or 2gb")
    return raw


def _ae_title(env: Mapping[str, str], var: str, default: str) -> str:
    raw = env.get(var, "").strip()
    if not raw:
        return default
    if len(raw) > 16 or "\\" in raw or not raw.isprintable():
        raise BadSettingError(f"{var}={raw!r} is not an AE title (1-16 printable characters, no backslash)")
    return raw


def _seconds(env: Mapping[str, str], var: str, default: float) -> float:
    raw = env.get(var, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadSettingError(f"{var}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise BadSettingError(f"{var}={value} must be > 0")
    return value
