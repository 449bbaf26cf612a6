"""Pieces of health, faults and security that need no running service: the idle-limited upload stream, the
health monitor on a real grpc HealthServicer, the TLS and health settings, client TLS from flags and environment,
Redis's production options, and the statuses of the new errors."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2
from prometheus_client import CollectorRegistry

from cxr.core.errors import DependencyUnavailableError
from cxr.stack.errors import BadSettingError
from cxr.stack.redis_config import durability_args, is_memory_size, redis_server_argv
from cxr.stack.settings import StackSettings
from cxr.stack.status import INGESTION_DEPENDENCIES
from cxr.tls import ClientTLS, TlsConfigError, make_channel, stack_probe_tls
from services.ingestion.errors import status_for
from services.ingestion.health_monitor import DependencyCheck, HealthMonitor, dependency_service
from services.ingestion.result_store import StoreFullError
from services.ingestion.settings import SettingsError, load_settings
from services.ingestion.upload_stream import IdleLimitedStream, UploadIdleError

pytestmark = pytest.mark.unit

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


# -- the idle-limited upload stream ------------------------------------------------------------------------------
def test_messages_pass_through_in_order() -> None:
    with IdleLimitedStream(iter(range(10)), idle_s=5) as stream:
        assert list(stream) == list(range(10))


def test_a_silent_stream_is_cut_after_the_idle_limit() -> None:
    release = threading.Event()

    def silent() -> Iterator[int]:
        yield 1
        release.wait(30)
        yield 2

    with IdleLimitedStream(silent(), idle_s=0.3) as stream:
        got = []
        started = time.monotonic()
        with pytest.raises(UploadIdleError, match="no upload message arrived for 0.3 s"):
            for item in stream:
                got.append(item)
        assert got == [1] and 0.3 <= time.monotonic() - started < 5
    release.set()
    wait_for(lambda: not [t for t in threading.enumerate() if t.name == "upload-reader"], 5)


def test_an_error_of_the_underlying_stream_is_raised_in_the_reader() -> None:
    def broken() -> Iterator[int]:
        yield 1
        raise grpc.RpcError("cancelled")

    with IdleLimitedStream(broken(), idle_s=5) as stream, pytest.raises(grpc.RpcError):
        list(stream)


def test_a_closed_stream_stops_its_reader_even_when_nobody_reads() -> None:
    stream = IdleLimitedStream(iter(range(1000)), idle_s=5)  # more than the buffer holds
    stream.close()
    wait_for(lambda: not [t for t in threading.enumerate() if t.name == "upload-reader"], 5)


def test_the_idle_cut_is_deadline_exceeded_and_store_full_is_resource_exhausted() -> None:
    assert status_for(UploadIdleError("x"))[:2] == (grpc.StatusCode.DEADLINE_EXCEEDED, "UPLOAD_IDLE_TIMEOUT")
    assert status_for(StoreFullError("x"))[:2] == (grpc.StatusCode.RESOURCE_EXHAUSTED, "STORE_FULL")


# -- the health monitor ------------------------------------------------------------------------------------------
class Switch:
    """A dependency check whose answer a test flips."""

    def __init__(self) -> None:
        self.up = True

    def __call__(self) -> None:
        if not self.up:
            raise DependencyUnavailableError("gone", reason="THING_DOWN")


def status_of(servicer: health.HealthServicer, service: str) -> int:
    return int(servicer.Check(health_pb2.HealthCheckRequest(service=service), None).status)


def test_the_monitor_reports_each_dependency_and_the_service() -> None:
    servicer, registry = health.HealthServicer(), CollectorRegistry()
    redis_check, ts_check = Switch(), Switch()
    checks = [DependencyCheck("redis", redis_check), DependencyCheck("torchserve", ts_check)]
    monitor = HealthMonitor(servicer, checks, services=("", "svc"), interval_s=0.05, registry=registry)
    monitor.mark_not_serving()
    assert status_of(servicer, "") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert monitor.check_now() == {}
    assert {status_of(servicer, s) for s in ("", "svc", "dependency/redis")} == {health_pb2.HealthCheckResponse.SERVING}
    ts_check.up = False
    assert monitor.check_now() == {"torchserve": "THING_DOWN: gone"}
    assert status_of(servicer, "svc") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert status_of(servicer, "dependency/torchserve") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert status_of(servicer, "dependency/redis") == health_pb2.HealthCheckResponse.SERVING
    assert registry.get_sample_value("cxr_ingestion_dependency_up", {"dependency": "torchserve"}) == 0
    assert registry.get_sample_value("cxr_ingestion_dependency_up", {"dependency": "redis"}) == 1


def test_the_monitor_thread_follows_a_dependency_down_and_up() -> None:
    servicer, check = health.HealthServicer(), Switch()
    monitor = HealthMonitor(servicer, [DependencyCheck("redis", check)], services=("",), interval_s=0.05)
    monitor.check_now()
    monitor.start()
    try:
        check.up = False
        wait_for(lambda: status_of(servicer, "") == health_pb2.HealthCheckResponse.NOT_SERVING, 5)
        check.up = True
        wait_for(lambda: status_of(servicer, "") == health_pb2.HealthCheckResponse.SERVING, 5)
    finally:
        monitor.stop()


def test_a_slow_check_never_delays_noticing_another_dependency_down() -> None:
    servicer, redis_check, release = health.HealthServicer(), Switch(), threading.Event()
    checks = [DependencyCheck("torchserve", lambda: release.wait(30) and None), DependencyCheck("redis", redis_check)]
    monitor = HealthMonitor(servicer, checks, services=("",), interval_s=0.05)
    monitor._publish("torchserve", None)
    monitor._publish("redis", None)
    monitor.start()
    try:
        redis_check.up = False  # while the torchserve check hangs in its own thread
        wait_for(lambda: status_of(servicer, "dependency/redis") == health_pb2.HealthCheckResponse.NOT_SERVING, 5)
        assert status_of(servicer, "") == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        release.set()
        monitor.stop()


def test_an_unexpected_error_of_a_check_means_not_healthy() -> None:
    def buggy() -> None:
        raise KeyError("bug")

    monitor = HealthMonitor(health.HealthServicer(), [DependencyCheck("x", buggy)], services=("",), interval_s=1)
    assert monitor.check_now() == {"x": "CHECK_FAILED: KeyError"}


def test_cxr_status_asks_for_the_dependencies_the_service_reports() -> None:
    assert [dependency_service(n) for n in INGESTION_DEPENDENCIES] == ["dependency/redis", "dependency/torchserve"]


# -- settings ----------------------------------------------------------------------------------------------------
@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "manifest.json").write_text("{}")
    return tmp_path


def pem(tmp_path: Path, name: str) -> str:
    path = tmp_path / name
    path.write_text(PEM)
    return str(path)


def test_health_upload_and_metrics_settings_have_safe_defaults(model_dir: Path) -> None:
    s = load_settings([], environ={"CXR_MODEL_DIR": str(model_dir)})
    assert (s.metrics_host, s.upload_idle_s, s.health_interval_s, s.health_timeout_s) == ("127.0.0.1", 30, 5, 5)
    assert not s.tls and s.tls_client_ca is None


def test_tls_settings_are_read_and_checked_together(model_dir: Path, tmp_path: Path) -> None:
    env = {"CXR_MODEL_DIR": str(model_dir), "CXR_TLS_CERT": pem(tmp_path, "c.pem"), "CXR_TLS_KEY": pem(tmp_path, "k")}
    s = load_settings(["--tls-client-ca", pem(tmp_path, "ca.pem")], environ=env)
    assert s.tls and s.tls_client_ca == tmp_path / "ca.pem"
    with pytest.raises(SettingsError, match="CXR_TLS_CERT and CXR_TLS_KEY must be given together"):
        load_settings([], environ={**env, "CXR_TLS_KEY": ""})
    with pytest.raises(SettingsError, match="needs CXR_TLS_CERT"):
        load_settings([], environ={"CXR_MODEL_DIR": str(model_dir), "CXR_TLS_CLIENT_CA": pem(tmp_path, "ca.pem")})
    with pytest.raises(SettingsError, match="CXR_TLS_KEY=.*cannot read"):
        load_settings([], environ={**env, "CXR_TLS_KEY": str(tmp_path / "missing.key")})
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(SettingsError, match="is not a PEM file"):
        load_settings([], environ={**env, "CXR_TLS_CERT": str(tmp_path / "junk.pem")})


def test_client_tls_from_flags_over_environment(tmp_path: Path) -> None:
    env = {"CXR_TLS_CA": "/env/ca.pem", "CXR_TLS_CLIENT_CERT": "/env/c.pem", "CXR_TLS_CLIENT_KEY": "/env/k.pem"}
    assert ClientTLS.from_values(env={}) is None
    tls = ClientTLS.from_values(ca="/flag/ca.pem", env=env)
    assert tls == ClientTLS(ca=Path("/flag/ca.pem"), cert=Path("/env/c.pem"), key=Path("/env/k.pem"))
    with pytest.raises(TlsConfigError, match="together"):
        ClientTLS.from_values(cert="/c.pem", env={})
    with pytest.raises(TlsConfigError, match="cannot read"):
        make_channel("127.0.0.1:1", ClientTLS(ca=tmp_path / "missing.pem"))


def test_the_stack_probe_trusts_the_server_certificate_when_no_ca_is_given() -> None:
    assert stack_probe_tls({}) is None
    assert stack_probe_tls({"CXR_TLS_CERT": "/s.pem"}) == ClientTLS(ca=Path("/s.pem"))
    both = {"CXR_TLS_CERT": "/s.pem", "CXR_TLS_CA": "/ca.pem", "CXR_TLS_CLIENT_CERT": "/c", "CXR_TLS_CLIENT_KEY": "/k"}
    assert stack_probe_tls(both) == ClientTLS(ca=Path("/ca.pem"), cert=Path("/c"), key=Path("/k"))


# -- redis-server options ----------------------------------------------------------------------------------------
def test_redis_runs_with_an_append_only_file_a_memory_limit_and_no_eviction(tmp_path: Path) -> None:
    options = dict(zip(durability_args("512mb")[::2], durability_args("512mb")[1::2], strict=True))
    assert options == {"--appendonly": "yes", "--appendfsync": "everysec", "--save": "", "--maxmemory": "512mb",
                       "--maxmemory-policy": "noeviction"}  # fmt: skip
    argv = redis_server_argv("redis-server", port=6390, host="127.0.0.1", data_dir=tmp_path)
    assert argv[argv.index("--bind") + 1] == "127.0.0.1" and argv[argv.index("--protected-mode") + 1] == "yes"


def test_the_stack_reads_the_redis_memory_limit(tmp_path: Path) -> None:
    assert StackSettings.from_env({}, cwd=tmp_path).redis_maxmemory == "1gb"
    assert StackSettings.from_env({"CXR_REDIS_MAXMEMORY": "300mb"}, cwd=tmp_path).redis_maxmemory == "300mb"
    with pytest.raises(BadSettingError, match="CXR_REDIS_MAXMEMORY"):
        StackSettings.from_env({"CXR_REDIS_MAXMEMORY": "lots"}, cwd=tmp_path)
    assert [is_memory_size(v) for v in ("1gb", "1048576", "0", "-1mb", "2 gb")] == [True, True, False, False, False]


def wait_for(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    pytest.fail(f"condition not met within {timeout_s} s")
