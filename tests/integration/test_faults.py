"""Faults on purpose: kill -9 of the Celery worker, of TorchServe and of redis-server in the middle of a stream of
Analyze requests, then a restart of what was killed (as a supervisor would do), and nothing else.

Real peers: redis-server with the production settings (append-only file fsynced every second, memory limit,
noeviction: ``cxr.stack.redis_config``), a REAL TorchServe (token auth on) serving a tiny random ensemble, the
real Celery worker (``python -m services.worker``) and the real ingestion gRPC server in-process, over loopback.

What each fault run checks:
* every request the API acknowledged (an Analyze answered OK with a job id) ends as a result (job ``done``) or a
  recorded failure with a reason (``failed`` + ``failure_reason``): none lost, none stuck;
* every refused request was refused quickly with UNAVAILABLE and a reason (never a hang, never INTERNAL);
* the gRPC health turns NOT_SERVING while TorchServe or Redis is down and SERVING again once it is back;
* the rest of the stack recovers by itself (ingestion and the worker are not restarted).

Each run prints (and appends to the JSON file named by ``CXR_FAULT_REPORT``, when set) the numbers: requests
sent / acknowledged / refused / finished / lost, and the times to NOT_SERVING, back to SERVING and until every
acknowledged job had ended. The three runs share one stack and run in the order written.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import pytest
import redis
from fault_fixtures import NOT_SERVING, SERVING, DurableRedis, health_status, wait_health
from ingestion_fixtures import (
    MODEL,
    Running,
    edited_dicom,
    ensemble,
    free_ports,
    ingestion_settings,
    requests_for,
    running_server,
    wait_until,
)
from worker_fixtures import WorkerProcess, worker_env

from cxr.core.jobs import job_key
from cxr.core.manifest import Manifest
from cxr.ingestion.v1 import ingestion_pb2_grpc as pb_grpc
from cxr.serving.archive import build_archive
from cxr.serving.torchserve_process import TorchServe, TorchServeSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

__all__ = ["ensemble"]  # fixture used by name

CALL_DEADLINE_S = 30.0  # the client's deadline: a refused call must end long before it
INFERENCE_TIMEOUT_S = 5.0
REFUSED_WITHIN_S = INFERENCE_TIMEOUT_S + 3.0  # UNAVAILABLE comes within the inference bound (+ a loaded CI machine)
HEALTH_BOUND_S = 0.5 + 3.0 + 2.0 + 4.0  # period + probe bound + Redis socket timeout + slack
# back to SERVING: the first probe of a restarted (cold) model is bounded by the inference timeout, and may fail once
RECOVERY_BOUND_S = HEALTH_BOUND_S + 2 * INFERENCE_TIMEOUT_S
SETTLE_S = 300.0  # bound on the wait for every acknowledged job to end after a run (a loaded 2-core CI machine)
WORKER_LIMITS = {
    "CXR_TASK_SOFT_TIME_LIMIT_S": "20", "CXR_TASK_TIME_LIMIT_S": "25", "CXR_TASK_RETRY_BACKOFF_S": "0.5",
    "CXR_VISIBILITY_TIMEOUT_S": "30", "CXR_UNACKED_RESTORE_INTERVAL_S": "1", "CXR_OVERLAY_MAX_SIDE": "256",
}  # fmt: skip
SOURCES = ("siim_pneumothorax_negative.dcm", "nih_no_finding_dx.dcm")


# -- the stack ---------------------------------------------------------------------------------------------------
@dataclass
class FaultStack:
    redis: DurableRedis
    torchserve: TorchServe
    ingestion: Running
    workdir: Path
    worker_env: dict[str, str]
    worker: WorkerProcess | None = None
    workers_started: int = 0

    def start_worker(self, **extra: str) -> float:
        """Start a worker (a fresh process, as a supervisor restarts one); returns the seconds until ready."""
        self.workers_started += 1
        started = time.monotonic()
        self.worker = WorkerProcess(self.workdir / f"worker-{self.workers_started}", {**self.worker_env, **extra})
        self.worker.start().wait_ready(timeout_s=300)  # importing torch in every pool child: slow on a busy box
        return time.monotonic() - started

    def restart_torchserve(self) -> float:
        """TorchServe started again on the same ports (new keys); returns the seconds until its model is READY."""
        started = time.monotonic()
        self.torchserve.start({MODEL: f"{MODEL}.mar"})
        self.torchserve.wait_ready(MODEL, timeout=240)
        return time.monotonic() - started

    def kill_torchserve(self) -> None:
        """kill -9 of the launcher, the Java frontend and its model workers (the process group this test started)."""
        launcher = self.torchserve._launcher
        assert launcher is not None and launcher.poll() is None
        os.killpg(os.getpgid(launcher.pid), signal.SIGKILL)
        launcher.wait(10)
        wait_until(lambda: self.torchserve.pid is None, 10, "the Java frontend to be gone")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, ensemble: tuple[Path, Manifest]) -> Iterator[FaultStack]:
    root = tmp_path_factory.mktemp("faults")
    durable = DurableRedis(root / "redis")
    durable.start()
    build_archive(ensemble[0], root / "store", MODEL)
    p = free_ports(5)
    ts = TorchServe(TorchServeSettings(
        home=root / "ts", model_store=root / "store", inference_port=p[0], management_port=p[1], metrics_port=p[2],
        grpc_inference_port=p[3], grpc_management_port=p[4], java_xmx="512m", extra_env={"CXR_TORCH_THREADS": "1"},
    ))  # fmt: skip
    ts.start({MODEL: f"{MODEL}.mar"})
    settings = ingestion_settings(
        ensemble[0], durable.url, ts, inference_timeout_s=INFERENCE_TIMEOUT_S, inference_retries=1,
        health_interval_s=0.5, health_timeout_s=3.0, startup_wait_s=240.0,
    )  # fmt: skip
    env = worker_env(ensemble[0], durable.url, **WORKER_LIMITS)
    try:
        ts.wait_ready(MODEL, timeout=240)
        with running_server(settings) as svc:
            st = FaultStack(durable, ts, svc, root, env)
            st.start_worker(CXR_TASK_TEST_DELAY_S="0.5")  # tasks last long enough to be killed mid-way
            try:
                yield st
            finally:
                if st.worker is not None:
                    st.worker.stop()
                    print(f"--- worker log ---\n{st.worker.log_tail()}")
    finally:
        ts.stop()
        durable.stop()


# -- a stream of requests ----------------------------------------------------------------------------------------
@dataclass
class Outcome:
    sent_at: float  # time.monotonic()
    took_s: float
    code: str  # "OK" or the gRPC status name
    reason: str
    job_id: str


class RequestStream(threading.Thread):
    """Analyze requests one after another, each a new SOP instance of a real file, every ``interval_s`` (every
    ``backoff_s`` after a refusal, as a client backs off), until ``stop()`` or ``limit`` requests. Records each
    outcome."""

    def __init__(
        self, stub: pb_grpc.IngestionServiceStub, *, interval_s: float = 0.4, backoff_s: float = 1.0, limit: int = 300
    ) -> None:
        super().__init__(name="request-stream", daemon=True)
        self._stub, self._interval_s, self._backoff_s, self._limit = stub, interval_s, backoff_s, limit
        self._halt = threading.Event()
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()

    def run(self) -> None:
        for i in range(self._limit):
            if self._halt.is_set():
                return
            data = edited_dicom(SOURCES[i % len(SOURCES)])
            outcome = self._send(data)
            with self._lock:
                self.outcomes.append(outcome)
            self._halt.wait(self._interval_s if outcome.code == "OK" else self._backoff_s)

    def _send(self, data: bytes) -> Outcome:
        started = time.monotonic()
        try:
            response = self._stub.Analyze(requests_for(data), timeout=CALL_DEADLINE_S)
        except grpc.RpcError as e:
            trailers = dict(e.trailing_metadata() or ())  # type: ignore[attr-defined]
            code: str = e.code().name  # type: ignore[attr-defined]
            return Outcome(started, time.monotonic() - started, code, str(trailers.get("cxr-reason", "")), "")
        return Outcome(started, time.monotonic() - started, "OK", "", response.job_id)

    def stop(self) -> None:
        self._halt.set()
        self.join(CALL_DEADLINE_S + 10)
        assert not self.is_alive(), "a request hung past its deadline"

    def count(self, *, code: str | None = None, after: float = 0.0) -> int:
        with self._lock:
            return sum(1 for o in self.outcomes if (code is None or o.code == code) and o.sent_at >= after)

    def acknowledged(self) -> list[str]:
        with self._lock:
            return [o.job_id for o in self.outcomes if o.code == "OK"]


# -- the report --------------------------------------------------------------------------------------------------
@dataclass
class FaultReport:
    fault: str
    sent: int = 0
    acknowledged: int = 0
    refused: int = 0
    refusals: dict[str, int] = field(default_factory=dict)  # "UNAVAILABLE/INFERENCE_UNAVAILABLE" -> count
    done: int = 0
    failed_with_reason: int = 0
    lost: int = 0  # acknowledged but not ended within SETTLE_S: missing (job gone) + unfinished (still queued/running)
    missing: int = 0
    slowest_refusal_s: float = 0.0
    not_serving_after_s: float | None = None  # from the kill
    restart_s: float = 0.0  # the killed process's own start until ready
    serving_after_restart_s: float | None = None  # from the restarted dependency being ready
    all_jobs_ended_after_kill_s: float = 0.0
    failures: list[str] = field(default_factory=list)

    def emit(self) -> None:
        line = json.dumps(asdict(self))
        print(f"FAULT REPORT {line}")
        if path := os.environ.get("CXR_FAULT_REPORT"):
            with open(path, "a") as out:
                out.write(line + "\n")


def settle(client: redis.Redis, job_ids: list[str], killed_at: float, report: FaultReport) -> None:
    """Wait (bounded) until every acknowledged job has ended; fill in done / failed / lost."""

    def states() -> dict[str, tuple[str, str]]:
        out = {}
        for job_id in job_ids:
            h = {k.decode(): v.decode() for k, v in client.hgetall(job_key(job_id)).items()}  # type: ignore[union-attr]
            out[job_id] = (h.get("status", "missing"), h.get("failure_reason", ""))
        return out

    deadline = time.monotonic() + SETTLE_S
    while True:
        current = states()
        unfinished = [j for j, (s, _) in current.items() if s not in ("done", "failed")]
        if not unfinished or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    report.all_jobs_ended_after_kill_s = round(time.monotonic() - killed_at, 2)
    report.done = sum(1 for s, _ in current.values() if s == "done")
    report.failed_with_reason = sum(1 for s, r in current.values() if s == "failed" and r)
    report.lost = len(job_ids) - report.done - report.failed_with_reason
    report.missing = sum(1 for s, _ in current.values() if s == "missing")
    report.failures = sorted({r for s, r in current.values() if s == "failed"})


def summarise(stream: RequestStream, report: FaultReport) -> None:
    report.sent = len(stream.outcomes)
    report.acknowledged = stream.count(code="OK")
    refused = [o for o in stream.outcomes if o.code != "OK"]
    report.refused = len(refused)
    for o in refused:
        report.refusals[f"{o.code}/{o.reason}"] = report.refusals.get(f"{o.code}/{o.reason}", 0) + 1
    report.slowest_refusal_s = round(max((o.took_s for o in refused), default=0.0), 2)


def check(report: FaultReport, stream: RequestStream, allowed: set[str]) -> None:
    """The promises: nothing acknowledged is lost; every refusal was quick, UNAVAILABLE and had a reason."""
    report.emit()
    assert report.lost == 0, report
    assert report.acknowledged == report.done + report.failed_with_reason
    assert set(report.refusals) <= allowed, report.refusals
    assert report.slowest_refusal_s < REFUSED_WITHIN_S, report


def run_until(stream: RequestStream, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    wait_until(lambda: condition() or not stream.is_alive(), timeout_s, what, 0.05)
    assert stream.is_alive(), f"the request stream ended before {what}"


# -- the runs ----------------------------------------------------------------------------------------------------
def test_worker_killed_mid_stream_loses_nothing(stack: FaultStack) -> None:
    report = FaultReport("celery worker kill -9")
    client = stack.redis.client()
    stream = RequestStream(stack.ingestion.stub)
    stream.start()
    run_until(stream, lambda: stream.count(code="OK") >= 3, 60, "3 acknowledged requests")
    wait_until(lambda: _any_running(client, stream.acknowledged()), 30, "a job to be running")
    assert stack.worker is not None
    stack.worker.kill_all()  # parent and pool children at once: nobody is left to requeue its task
    killed_at = time.monotonic()
    run_until(stream, lambda: stream.count(code="OK", after=killed_at) >= 3, 60, "3 requests acknowledged after")
    stream.stop()  # (acknowledging goes on without a worker: the queue is in Redis)
    report.restart_s = round(stack.start_worker(), 2)  # a supervisor starts a new worker
    summarise(stream, report)
    settle(client, stream.acknowledged(), killed_at, report)
    client.close()
    check(report, stream, allowed=set())
    assert report.done == report.acknowledged  # killed mid-task is redelivered, not failed


def test_torchserve_killed_mid_stream_loses_nothing_and_health_follows(stack: FaultStack) -> None:
    report = FaultReport("torchserve kill -9")
    channel = stack.ingestion.channel
    stream = RequestStream(stack.ingestion.stub)
    stream.start()
    run_until(stream, lambda: stream.count(code="OK") >= 3, 60, "3 acknowledged requests")
    stack.kill_torchserve()
    killed_at = time.monotonic()
    report.not_serving_after_s = round(wait_health(channel, NOT_SERVING, HEALTH_BOUND_S, "dependency/torchserve"), 2)
    assert health_status(channel) == NOT_SERVING and health_status(channel, "dependency/redis") == SERVING
    run_until(stream, lambda: stream.count(code="UNAVAILABLE", after=killed_at) >= 3, 60, "3 refusals while down")
    report.restart_s = round(stack.restart_torchserve(), 2)
    report.serving_after_restart_s = round(wait_health(channel, SERVING, RECOVERY_BOUND_S), 2)
    restarted_at = time.monotonic()
    run_until(stream, lambda: stream.count(code="OK", after=restarted_at) >= 3, 60, "3 acknowledged after restart")
    stream.stop()
    summarise(stream, report)
    client = stack.redis.client()
    settle(client, stream.acknowledged(), killed_at, report)
    client.close()
    check(report, stream, allowed={"UNAVAILABLE/INFERENCE_UNAVAILABLE"})
    assert report.refused >= 3 and report.done == report.acknowledged


def test_redis_killed_mid_stream_keeps_every_acknowledged_job(stack: FaultStack) -> None:
    report = FaultReport("redis-server kill -9")
    channel = stack.ingestion.channel
    stream = RequestStream(stack.ingestion.stub)
    stream.start()
    run_until(stream, lambda: stream.count(code="OK") >= 4, 60, "4 acknowledged requests")
    stack.redis.kill()  # the queue, the unacked tasks and the job state live here
    killed_at = time.monotonic()
    report.not_serving_after_s = round(wait_health(channel, NOT_SERVING, HEALTH_BOUND_S, "dependency/redis"), 2)
    assert health_status(channel) == NOT_SERVING
    run_until(stream, lambda: stream.count(code="UNAVAILABLE", after=killed_at) >= 3, 60, "3 refusals while down")
    report.restart_s = round(stack.redis.start(), 3)  # replays the append-only file
    report.serving_after_restart_s = round(wait_health(channel, SERVING, RECOVERY_BOUND_S), 2)
    restarted_at = time.monotonic()
    run_until(stream, lambda: stream.count(code="OK", after=restarted_at) >= 3, 60, "3 acknowledged after restart")
    stream.stop()
    summarise(stream, report)
    client = stack.redis.client()
    settle(client, stream.acknowledged(), killed_at, report)
    client.close()
    check(report, stream, allowed={"UNAVAILABLE/STORE_UNAVAILABLE"})
    assert report.refused >= 3
    assert stack.worker is not None and stack.worker.proc is not None and stack.worker.proc.poll() is None


def _any_running(client: redis.Redis, job_ids: list[str]) -> bool:
    return any(client.hget(job_key(j), "status") == b"running" for j in job_ids)
